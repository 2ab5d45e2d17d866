"""The Shapes retraining command end to end on a handful of clips (seconds): data, VAE, base folder,
`mask2dit precompute` and `mask2dit train` for both stages, the assembled diffusers folder."""

import json
import os

import numpy as np
import torch

from diffusers_mask2dit.shapes import model as shapes_model
from diffusers_mask2dit.shapes import retrain, world


def test_retrain_smoke_run_builds_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    timings = retrain.retrain(str(out), variants=["v2", "v1"], recipe=retrain.Recipe.smoke(), in_process=True)
    for step in ("data", "vae", "base", "precompute pretrain", "precompute sft", "train pretrain", "train sft v2",
                 "assemble v2", "train sft v1", "assemble v1"):
        assert step in timings
    with open(out / "configs" / "train-sft-v1.json") as handle:
        sft = json.load(handle)
    assert sft["stage"] == "sft" and sft["cond_prob"] == 0.5 and sft["mask_variant"] == "v1"
    assert sft["transformer_path"].endswith(os.path.join("train", "pretrain", "transformer"))
    with open(out / "vae" / "vae_report.json") as handle:
        assert json.load(handle)["held_out_clips"] == 2

    pipe = shapes_model.load_pipeline(str(out / "model-v2"))
    assert pipe.transformer.config.attn_mask_variant == "v2"
    assert pipe.transformer.config.max_text_seq_length == shapes_model.MAX_SEQUENCE_LENGTH
    prompts = world.all_prompts()[:3]
    result = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="np",
                  **shapes_model.generation_kwargs(num_inference_steps=2))
    assert len(result.scene_frames[0]) == 3
    assert result.scene_frames[0][0].shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3)
    assert np.isfinite(result.frames).all()

    # A second call finds every step done and changes nothing.
    before = sorted(os.listdir(out / "train"))
    assert retrain.retrain(str(out), variants=["v2"], recipe=retrain.Recipe.smoke(), in_process=True) == timings
    assert sorted(os.listdir(out / "train")) == before

    installed = retrain.install(str(out / "model-v2"), str(tmp_path / "installed"))
    files = [os.path.join(r, f) for r, _, fs in os.walk(installed) for f in fs]
    assert all(f.endswith((".json", ".safetensors")) for f in files)
    assert any(f.endswith(os.path.join("transformer", "diffusion_pytorch_model.safetensors")) for f in files)


def test_tokenizer_reads_every_world_word_as_one_piece():
    tokenizer = shapes_model.build_tokenizer()
    for prompt in world.all_prompts():
        ids = tokenizer(prompt, padding="max_length", max_length=shapes_model.MAX_SEQUENCE_LENGTH).input_ids
        pieces = tokenizer.convert_ids_to_tokens(ids)
        assert pieces[:6] == ["\u2581" + word for word in prompt.split()] + ["</s>"]
        assert tokenizer.unk_token_id not in ids
