"""`mask2dit generate / extend / demo` and the example scripts, on tiny random models (offline).

Bad input to these commands is tested in test_bad_inputs_cli.py.
"""

import json
import os
import re
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_mask2dit import Mask2DiTPipeline, cli
from diffusers_mask2dit.tiny import build_tiny_components, save_tiny_cogvideox
from diffusers_mask2dit.video_io import LABEL_HEIGHT, read_video

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY_ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--frames", "9", "--device", "cpu"]
ROW_HEIGHT = LABEL_HEIGHT + 96 + 2 * 2  # contact sheet: label line, thumbnail, 2-px margins


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipe(model):
    pipe = Mask2DiTPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_latents(folder):
    return load_file(os.path.join(folder, "latents.safetensors"))["latents"]


def assert_outputs(folder, prompts, frames_per_scene=9, size=64):
    """The files `mask2dit evaluate` and `mask2dit extend` read: video.mp4, scene_XX.mp4, contact_sheet.png,
    prompts.txt, latents.safetensors, settings.json."""
    names = sorted(os.listdir(folder))
    scene_names = [f"scene_{i:02d}.mp4" for i in range(len(prompts))]
    files = ["video.mp4", "contact_sheet.png", "prompts.txt", "latents.safetensors", "settings.json"]
    assert names == sorted(files + scene_names)
    with open(os.path.join(folder, "prompts.txt"), encoding="utf-8") as handle:
        assert handle.read().splitlines() == prompts
    scenes = [read_video(os.path.join(folder, name)) for name in scene_names]
    assert all(scene.shape == (frames_per_scene, size, size, 3) for scene in scenes)
    # video.mp4 is the scene files joined without re-encoding: the same frames exactly
    assert np.array_equal(read_video(os.path.join(folder, "video.mp4")), np.concatenate(scenes))
    assert Image.open(os.path.join(folder, "contact_sheet.png")).size[1] == ROW_HEIGHT * len(prompts)  # one row per scene
    assert saved_latents(folder).shape == (1, 3 * len(prompts), 4, size // 8, size // 8)


def label_strip(folder, row):
    sheet = np.asarray(Image.open(os.path.join(folder, "contact_sheet.png")).convert("RGB")).astype(int)
    return sheet[row * ROW_HEIGHT : row * ROW_HEIGHT + LABEL_HEIGHT]


def test_commands_are_registered():
    parser = cli.build_parser()
    for command in ("generate", "extend", "demo"):
        args = parser.parse_args([command, "--out", "x"] + (["--from", "y"] if command == "extend" else []))
        assert callable(args.func)


def test_version(capsys):
    from diffusers_mask2dit import __version__

    with pytest.raises(SystemExit) as raised:
        cli.main(["--version"])
    assert raised.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"mask2dit {__version__} (diffusers ") and "torch" in printed


def test_demo_runs_multiscene_and_extension_offline(tmp_path, capsys):
    assert cli.main(["demo", "--random-weights", "--out", str(tmp_path / "demo")]) == 0
    captured = capsys.readouterr()
    assert "RANDOM" in captured.out and "not quality" in captured.out and "extended" in captured.out
    from diffusers_mask2dit.shapes.demo import DEMO_PROMPTS

    assert_outputs(tmp_path / "demo", DEMO_PROMPTS)
    # every progress bar says what it counts (tqdm prints "desc: 50%|..." or, without one, just " 50%|...")
    bars = [line for line in re.split(r"[\r\n]", captured.err) if re.search(r"\d+%\|", line)]
    assert bars and not [bar for bar in bars if re.match(r"^\s*\d+%\|", bar)], bars
    # each contact sheet row has a label; the scene made by extension (the 4th) is marked in orange
    for row in range(4):
        strip = label_strip(tmp_path / "demo", row)
        assert (strip < 128).any(), f"row {row} has no label"
        orange = ((strip[..., 0] - strip[..., 2]) > 60).any()
        assert orange == (row == 3), row
    # a random-weight demo has no model folder for `extend --from` to reuse: said before anything loads
    assert cli.main(["extend", "--from", str(tmp_path / "demo"), "--prompt", "a cat", "--out", str(tmp_path / "x")]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_generate_then_extend_continues_from_the_exact_latents(model, pipe, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a dog runs through the grass\n\n")
    out = tmp_path / "out"
    status = cli.main(["generate", "--model", model, "--prompt", "a cat walks on the beach", "--prompts-file",
                       str(prompts_file), "--out", str(out), "--seed", "3", "--guidance", "1.0"] + TINY_ARGS)
    assert status == 0
    prompts = ["a cat walks on the beach", "a dog runs through the grass"]
    assert_outputs(out, prompts)
    generated = saved_latents(out)
    api = pipe(prompt=prompts, num_frames=9, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
               generator=torch.Generator().manual_seed(3))
    assert torch.equal(api.frames, generated)

    extended = tmp_path / "extended"
    status = cli.main(["extend", "--model", model, "--from", str(out), "--prompt", "a bird flies over the sea",
                       "--out", str(extended), "--context-scenes", "2", "--steps", "2", "--device", "cpu", "--seed", "5"])
    assert status == 0
    assert_outputs(extended, prompts + ["a bird flies over the sea"])
    latents = saved_latents(extended)
    assert torch.equal(latents[:, :6], generated)  # the context, bit for bit
    # `extend` reuses the guidance recorded in --from (1.0; the pipeline's default would be 6.0)
    reference = pipe.extend(prompt="a bird flies over the sea", context_prompts=prompts, context_latents=generated,
                            num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                            generator=torch.Generator().manual_seed(5))
    assert torch.equal(latents, reference.frames)  # the new scene is what the Python API makes from those latents
    for name in ("scene_00.mp4", "scene_01.mp4"):  # earlier scenes: their files, unchanged
        assert (out / name).read_bytes() == (extended / name).read_bytes()
    assert not ((label_strip(extended, 1)[..., 0] - label_strip(extended, 1)[..., 2]) > 60).any()
    assert ((label_strip(extended, 2)[..., 0] - label_strip(extended, 2)[..., 2]) > 60).any()


def test_extend_without_latents_encodes_the_mp4_frames(model, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", "--model", model, "--prompt", "a cat", "--prompt", "a dog", "--out", str(out),
                     "--guidance", "1.0"] + TINY_ARGS) == 0
    os.remove(out / "latents.safetensors")
    capsys.readouterr()
    extended = tmp_path / "extended"
    assert cli.main(["extend", "--model", model, "--from", str(out), "--prompt", "a bird", "--out", str(extended),
                     "--context-scenes", "1", "--steps", "2", "--device", "cpu"]) == 0
    assert "note:" in capsys.readouterr().err
    # the uint8 frames of our own read_video, passed to the pipeline in the range it documents ([0, 1] floats)
    frames = [read_video(str(out / f"scene_{i:02d}.mp4")).astype(np.float32) / 255.0 for i in range(2)]
    reference = pipe.extend(prompt="a bird", context_prompts=["a dog"], context_frames=frames[1:],
                            num_inference_steps=2, guidance_scale=1.0,  # recorded in --from's settings.json
                            output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.equal(saved_latents(extended)[:, 3:], reference.frames)
    assert_outputs(extended, ["a cat", "a dog", "a bird"])


def test_generate_uses_extension_beyond_the_window(model, tmp_path):
    prompts = [f"scene number {i}" for i in range(3)]
    args = ["generate", "--model", model, "--out", str(tmp_path), "--scenes-per-window", "2"]
    assert cli.main(args + sum([["--prompt", p] for p in prompts], []) + TINY_ARGS) == 0
    assert_outputs(tmp_path, prompts)


@pytest.fixture(scope="module")
def lora(model, tmp_path_factory):
    """A LoRA trained for 3 steps by our trainer on the tiny model."""
    from accelerate.state import AcceleratorState
    from test_training_fixtures import tiny_config, write_sft_jsonl

    from diffusers_mask2dit.training import train

    root = tmp_path_factory.mktemp("lora")
    data = write_sft_jsonl(str(root), num_videos=1, shots=2, frames=9)
    config = tiny_config(model, str(root / "out"), data_file=data, max_train_steps=3, learning_rate=1e-2, lora_alpha=16.0)
    try:
        return train(config).weights_path
    finally:
        AcceleratorState._reset_state()


def test_generate_with_lora_scheduler_negative_prompt_and_mask_equals_the_python_api(model, lora, tmp_path):
    from diffusers import CogVideoXDPMScheduler

    prompts = ["a cat walks on the beach", "the cat sleeps"]
    options = ["--scheduler", "CogVideoXDPMScheduler", "--negative-prompt", "blurry, low quality", "--mask", "v1",
               "--seed", "7"] + TINY_ARGS
    base = ["generate", "--model", model, "--prompt", prompts[0], "--prompt", prompts[1]] + options
    assert cli.main(base + ["--lora", lora, "--out", str(tmp_path / "lora")]) == 0
    assert cli.main(base + ["--lora", lora, "--lora-scale", "0", "--out", str(tmp_path / "scale0")]) == 0

    pipe = Mask2DiTPipeline.from_pretrained(model)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    call = dict(prompt=prompts, negative_prompt="blurry, low quality", num_frames=9, height=64, width=64,
                num_inference_steps=2, attention_kwargs={"scene_mask": "v1"}, output_type="latent")
    without_lora = pipe(generator=torch.Generator().manual_seed(7), **call).frames
    pipe.load_lora_weights(lora)
    with_lora = pipe(generator=torch.Generator().manual_seed(7), **call).frames
    assert torch.equal(saved_latents(tmp_path / "lora"), with_lora)
    assert torch.equal(saved_latents(tmp_path / "scale0"), without_lora)  # --lora-scale reaches the adapter
    assert (with_lora - without_lora).abs().max() > 1e-4  # the LoRA does something


def test_generate_with_a_full_fine_tune_transformer(model, tmp_path):
    """--transformer takes a trainer's output folder (with transformer/) like the pipeline's `transformer=`."""
    finetune = tmp_path / "finetune"
    build_tiny_components(seed=11)["transformer"].save_pretrained(str(finetune / "transformer"))
    argv = ["generate", "--model", model, "--prompt", "a cat", "--prompt", "a dog", "--seed", "1"] + TINY_ARGS
    assert cli.main(argv + ["--transformer", str(finetune), "--out", str(tmp_path / "out")]) == 0

    from diffusers_mask2dit import Mask2DiTTransformer3DModel

    transformer = Mask2DiTTransformer3DModel.from_pretrained(str(finetune), subfolder="transformer")
    pipe = Mask2DiTPipeline.from_pretrained(model, transformer=transformer)
    reference = pipe(prompt=["a cat", "a dog"], num_frames=9, height=64, width=64, num_inference_steps=2,
                     output_type="latent", generator=torch.Generator().manual_seed(1))
    assert torch.equal(saved_latents(tmp_path / "out"), reference.frames)


def test_generated_folder_evaluates_offline_with_the_tiny_clip(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", "--model", model, "--prompt", "a cat", "--prompt", "a dog", "--out", str(out)]
                    + TINY_ARGS) == 0
    assert cli.main(["evaluate", "--video", str(out), "--tiny-clip", "--device", "cpu"]) == 0
    assert "RANDOM" in capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    assert result["clip"] == "tiny-random-clip" and result["num_scenes"] == 2


def test_rerun_into_a_folder_removes_scenes_of_the_longer_video(model, tmp_path):
    out = tmp_path / "out"
    three = sum([["--prompt", p] for p in ("a cat", "a dog", "a bird")], [])
    assert cli.main(["generate", "--model", model, "--out", str(out)] + three + TINY_ARGS) == 0
    assert cli.main(["generate", "--model", model, "--out", str(out), "--prompt", "a fox"] + TINY_ARGS) == 0
    assert_outputs(out, ["a fox"])


@pytest.mark.parametrize("script, scenes", [("generate_multiscene.py", 3), ("extend_scenes.py", 5)])
def test_example_scripts_run_on_a_local_model(model, tmp_path, monkeypatch, script, scenes):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [script, "--model", model, "--out", str(out)] + TINY_ARGS)
    runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")
    with open(out / "prompts.txt", encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) == scenes
    assert read_video(str(out / "video.mp4")).shape == (9 * scenes, 64, 64, 3)


def test_num_videos_writes_one_folder_per_video_as_the_python_api_batch(model, pipe, tmp_path):
    """`--num-videos 2`: out/video_00 and out/video_01, each a whole output folder holding one video of the batch
    `num_videos_per_prompt=2` makes; `extend --from` one of them continues that video, and `extend --num-videos 2`
    makes two continuations of the same context."""
    prompts = ["a cat walks on the beach", "a dog runs through the grass"]
    out = tmp_path / "out"
    argv = ["generate", "--model", model, "--out", str(out), "--seed", "4", "--num-videos", "2"]
    assert cli.main(argv + sum([["--prompt", p] for p in prompts], []) + TINY_ARGS) == 0
    assert sorted(os.listdir(out)) == ["video_00", "video_01"]
    for index in range(2):
        assert_outputs(out / f"video_{index:02d}", prompts)
    api = pipe(prompt=prompts, num_frames=9, num_inference_steps=2, num_videos_per_prompt=2, output_type="latent",
               generator=torch.Generator().manual_seed(4)).frames
    assert torch.equal(saved_latents(out / "video_00")[0], api[0]) and torch.equal(saved_latents(out / "video_01")[0], api[1])
    assert not torch.equal(api[0], api[1])  # each video from its own noise

    extended = tmp_path / "extended"
    argv = ["extend", "--from", str(out / "video_01"), "--prompt", "a bird", "--out", str(extended), "--num-videos", "2",
            "--seed", "5"]
    assert cli.main(argv) == 0
    continued = [saved_latents(extended / f"video_{index:02d}") for index in range(2)]
    for latents in continued:  # both continue video_01, bit for bit; the new scenes differ
        assert torch.equal(latents[:, :6], saved_latents(out / "video_01"))
    assert not torch.equal(continued[0][:, 6:], continued[1][:, 6:])
    reference = pipe.extend(prompt="a bird", context_prompts=prompts, context_latents=saved_latents(out / "video_01"),
                            num_inference_steps=2, num_videos_per_prompt=2, output_type="latent",
                            generator=torch.Generator().manual_seed(5)).frames
    assert torch.equal(torch.cat(continued), reference)
