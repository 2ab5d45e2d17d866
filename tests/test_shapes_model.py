"""The Shapes model shipped inside the package: a real diffusers folder, small, and still good on fixed seeds.

The thresholds are below what the model measures on these seeds (see docs/shapes.md for the 200-sample
figures), so a change that breaks generation, extension or loading fails here without retraining anything.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_mask2dit.shapes import ablation, score, world
from diffusers_mask2dit.shapes import model as shapes_model
from diffusers_mask2dit.shapes.vae import held_out_clips, reconstruction_psnr

SAMPLES = list(range(4))  # held-out samples 0-3 of the ablation's seeds


@pytest.fixture(scope="module")
def pipe():
    return shapes_model.load_pipeline()


def test_shipped_folder_is_small_safetensors_and_cogvideox_5b_style(pipe):
    folder = shapes_model.shipped_model_path()
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    weights = [f for f in files if not f.endswith(".json")]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    assert sum(os.path.getsize(f) for f in files) <= 20 * 2**20
    for component in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(folder, component))
    config = pipe.transformer.config
    assert config.use_rotary_positional_embeddings and config.attn_mask_variant == "v2"
    assert config.max_text_seq_length == shapes_model.MAX_SEQUENCE_LENGTH
    # The pipeline pads prompts to the transformer's text length by default (8 here, 226 for CogVideoX).
    embeds, _, lengths = pipe.encode_scene_prompts([world.all_prompts()[:3]], None, False)
    assert lengths == [shapes_model.MAX_SEQUENCE_LENGTH] * 3 and embeds.shape[1] == 3 * shapes_model.MAX_SEQUENCE_LENGTH


def test_shipped_vae_reconstructs_held_out_clips_at_30_db_on_average(pipe):
    # On the 200 held-out clips of docs/shapes.md: mean 31.6 dB, 79% of clips at or above 30 dB, minimum 27.8 dB.
    values = reconstruction_psnr(pipe.vae, held_out_clips(8))
    assert np.mean(values) >= 30.0 and min(values) >= 27.0, values


def test_shipped_model_follows_prompts_and_keeps_one_background(pipe):
    result = ablation.run_multiscene(pipe, "v2", SAMPLES, batch_size=4)
    scenes = [s["correct"] for s in result["samples"]]
    pairs = [s["same_background"] for s in result["samples"]]
    # Measured: 11 of 12 scenes right, 12 of 12 pairs on one background (92.7% and 93.8% on all 200 samples).
    assert np.mean(scenes) >= 0.9, result["samples"]
    assert np.mean(pairs) >= 0.9, result["samples"]
    extended = ablation.run_extend(pipe, SAMPLES[:2], result["latents"][:2], batch_size=2)["samples"]
    assert all(s["keeps_background"] and s["follows_prompt"] for s in extended), extended


def test_generate_long_runs_on_the_shipped_model(pipe):
    prompts = ablation.held_out_prompts(0, 4)
    output = pipe.generate_long(prompts, scenes_per_window=3, generator=torch.Generator().manual_seed(0), output_type="np",
                                **shapes_model.generation_kwargs(num_inference_steps=10))
    backgrounds = [score.read_scene(frames).background for frames in output.scene_frames[0]]
    assert len(backgrounds) == 4 and backgrounds[3] is not None and len(set(backgrounds)) == 1, backgrounds


def test_hub_build_and_custom_pipeline_run_the_shipped_model(tmp_path):
    out = tmp_path / "hub"
    from diffusers_mask2dit.cli import main as cli_main

    card = tmp_path / "card.md"  # trained from scratch: the fine-tune template's --base-model does not apply
    card.write_text("---\nlibrary_name: diffusers\npipeline_tag: text-to-video\nlicense: apache-2.0\ntags:\n- mask2dit\n---\n# Shapes-world Mask²DiT\n\nA small Mask²DiT trained with diffusers-mask2dit ({{mask_variant}}).\n")
    assert cli_main(["hub", "build", "--model", shapes_model.shipped_model_path(), "--out", str(out), "--card", str(card)]) == 0
    assert "(v2)" in (out / "README.md").read_text()
    script = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[1], trust_remote_code=True)\n"
        "out = pipe(prompt=['a red circle moves left', 'a blue square moves up'], num_inference_steps=2, guidance_scale=1.0,"
        " generator=torch.Generator().manual_seed(0), output_type='np')\n"
        "print(type(pipe).__name__, [s.shape for s in out.scene_frames[0]])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Mask2DiTPipeline [(9, 48, 48, 3), (9, 48, 48, 3)]" in result.stdout


def test_demo_defaults_to_the_shapes_model(tmp_path, capsys):
    from diffusers_mask2dit.cli import main as cli_main
    from diffusers_mask2dit.shapes.demo import DEMO_PROMPTS
    from diffusers_mask2dit.video_io import read_video

    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out)]) == 0
    assert "Shapes" in capsys.readouterr().out
    assert (out / "prompts.txt").read_text().splitlines() == DEMO_PROMPTS
    scenes = [read_video(str(out / f"scene_{i:02d}.mp4")) for i in range(4)]
    assert all(s.shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3) for s in scenes)
    assert (out / "contact_sheet.png").is_file() and (out / "video.mp4").is_file()
    backgrounds = {score.read_scene(s).background for s in scenes}
    assert len(backgrounds) == 1 and None not in backgrounds  # one background throughout, extension included


def test_demo_rejects_words_outside_the_world(tmp_path, capsys):
    from diffusers_mask2dit.cli import main as cli_main

    code = cli_main(["demo", "--prompt", "a red circle moves left", "--prompt", "a purple cat jumps", "--out", str(tmp_path / "d")])
    assert code == 2
    error = capsys.readouterr().err
    assert "--prompt 2" in error and "purple, cat, jumps" in error and "colour: red, green, blue, yellow" in error
    assert not (tmp_path / "d").exists()


def test_ablation_script_writes_the_table_once_per_condition(tmp_path, monkeypatch):
    """The ablation script end to end on 2 samples at 2 steps (the shipped model stands in for every variant): JSON,
    table, plot and README section; a second run reuses every condition instead of generating again."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ablation.MODELS:
        (run / f"model-{name}").symlink_to(shapes_model.shipped_model_path())
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ablation.README_START}\nold\n{ablation.README_END}\nrest\n")
    fast = shapes_model.generation_kwargs
    monkeypatch.setattr(shapes_model, "generation_kwargs", lambda **o: fast(**{"num_inference_steps": 2, **o}))
    args = ["--run", str(run), "--out", str(tmp_path / "out"), "--samples", "2", "--long-samples", "1", "--batch-size", "2"]
    assert ablation.main(args + ["--conditions", "shipped", "extend"]) == 0
    assert not (tmp_path / "out" / "ablation.json").exists()  # not all conditions made yet
    assert ablation.main(args + ["--readme", str(readme)]) == 0
    result = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert set(result["summary"]["conditions"]) == {"v1", "v2", "v3", "full", "separate", "shipped"}
    assert len(set(result["meta"]["weights"].values())) == 1  # one folder stands in for all
    assert result["summary"]["conditions"]["v2"]["prompt_accuracy"]["n"] == 2
    assert result["summary"]["extension"]["long_follows_prompt"]["n"] == 1
    text = readme.read_text()
    assert "| separate |" in text and "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert (tmp_path / "out" / "ablation.png").is_file()

    def no_generation(*args, **kwargs):
        raise AssertionError("a condition was generated again")

    for name in ("run_multiscene", "run_separate", "run_extend", "run_generate_long"):
        monkeypatch.setattr(ablation, name, no_generation)
    assert ablation.main(args) == 0
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["summary"] == result["summary"]


def test_ablation_cache_reuses_only_results_of_the_same_settings(tmp_path):
    calls = []

    def compute(value):
        def make():
            calls.append(value)
            return {"value": np.float32(value)}, torch.full((2,), float(value))
        return make

    first = ablation.ConditionCache(str(tmp_path), {"num_samples": 2})
    assert first.get("v2", compute(1), with_latents=True)[0] == {"value": 1.0}
    result, latents = ablation.ConditionCache(str(tmp_path), {"num_samples": 2}).get("v2", compute(2), with_latents=True)
    assert calls == [1] and result == {"value": 1.0} and torch.equal(latents, torch.full((2,), 1.0))
    # Other settings: both the results and the latents are made again, never mixed with the old ones.
    result, latents = ablation.ConditionCache(str(tmp_path), {"num_samples": 3}).get("v2", compute(3), with_latents=True)
    assert calls == [1, 3] and result == {"value": 3.0} and torch.equal(latents, torch.full((2,), 3.0))
    # Results whose latents are missing are made again too.
    os.remove(tmp_path / "conditions" / "v2_latents.safetensors")
    assert ablation.ConditionCache(str(tmp_path), {"num_samples": 3}).get("v2", compute(4), with_latents=True)[0] == {"value": 4.0}
    assert calls == [1, 3, 4]
    # Other weights (a condition's ``inputs``): made again as well.
    cache = ablation.ConditionCache(str(tmp_path), {"num_samples": 3})
    assert cache.get("v2", compute(5), with_latents=True, inputs={"weights": "a"})[0] == {"value": 5.0}
    assert cache.get("v2", compute(6), with_latents=True, inputs={"weights": "a"})[0] == {"value": 5.0}
    assert cache.get("v2", compute(7), with_latents=True, inputs={"weights": "b"})[0] == {"value": 7.0}
    assert calls == [1, 3, 4, 5, 7]


def test_weights_fingerprint_changes_with_any_weight_byte(tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"abc")
    (folder / "transformer" / "config.json").write_text("{}")
    first = ablation.weights_fingerprint(str(folder))
    (folder / "transformer" / "config.json").write_text('{"other": 1}')  # not a weight
    assert ablation.weights_fingerprint(str(folder)) == first
    weights.write_bytes(b"abd")
    assert ablation.weights_fingerprint(str(folder)) != first


def test_ablation_names_a_missing_model_folder(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="model-v1/.*--variants v1"):
        ablation.RunModels(str(tmp_path / "run")).pipe("v1")


def test_the_shipped_folder_carries_its_sampling_defaults(pipe):
    """`generation_defaults.json` holds the steps and guidance chosen on validation samples (shapes/model.py)."""
    assert pipe.generation_defaults == {
        "num_inference_steps": shapes_model.NUM_INFERENCE_STEPS, "guidance_scale": shapes_model.GUIDANCE_SCALE,
    }


def test_generate_with_the_shapes_model_gives_the_demos_result(tmp_path):
    """`mask2dit generate --model <shapes model>` without step or guidance flags makes the demo's video (same seed,
    bit for bit), and `extend --from` that folder reuses the recorded model (no --model) as if it were given."""
    from safetensors.torch import load_file

    from diffusers_mask2dit.cli import main as cli_main

    prompts = ["--prompt", "a red circle moves right", "--prompt", "a blue square moves up", "--seed", "3"]
    assert cli_main(["demo", *prompts, "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    model = shapes_model.shipped_model_path()
    assert cli_main(["generate", "--model", model, *prompts, "--out", str(tmp_path / "gen"), "--device", "cpu"]) == 0
    demo, made = (load_file(str(tmp_path / name / "latents.safetensors"))["latents"] for name in ("demo", "gen"))
    assert torch.equal(demo, made)
    # Both runs take the folder's defaults (test_the_shipped_folder_carries_its_sampling_defaults checks them and
    # test_bad_inputs_pipeline that the pipeline applies a folder's defaults); the record says none was given.
    assert json.loads((tmp_path / "gen" / "settings.json").read_text())["steps"] is None

    new = ["--prompt", "a green circle moves down", "--steps", "4", "--device", "cpu"]
    assert cli_main(["extend", "--from", str(tmp_path / "gen"), *new, "--out", str(tmp_path / "ext")]) == 0
    assert cli_main(["extend", "--from", str(tmp_path / "gen"), *new, "--model", model, "--out", str(tmp_path / "ext2")]) == 0
    reused, given = (load_file(str(tmp_path / name / "latents.safetensors"))["latents"] for name in ("ext", "ext2"))
    assert torch.equal(reused, given) and reused.shape[1] == 3 * made.shape[1] // 2
