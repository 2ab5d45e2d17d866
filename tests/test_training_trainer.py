"""The training loop on a tiny CogVideoX: learning, clipping, checkpoints and resume, NaN stop, outputs.

Most runs read a float32 latent cache (`mask2dit precompute`) so that a step costs a fraction of a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from diffusers_mask2dit.cli import main as cli_main
from diffusers_mask2dit.training import precompute, train
from diffusers_mask2dit.training.data import EpochShuffleSampler
from diffusers_mask2dit.training.precompute import INDEX_NAME, LATENT_FOLDER, open_cache
from diffusers_mask2dit.training.trainer import apply_deepspeed_gradient_clipping, list_checkpoints
from test_training_fixtures import assert_tensor_dicts_close, lora_tensors, tiny_config, write_sft_jsonl


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; runs in one test process may differ."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny CogVideoX folder, SFT data (one video, six videos) and their float32 latent caches."""
    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    root = tmp_path_factory.mktemp("training")
    model = save_tiny_cogvideox(str(root / "model"))
    one = root / "one"
    six = root / "six"
    one.mkdir()
    six.mkdir()
    paths = {
        "root": root,
        "model": model,
        "one": write_sft_jsonl(str(one), num_videos=1, shots=2, frames=9),
        "six": write_sft_jsonl(str(six), num_videos=6, shots=2, frames=12),
    }
    for name in ("one", "six"):
        paths[f"cache_{name}"] = str(root / f"cache_{name}")
    # One cache through the `mask2dit precompute` command, one through the Python API.
    config_path = root / "precompute.json"
    config_path.write_text(json.dumps({"pretrained_model_name_or_path": model, "data_file": paths["one"], "num_scenes": 2}))
    assert cli_main(["precompute", "--config", str(config_path), "--cache_dir", paths["cache_one"], "--cache_dtype", "float32",
                     "--frames_per_scene", "9", "--height", "64", "--width", "64"]) == 0
    precompute(tiny_config(model, str(root / "unused"), data_file=paths["six"], cache_dir=paths["cache_six"], cache_dtype="float32"))
    return paths


def _cached(workspace, name, output_dir, **overrides):
    return tiny_config(workspace["model"], str(output_dir), cache_dir=workspace[f"cache_{name}"], **overrides)


def _eval_loss(transformer, config, seeds=range(1000, 1008)):
    """Mean loss of ``transformer`` on the first cached sample over fixed seeds (fixed timesteps and noise)."""
    from diffusers import CogVideoXDPMScheduler

    from diffusers_mask2dit.training.data import MultiSceneDataset, collate_scenes
    from diffusers_mask2dit.training.loss import prepare_diffusion_batch, training_loss

    records, source = open_cache(config)
    dataset = MultiSceneDataset(records, source, config.stage, config.num_scenes, config.scene_frames, config.seed)
    batch = collate_scenes([dataset[0]] * len(seeds))
    cat = lambda key: torch.cat(batch[key], dim=1)  # noqa: E731
    scheduler = CogVideoXDPMScheduler.from_pretrained(config.pretrained_model_name_or_path, subfolder="scheduler")
    scene_frames = [m.shape[1] for m in batch["latent_mean"]]
    diffusion = prepare_diffusion_batch(cat("latent_mean"), cat("latent_std"), scene_frames, torch.tensor(list(seeds)), scheduler, 0.0)
    with torch.no_grad():
        return float(training_loss(transformer.eval(), diffusion, cat("prompt_embeds"), "v2"))


def _base_transformer(config):
    from diffusers_mask2dit.training.trainer import load_transformer

    return load_transformer(config)


def test_overfitting_one_two_scene_sample_lowers_the_loss(workspace, tmp_path):
    config = _cached(workspace, "one", tmp_path / "out", finetune="full", max_train_steps=24, learning_rate=3e-3, cond_prob=0.0)
    before = _eval_loss(_base_transformer(config), config)
    result = train(config)
    after = _eval_loss(result.transformer, config)
    assert after < 0.8 * before, (before, after)


def test_training_from_cache_equals_training_from_videos(workspace, tmp_path):
    # 9-frame clips leave no choice of frame window, so the cache holds exactly what online encoding computes.
    online = tiny_config(workspace["model"], str(tmp_path / "online"), data_file=workspace["one"], max_train_steps=2, cond_prob=1.0)
    cached = _cached(workspace, "one", tmp_path / "cached", max_train_steps=2, cond_prob=1.0)
    train(online)
    train(cached)
    assert_tensor_dicts_close(lora_tensors(online.output_dir), lora_tensors(cached.output_dir), atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_training(workspace, tmp_path):
    plain = _cached(workspace, "one", tmp_path / "plain", max_train_steps=2, cond_prob=1.0)
    checkpointed = _cached(workspace, "one", tmp_path / "checkpointed", max_train_steps=2, cond_prob=1.0, gradient_checkpointing=True)
    train(plain)
    train(checkpointed)
    weights = lora_tensors(checkpointed.output_dir)
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)
    assert_tensor_dicts_close(lora_tensors(plain.output_dir), weights, atol=1e-6, rtol=1e-5)


def test_bf16_mixed_precision_keeps_adapters_in_fp32(workspace, tmp_path):
    config = _cached(workspace, "one", tmp_path / "out", mixed_precision="bf16", max_train_steps=1)
    model = train(config).transformer
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name)
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if "lora_" not in name)


def test_gradient_clipping_is_applied(workspace, tmp_path):
    # With a large Adam epsilon the update is proportional to the gradient, so clipping must shrink it.
    def update_norm(max_grad_norm, name):
        config = _cached(
            workspace, "one", tmp_path / name, finetune="full", max_train_steps=1, learning_rate=1e-2,
            adam_epsilon=1.0, max_grad_norm=max_grad_norm, cond_prob=0.0,
        )
        base = _base_transformer(config).state_dict()
        trained = train(config).transformer.state_dict()
        return torch.sqrt(sum(((trained[k].float() - base[k].float()) ** 2).sum() for k in base))

    unclipped = update_norm(0.0, "unclipped")
    clipped = update_norm(1e-3, "clipped")
    assert unclipped > 0
    assert clipped < 0.2 * unclipped, (clipped, unclipped)


def test_resume_continues_exactly(workspace, tmp_path, caplog):
    # 6 samples, batch 1, 2 accumulation steps: 3 optimizer steps per epoch; checkpoint-2 is mid-epoch.
    common = dict(
        max_train_steps=4, gradient_accumulation_steps=2, checkpointing_steps=2, checkpoints_total_limit=None,
        lr_scheduler="linear", lr_warmup_steps=1, lora_dropout=0.1, cond_prob=0.5, learning_rate=3e-3,
    )
    straight = _cached(workspace, "six", tmp_path / "straight", **common)
    train(straight)
    assert [step for step, _ in list_checkpoints(straight.output_dir)] == [2, 4]

    # An interrupted run: its output folder holds only checkpoint-2 (and a stale temporary folder).
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(os.path.join(straight.output_dir, "checkpoint-2"), resumed_dir / "checkpoint-2")
    (resumed_dir / ".tmp-checkpoint-3").mkdir()
    resumed = _cached(workspace, "six", resumed_dir, resume_from_checkpoint="latest", **common)
    marker = resumed_dir / "checkpoint-2" / "training_progress.json"
    written = marker.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        result = train(resumed)
    assert result.global_step == 4
    assert "Resumed from" in caplog.text and "at step 2" in caplog.text
    assert marker.stat().st_mtime_ns == written  # steps 1-2 were not trained (and checkpointed) again
    assert [step for step, _ in list_checkpoints(resumed.output_dir)] == [2, 4]
    assert not (resumed_dir / ".tmp-checkpoint-3").exists()
    assert_tensor_dicts_close(lora_tensors(straight.output_dir), lora_tensors(resumed.output_dir))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workspace, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    # Poison the cached latents of the second sample of epoch 0.
    cache = str(tmp_path / "cache")
    shutil.copytree(workspace["cache_six"], cache)
    config = _cached(workspace, "six", tmp_path / "out", checkpointing_steps=1, checkpoints_total_limit=2, max_train_steps=5)
    config.cache_dir = cache
    records, source = open_cache(config)
    poisoned = records[list(EpochShuffleSampler(len(records), config.seed))[1]][1]
    path = os.path.join(cache, LATENT_FOLDER, source.files[(poisoned.video, poisoned.caption)]["9"])
    tensors = load_file(path)
    tensors["latent_mean"] = torch.full_like(tensors["latent_mean"], float("nan"))
    save_file(tensors, path)

    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(config.to_dict()))
    assert cli_main(["train", "--config", str(config_path)]) == 1
    message = capsys.readouterr().err
    assert "loss became [nan]" in message and "checkpoint-1" in message
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [1]
    assert not os.path.exists(os.path.join(config.output_dir, "pytorch_lora_weights.safetensors"))
    assert not [name for name in os.listdir(config.output_dir) if name.startswith(".tmp")]


def test_checkpoints_keep_only_the_newest(workspace, tmp_path):
    config = _cached(workspace, "one", tmp_path / "out", checkpointing_steps=1, checkpoints_total_limit=2, max_train_steps=3)
    train(config)
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [2, 3]
    assert not [name for name in os.listdir(config.output_dir) if name.startswith(".tmp")]


def test_lora_round_trip_through_the_pipeline(workspace, tmp_path):
    from diffusers_mask2dit import Mask2DiTPipeline

    # alpha != rank: the loaded adapter must be scaled by alpha / rank exactly as in training.
    config = _cached(
        workspace, "one", tmp_path / "out", lora_rank=4, lora_alpha=16.0, max_train_steps=3, learning_rate=1e-2,
        validation_prompts=[["A cat walks on the beach.", "The cat sleeps."]], validation_steps=3,
        validation_num_inference_steps=2,
    )
    result = train(config)
    assert result.weights_path == config.output_dir

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 6, 4, 8, 8, generator=generator)
    embeds = torch.randn(1, 2 * 226, 32, generator=generator)
    timestep = torch.tensor([[0, 700]])

    def run(transformer):
        with torch.no_grad():
            return transformer.eval()(latents, embeds, timestep, scene_frames=[3, 3]).sample

    pipe = Mask2DiTPipeline.from_pretrained(workspace["model"])
    base = run(pipe.transformer)
    pipe.load_lora_weights(config.output_dir)
    loaded = run(pipe.transformer)
    trained = run(result.transformer)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
    assert (trained - base).abs().max() > 1e-3  # the adapter does something

    card = open(os.path.join(config.output_dir, "README.md"), encoding="utf-8").read()
    assert "LoRA rank / alpha | 4 / 16.0" in card and "load_lora_weights" in card
    # The run's options travel with the weights, for `mask2dit hub build`'s card (never local paths).
    from pathlib import Path

    from diffusers_mask2dit.hub.build import read_training_config

    recorded = read_training_config(Path(config.output_dir))
    assert recorded["lora_rank"] == 4 and recorded["lora_alpha"] == 16 and recorded["finetune"] == "lora"
    assert not any(str(tmp_path) in str(value) for value in recorded.values())
    validation = os.path.join(config.output_dir, "validation", "step-000003")
    assert sorted(os.listdir(validation)) == ["prompt-0.mp4", "prompt-0.png"]


def test_full_finetune_saves_a_transformer_folder_the_pipeline_loads(workspace, tmp_path):
    from diffusers_mask2dit import Mask2DiTPipeline, Mask2DiTTransformer3DModel

    config = _cached(workspace, "one", tmp_path / "out", finetune="full", max_train_steps=1, learning_rate=1e-3)
    result = train(config)
    assert result.weights_path == os.path.join(config.output_dir, "transformer")
    assert os.path.isfile(os.path.join(result.weights_path, "diffusion_pytorch_model.safetensors"))
    loaded = Mask2DiTTransformer3DModel.from_pretrained(config.output_dir, subfolder="transformer")
    for key, value in result.transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pipe = Mask2DiTPipeline.from_pretrained(workspace["model"], transformer=loaded)
    assert pipe.transformer is loaded
    assert "fine-tuned transformer" in open(os.path.join(config.output_dir, "README.md"), encoding="utf-8").read()


def test_unreadable_videos_are_skipped_during_training(workspace, tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    data = write_sft_jsonl(str(root), num_videos=2, shots=2, frames=9)
    (root / "v1_s1.mp4").write_bytes(b"not a video")  # found on disk, fails only when decoded
    config = tiny_config(workspace["model"], str(tmp_path / "out"), data_file=data, max_train_steps=2)
    with caplog.at_level(logging.WARNING):
        result = train(config)
    assert result.global_step == 2
    assert "could not be loaded" in caplog.text and "v1_s1.mp4" in caplog.text


@pytest.mark.parametrize("style", ["2b", "1.5"])
def test_other_cogvideox_styles_train(workspace, tmp_path, style):
    # 2b: sincos positions; 1.5: two latent frames per patch, scenes of 3 latent frames padded to 4.
    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    model = save_tiny_cogvideox(str(tmp_path / "model"), style=style)
    config = tiny_config(model, str(tmp_path / "out"), data_file=workspace["one"], max_train_steps=1, cond_prob=1.0)
    assert train(config).global_step == 1
    assert os.path.isfile(os.path.join(config.output_dir, "pytorch_lora_weights.safetensors"))


def test_cache_settings_must_match_the_config(workspace, tmp_path):
    config = _cached(workspace, "one", tmp_path / "out", height=32, width=32)
    with pytest.raises(ValueError, match="height"):
        open_cache(config)
    config = _cached(workspace, "one", tmp_path / "out", frames_per_scene=[17])
    with pytest.raises(ValueError, match="frames_per_scene"):
        open_cache(config)
    missing = tiny_config(workspace["model"], str(tmp_path / "out"), cache_dir=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="precompute"):
        open_cache(missing)
    assert os.path.isfile(os.path.join(workspace["cache_one"], INDEX_NAME))
    other_seed = tiny_config(workspace["model"], str(tmp_path / "out"), data_file=workspace["one"], cache_dir=workspace["cache_one"], cache_dtype="float32", seed=7)
    with pytest.raises(ValueError, match="seed"):
        precompute(other_seed)  # would mix frame windows of two seeds in one cache


def test_deepspeed_gets_the_configured_clip_value():
    ds_config = {"gradient_clipping": "auto"}
    apply_deepspeed_gradient_clipping(ds_config, 0.5)
    assert ds_config["gradient_clipping"] == 0.5
    ds_config = {}
    apply_deepspeed_gradient_clipping(ds_config, 1.0)
    assert ds_config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        apply_deepspeed_gradient_clipping({"gradient_clipping": 1.0}, 0.3)
