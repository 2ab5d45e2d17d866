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
    recipe = retrain.Recipe.smoke()
    timings = retrain.retrain(str(out), variants=["shipped", "v1", "stock"], recipe=recipe, in_process=True)
    for step in ("data", "vae", "base", "precompute pretrain", "precompute sft", "train pretrain", "train sft shipped",
                 "assemble shipped", "train sft v1", "assemble v1", "train stock", "assemble stock"):
        assert step in timings
    configs = {}
    for name in ("shipped", "v1"):
        with open(out / "configs" / f"train-sft-{name}.json") as handle:
            configs[name] = json.load(handle)
        assert configs[name]["stage"] == "sft" and configs[name]["cond_prob"] == 0.5
        assert configs[name]["transformer_path"].endswith(os.path.join("train", "pretrain", "transformer"))
    # The ablation's variants get the equal budget; the shipped model is the v2 mask trained longer.
    assert configs["v1"]["mask_variant"] == "v1" and configs["v1"]["max_train_steps"] == recipe.sft["max_train_steps"]
    assert configs["shipped"]["mask_variant"] == "v2" and configs["shipped"]["max_train_steps"] == recipe.shipped_sft_steps
    # The stock model: stage 1's settings and cache on single clips, from the random transformer.
    with open(out / "configs" / "train-stock.json") as handle:
        stock = json.load(handle)
    assert stock["num_scenes"] == 1 and stock["stage"] == "pretrain" and "transformer_path" not in stock
    assert stock["cache_dir"] == str(out / "cache" / "pretrain") and stock["max_train_steps"] == recipe.pretrain["max_train_steps"]
    assert shapes_model.load_pipeline(str(out / "model-stock")).transformer.config.num_layers == 4
    with open(out / "vae" / "vae_report.json") as handle:
        assert json.load(handle)["held_out_clips"] == 2

    pipe = shapes_model.load_pipeline(str(out / "model-shipped"))
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
    assert retrain.retrain(str(out), variants=["shipped"], recipe=retrain.Recipe.smoke(), in_process=True) == timings
    assert sorted(os.listdir(out / "train")) == before

    installed = retrain.install(str(out / "model-shipped"), str(tmp_path / "installed"))
    files = [os.path.join(r, f) for r, _, fs in os.walk(installed) for f in fs]
    assert all(f.endswith((".json", ".safetensors")) for f in files)
    assert any(f.endswith(os.path.join("transformer", "diffusion_pytorch_model.safetensors")) for f in files)
    for name in files:  # no local path of the training machine is shipped
        if name.endswith(".json"):
            with open(name) as handle:
                assert str(tmp_path) not in handle.read(), name


def test_tokenizer_reads_every_world_word_as_one_piece():
    tokenizer = shapes_model.build_tokenizer()
    for prompt in world.all_prompts():
        ids = tokenizer(prompt, padding="max_length", max_length=shapes_model.MAX_SEQUENCE_LENGTH).input_ids
        pieces = tokenizer.convert_ids_to_tokens(ids)
        assert pieces[:6] == ["\u2581" + word for word in prompt.split()] + ["</s>"]
        assert tokenizer.unk_token_id not in ids
