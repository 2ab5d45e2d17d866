"""Bad input to every ``mask2dit`` sub-command: exit code 2, one line on stderr naming the option, no traceback.

Each case runs the command in-process (an uncaught exception fails the test, so "no traceback" is checked), and
a few run through the installed ``mask2dit`` entry point. Progress bars (a model loads for the checks that need
its sizes) are not counted as lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from diffusers_mask2dit import cli
from diffusers_mask2dit.generate import cli as generate_cli
from diffusers_mask2dit.generate import read_output_folder
from diffusers_mask2dit.tiny import save_tiny_cogvideox
from diffusers_mask2dit.video_io import write_video

_PROGRESS = re.compile(r"\d+%\|")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, a generated 2-scene folder, and the malformed files and folders the cases point at."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_tiny_cogvideox(root / "model")
    made = root / "made"
    argv = ["generate", "--model", model, "--prompt", "a cat", "--prompt", "a dog", "--out", str(made), "--steps", "1",
            "--device", "cpu", "--guidance", "1"]
    assert cli.main(argv) == 0
    paths = {"model": model, "made": str(made), "root": str(root)}

    (root / "empty").mkdir()
    paths["empty"] = str(root / "empty")
    (root / "note.txt").write_text("not a model\n")
    paths["file"] = str(root / "note.txt")

    broken = root / "broken_model"  # the transformer's weights cut short
    shutil.copytree(model, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    paths["broken_model"] = str(broken)

    mismatch = root / "mismatch"  # two scene files, one prompt
    shutil.copytree(made, mismatch)
    (mismatch / "prompts.txt").write_text("a cat\n")
    paths["mismatch"] = str(mismatch)

    corrupt = root / "corrupt"  # a scene file cut short: ffmpeg cannot open it
    shutil.copytree(made, corrupt)
    data = (corrupt / "scene_01.mp4").read_bytes()
    (corrupt / "scene_01.mp4").write_bytes(data[: len(data) // 3])
    paths["corrupt"] = str(corrupt)

    damaged = root / "damaged_latents"
    shutil.copytree(made, damaged)
    (damaged / "latents.safetensors").write_bytes(b"\x00" * 100)
    paths["damaged_latents"] = str(damaged)

    other = root / "other_latents"  # latents of another video: scene lengths differ from the mp4 files
    shutil.copytree(made, other)
    write_video(torch.rand(17, 64, 64, 3).numpy(), str(other / "scene_01.mp4"))
    paths["other_latents"] = str(other)

    narrow = root / "narrow_transformer" / "transformer"  # a transformer made for another text encoder
    from diffusers import CogVideoXTransformer3DModel

    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16, text_embed_dim=16,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=226,
    ).save_pretrained(str(narrow))
    paths["narrow_transformer"] = str(narrow.parent)

    one_scene = root / "one_scene"
    one_scene.mkdir()
    shutil.copy(made / "scene_00.mp4", one_scene / "scene_00.mp4")
    (one_scene / "prompts.txt").write_text("a cat\n")
    paths["one_scene"] = str(one_scene)

    video = root / "one.mp4"
    write_video(torch.rand(9, 32, 32, 3).numpy(), str(video))
    paths["video"] = str(video)
    return paths


def _fill(argv, files, tmp_path):
    """Replace ``{name}`` placeholders with fixture paths (``{out}``: a fresh folder)."""
    values = dict(files, out=str(tmp_path / "out"))
    return [part.format(**values) for part in argv]


def run_cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as raised:  # argparse
        code = raised.code
    captured = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]", captured.err) if line.strip() and not _PROGRESS.search(line)]
    return code, lines, captured.err


GEN = ["generate", "--model", "{model}", "--prompt", "a cat", "--out", "{out}", "--steps", "1", "--device", "cpu"]
EXT = ["extend", "--model", "{model}", "--from", "{made}", "--prompt", "a bird", "--out", "{out}", "--steps", "1",
       "--device", "cpu"]
DEMO = ["demo", "--out", "{out}", "--steps", "1", "--device", "cpu"]
EVAL = ["evaluate", "--video", "{made}", "--tiny-clip", "--device", "cpu"]


def with_value(argv, option, value):
    """``argv`` with ``option``'s value replaced."""
    index = argv.index(option)
    return argv[: index + 1] + [value] + argv[index + 2 :]


def without(argv, option, takes_value=True):
    """``argv`` without ``option`` (and its value)."""
    index = argv.index(option)
    return argv[:index] + argv[index + 1 + int(takes_value) :]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
NO_ACCELERATOR = pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine without an accelerator")
NO_TORCHAO = pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="needs a machine without torchao")

CASES = [
    # generate: values never silently replaced
    pytest.param(GEN + ["--frames", "0"], "`--frames`", id="generate-frames-0"),
    pytest.param(GEN + ["--frames", "-9"], "`--frames`", id="generate-frames-negative"),
    pytest.param(GEN + ["--height", "0"], "`--height`", id="generate-height-0"),
    pytest.param(GEN + ["--width", "0"], "`--width`", id="generate-width-0"),
    pytest.param(GEN + ["--steps", "0"], "`--steps`", id="generate-steps-0"),
    pytest.param(GEN + ["--steps", "-1"], "`--steps`", id="generate-steps-negative"),
    pytest.param(GEN + ["--steps", "two"], "--steps", id="generate-steps-not-a-number"),
    pytest.param(GEN + ["--frames", "12"], "`--frames` must be a frame count this model's VAE decodes back exactly (1, 9, 17", id="generate-frames-not-decodable"),
    pytest.param(GEN + ["--height", "72"], "`--height` must be a positive multiple of 16", id="generate-height-not-multiple"),
    pytest.param(GEN + ["--width", "100"], "`--width` must be a positive multiple of 16", id="generate-width-not-multiple"),
    pytest.param(GEN + ["--mask", "v9"], "`--mask` must be v1, v2, v3 or full (or the authors' numbers 1, 2, 3, 5); got 'v9'", id="generate-mask-v9"),
    pytest.param(GEN + ["--mask", "v4"], "got 'v4'", id="generate-mask-v4"),
    pytest.param(GEN + ["--guidance", "nan"], "`--guidance`", id="generate-guidance-nan"),
    pytest.param(GEN + ["--guidance", "-2"], "`--guidance`", id="generate-guidance-negative"),
    pytest.param(GEN + ["--fps", "0"], "`--fps`", id="generate-fps-0"),
    pytest.param(GEN + ["--seed", "-1"], "`--seed`", id="generate-seed-negative"),
    pytest.param(GEN + ["--seed", str(2**64)], "`--seed`", id="generate-seed-too-large"),
    pytest.param(GEN + ["--scenes-per-window", "1"], "`--scenes-per-window`", id="generate-window-1"),
    pytest.param(GEN + ["--num-videos", "0"], "`--num-videos` must be a whole number of videos >= 1; got 0", id="generate-num-videos-0"),
    pytest.param(EXT + ["--num-videos", "-1"], "`--num-videos` must be a whole number of videos >= 1", id="extend-num-videos-negative"),
    pytest.param(GEN + ["--num-videos", "2", "--method", "ditctrl"], "`--num-videos` applies to --method mask2dit", id="generate-num-videos-ditctrl"),
    pytest.param(GEN + ["--dtype", "fp64"], "--dtype", id="generate-dtype"),
    pytest.param(GEN + ["--device", "cuda"], "`--device cuda`: this machine has no CUDA device", id="generate-device-cuda", marks=NO_CUDA),
    pytest.param(GEN + ["--device", "tpu"], "`--device` must be auto, cpu, cuda, cuda:N, mps or xpu; got 'tpu'", id="generate-device-tpu"),
    pytest.param(GEN + ["--device", "cuda:x"], "`--device`", id="generate-device-malformed"),
    pytest.param(with_value(GEN, "--model", "./missing"), "`--model`: folder './missing' does not exist", id="generate-model-missing"),
    pytest.param(with_value(GEN, "--model", "{file}"), "`--model`: ", id="generate-model-is-a-file"),
    pytest.param(with_value(GEN, "--model", "{empty}"), "holds neither model_index.json", id="generate-model-empty-folder"),
    pytest.param(with_value(GEN, "--model", "{broken_model}"), "`--model`: could not load", id="generate-model-damaged"),
    pytest.param(GEN + ["--scheduler", "EulerDiscreteScheduler"], "`--scheduler` must be one of CogVideoXDDIMScheduler, CogVideoXDPMScheduler", id="generate-scheduler"),
    pytest.param(GEN + ["--lora", "{root}/no_lora"], "`--lora`", id="generate-lora-missing"),
    pytest.param(GEN + ["--lora", "{empty}"], "`--lora`: ", id="generate-lora-folder-without-weights"),
    pytest.param(GEN + ["--lora", "{file}"], "`--lora`: ", id="generate-lora-not-safetensors"),
    pytest.param(GEN + ["--lora-scale", "0.5"], "`--lora-scale` needs `--lora`", id="generate-lora-scale-alone"),
    pytest.param(GEN + ["--lora", "{made}/latents.safetensors", "--lora-scale", "0.5", "--lora-scale", "1"], "`--lora-scale` is given 2 times for 1 `--lora`", id="generate-lora-scale-count"),
    pytest.param(GEN + ["--compile", "fast"], "--compile: invalid choice: 'fast'", id="generate-compile"),
    pytest.param(GEN + ["--quantize", "int4"], "--quantize: invalid choice: 'int4'", id="generate-quantize"),
    pytest.param(GEN + ["--quantize", "nf4"], "--quantize nf4 needs bitsandbytes on a CUDA GPU", id="generate-quantize-bnb-without-cuda", marks=NO_CUDA),
    pytest.param(GEN + ["--quantize", "int8"], "--quantize int8 needs torchao: pip install", id="generate-quantize-without-torchao", marks=NO_TORCHAO),
    pytest.param(GEN + ["--offload", "sequential"], "--offload sequential moves weights between the CPU and an accelerator and this machine has none", id="generate-offload-without-gpu", marks=NO_ACCELERATOR),
    pytest.param(GEN + ["--cpu-offload"], "--offload model moves weights", id="generate-cpu-offload-without-gpu", marks=NO_ACCELERATOR),
    pytest.param(GEN + ["--cache", "fast"], "--cache must be one of none, first-block, pab, faster, taylorseer", id="generate-cache"),
    pytest.param(GEN + ["--cache", "first-block:0"], "the first-block threshold must be a positive number", id="generate-cache-threshold"),
    pytest.param(GEN + ["--attention-backend", "magic"], "`--attention-backend` must be one of ['auto', 'flash', 'sdpa', 'dense']", id="generate-attention-backend"),
    pytest.param(GEN + ["--attention-backend", "flash"], "`--attention-backend flash` cannot run here: it needs a CUDA device", id="generate-attention-backend-flash-on-cpu", marks=NO_CUDA),
    pytest.param(GEN + ["--max-sequence-length", "0"], "`--max-sequence-length` must be a positive number of text tokens", id="generate-max-sequence-length-0"),
    pytest.param(GEN + ["--transformer", "{root}/no_transformer"], "`--transformer`: folder", id="generate-transformer-missing"),
    pytest.param(GEN + ["--transformer", "{empty}"], "`--transformer`: ", id="generate-transformer-no-config"),
    pytest.param(GEN + ["--transformer", "{narrow_transformer}"], "`--transformer`: the transformer has text_embed_dim=16", id="generate-transformer-other-model"),
    pytest.param(GEN + ["--prompt", " "], "`--prompt`", id="generate-empty-prompt"),
    pytest.param(without(GEN, "--prompt"), "`--prompt`", id="generate-no-prompt"),
    pytest.param(GEN + ["--prompts-file", "{root}/none.txt"], "`--prompts-file`", id="generate-prompts-file-missing"),
    pytest.param(with_value(GEN, "--out", "{file}"), "`--out`", id="generate-out-is-a-file"),
    pytest.param(without(GEN, "--out"), "--out", id="generate-out-missing"),
    # extend
    pytest.param(with_value(EXT, "--from", "{root}/nowhere"), "`--from`", id="extend-from-missing"),
    pytest.param(with_value(EXT, "--from", "{empty}"), "`--from`", id="extend-from-empty"),
    pytest.param(with_value(EXT, "--from", "{mismatch}"), "`--from`", id="extend-from-prompt-count"),
    pytest.param(with_value(EXT, "--from", "{damaged_latents}"), "`--from`", id="extend-from-damaged-latents"),
    pytest.param(with_value(EXT, "--from", "{other_latents}"), "`--from`", id="extend-from-latents-of-another-video"),
    pytest.param(with_value(EXT, "--from", "{corrupt}"), "Could not decode video", id="extend-from-corrupt-mp4"),
    pytest.param(EXT + ["--context-scenes", "0"], "`--context-scenes`", id="extend-context-0"),
    pytest.param(EXT + ["--context-scenes", "5"], "`--context-scenes` is 5 but --from holds only 2", id="extend-context-too-many"),
    pytest.param(EXT + ["--height", "128"], "`--height` 128 does not match the scenes in --from (64x64", id="extend-height-128"),
    pytest.param(EXT + ["--width", "96"], "`--width` 96 does not match", id="extend-width-96"),
    pytest.param(EXT + ["--frames", "0"], "`--frames`", id="extend-frames-0"),
    pytest.param(EXT + ["--frames", "12"], "`--frames`", id="extend-frames-not-decodable"),
    pytest.param(EXT + ["--steps", "0"], "`--steps`", id="extend-steps-0"),
    pytest.param(EXT + ["--mask", "v9"], "got 'v9'", id="extend-mask-v9"),
    pytest.param(EXT + ["--device", "tpu"], "`--device`", id="extend-device-tpu"),
    pytest.param(with_value(EXT, "--model", "./missing"), "`--model`: folder './missing' does not exist", id="extend-model-missing"),
    pytest.param(without(EXT, "--from"), "--from", id="extend-from-not-given"),
    pytest.param(EXT + ["--offload", "model"], "--offload model moves weights", id="extend-offload-without-gpu", marks=NO_ACCELERATOR),
    pytest.param(EXT + ["--cache", "pab:2"], "--cache must be one of", id="extend-cache"),
    # demo
    pytest.param(with_value(DEMO, "--steps", "0"), "`--steps`", id="demo-steps-0"),
    pytest.param(DEMO + ["--frames", "0"], "`--frames`", id="demo-frames-0"),
    pytest.param(DEMO + ["--frames", "12"], "`--frames`", id="demo-frames-not-decodable"),
    pytest.param(DEMO + ["--height", "70"], "`--height`", id="demo-height-not-multiple"),
    pytest.param(DEMO + ["--scenes-per-window", "0"], "`--scenes-per-window`", id="demo-window-0"),
    pytest.param(DEMO + ["--style", "3b"], "--style", id="demo-style"),
    pytest.param(DEMO + ["--prompt", "a purple cat jumps"], "circle, square, triangle", id="demo-prompt-outside-world"),
    pytest.param(DEMO + ["--prompt", "a red circle moves"], "is not of the form", id="demo-prompt-incomplete"),
    pytest.param(DEMO + ["--device", "tpu"], "`--device`", id="demo-device-tpu"),
    pytest.param(DEMO + ["--scheduler", "PNDMScheduler"], "`--scheduler`", id="demo-scheduler"),
    pytest.param(DEMO + ["--offload", "group"], "--offload group moves weights", id="demo-offload-without-gpu", marks=NO_ACCELERATOR),
    pytest.param(DEMO + ["--attention-backend", "none"], "`--attention-backend` must be one of", id="demo-attention-backend"),
    pytest.param(DEMO + ["--model", "{model}"], "--model", id="demo-has-no-model-option"),
    # evaluate
    pytest.param(with_value(EVAL, "--video", "{root}/nowhere"), "`--video`: ", id="evaluate-video-missing"),
    pytest.param(EVAL + ["--frames-per-scene", "0"], "`--frames-per-scene`", id="evaluate-frames-per-scene-0"),
    pytest.param(EVAL + ["--frame-stride", "0"], "`--frame-stride`", id="evaluate-frame-stride-0"),
    pytest.param(EVAL + ["--batch-size", "0"], "`--batch-size`", id="evaluate-batch-size-0"),
    pytest.param(["evaluate", "--video", "{video}", "--scene-frames", "5,x", "--tiny-clip"], "`--scene-frames` must be", id="evaluate-scene-frames"),
    pytest.param(EVAL + ["--device", "tpu"], "`--device`", id="evaluate-device-tpu"),
    pytest.param(without(EVAL, "--tiny-clip", False) + ["--clip", "{root}/no_clip"], "`--clip`: no CLIP model folder", id="evaluate-clip-missing"),
    pytest.param(without(EVAL, "--tiny-clip", False), "--clip --tiny-clip", id="evaluate-no-encoder"),
    pytest.param(with_value(EVAL, "--video", "{made}/scene_00.mp4"), "`--scene-frames`", id="evaluate-one-mp4-without-scene-frames"),
    pytest.param(with_value(EVAL, "--video", "{one_scene}"), "`--video` (its scenes) must hold at least 2 scenes", id="evaluate-one-scene"),
    pytest.param(EVAL + ["--prompts", "{root}/none.txt"], "`--prompts`", id="evaluate-prompts-missing"),
    pytest.param(EVAL + ["--interval", "bootstrap"], "--interval", id="evaluate-interval"),
    pytest.param(["evaluate", "--batch", "{file}", "--tiny-clip"], "`--batch`: ", id="evaluate-batch-not-a-folder"),
    # the dispatcher and the other sub-commands' parsers
    pytest.param(["frobnicate"], "frobnicate", id="unknown-command"),
    pytest.param(["train", "--no-such-option", "1"], "--no-such-option", id="train-unknown-option"),
    pytest.param(["hub", "build", "--out", "{out}"], "--model", id="hub-build-model-missing"),
    pytest.param(["hub", "push", "--no-such-option"], "--folder, --repo", id="hub-push-arguments-missing"),
    # hub and conversion: values the commands cannot take
    pytest.param(["hub", "build", "--model", "{root}/no_model", "--out", "{out}"], "no_model", id="hub-build-model-folder-missing"),
    pytest.param(["hub", "build", "--model", "{model}", "--out", "{out}", "--repo-id", "not a repo"], "not a repo", id="hub-build-repo-id"),
    pytest.param(["hub", "push", "--folder", "{root}/no_folder", "--repo", "me/m"], "no_folder", id="hub-push-folder-missing"),
    pytest.param(["hub", "push", "--folder", "{model}", "--repo", "bad repo"], "bad repo", id="hub-push-repo-id"),
    pytest.param(["convert-official", "--src", "{root}/no_release", "--out", "{out}"], "no_release", id="convert-src-missing"),
]


@pytest.mark.parametrize("argv, message", CASES)
def test_bad_input_exits_2_with_one_line(files, tmp_path, capsys, argv, message):
    code, lines, err = run_cli(_fill(argv, files, tmp_path), capsys)
    assert code == 2, err
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and "ffmpeg version" not in err
    assert not os.path.exists(tmp_path / "out" / "video.mp4")


def test_at_least_30_cli_cases():
    assert len(CASES) >= 30


def test_extend_refuses_a_new_size_before_loading_the_model(files, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although --height cannot work")

    monkeypatch.setattr(generate_cli, "load_pipeline", no_model)
    code, lines, _ = run_cli(_fill(EXT + ["--height", "128", "--width", "128"], files, tmp_path), capsys)
    assert code == 2 and "`--height` 128" in lines[0]


def test_corrupt_video_error_is_one_short_line(files, tmp_path, capsys):
    _, lines, _ = run_cli(_fill(with_value(EXT, "--from", "{corrupt}"), files, tmp_path), capsys)
    assert "scene_01.mp4" in lines[0] and len(lines[0]) < 300, lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (GEN + ["--steps", "0"], "mask2dit generate: error: `--steps`"),
        (["evaluate", "--video", "{made}", "--tiny-clip", "--device", "tpu"], "mask2dit evaluate: error: `--device`"),
    ],
    ids=["generate-steps-0", "evaluate-device-tpu"],
)
def test_installed_command_prints_one_line(files, tmp_path, argv, message):
    """Through the real entry point, in a fresh process: exit code 2 and one line, no traceback."""
    command = [sys.executable, "-c", "import sys; from diffusers_mask2dit.cli import main; sys.exit(main())"]
    result = subprocess.run(command + _fill(argv, files, tmp_path), capture_output=True, text=True, timeout=300)
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not _PROGRESS.search(line)]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_saved_folder_is_what_the_cases_rely_on(files):
    """The fixture's generated folder is valid input (so the cases above fail for the reason they name)."""
    folder = read_output_folder(files["made"])
    assert folder.prompts == ["a cat", "a dog"] and folder.latents is not None
    assert json.dumps(folder.latents.pixel_frames) == "[9, 9]"


@pytest.mark.parametrize("extra, message", [
    (["--num-videos", "2"], "`--num-videos` makes one video per run under `--ulysses-degree`"),
    (["--offload", "model"], "`--offload model` cannot be combined with `--ulysses-degree`"),
])
def test_parallel_runs_refuse_what_one_video_per_process_group_cannot_do(monkeypatch, extra, message):
    """Under torchrun (its variables set), options that a parallel run cannot honour are refused by name."""
    from diffusers_mask2dit import cli
    from diffusers_mask2dit.generate.options import check_parallel_options

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    args = cli.build_parser().parse_args(["generate", "--out", "x", "--ulysses-degree", "2"] + extra)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_parallel_options(args)
    args = cli.build_parser().parse_args(["generate", "--out", "x", "--ulysses-degree", "2"])
    check_parallel_options(args)  # the same run without them is fine
