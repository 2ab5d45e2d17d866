"""Every way a user loads Mask2DiTPipeline, plus LoRA, on tiny random models saved to disk (offline)."""

import json
import os
import shutil

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel, DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import diffusers_mask2dit
from diffusers_mask2dit import Mask2DiTPipeline, Mask2DiTTransformer3DModel, custom_pipeline
from diffusers_mask2dit.tiny import build_tiny_components, build_tiny_tokenizer, save_tiny_cogvideox

PROMPTS = ["a cat walks on the beach", "a dog runs through the grass"]
CUSTOM_PIPELINE_FOLDER = custom_pipeline.FOLDER


def latents_of(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    options = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    return pipe(PROMPTS, **{**options, **kwargs}).frames


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny") / "cogvideox-5b", style="5b")


@pytest.fixture(scope="module")
def reference(stock_folder):
    """The latents of the pipeline built straight from the components."""
    return latents_of(Mask2DiTPipeline(**build_tiny_components("5b")))


def test_tiny_components_are_deterministic_and_cogvideox_shaped():
    first, second = build_tiny_components("5b", seed=0), build_tiny_components("5b", seed=0)
    for name in ("text_encoder", "vae", "transformer"):
        for a, b in zip(first[name].state_dict().values(), second[name].state_dict().values()):
            assert torch.equal(a, b)
    other = build_tiny_components("5b", seed=1)["transformer"].state_dict()
    assert not all(torch.equal(a, b) for a, b in zip(first["transformer"].state_dict().values(), other.values()))
    vae, transformer, scheduler = first["vae"], first["transformer"], first["scheduler"]
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.temporal_compression_ratio == 4
    assert transformer.config.in_channels == vae.config.latent_channels
    assert transformer.config.text_embed_dim == first["text_encoder"].config.d_model
    assert transformer.config.use_rotary_positional_embeddings and transformer.config.patch_size_t is None
    assert not build_tiny_components("2b")["transformer"].config.use_rotary_positional_embeddings
    assert build_tiny_components("1.5")["transformer"].config.patch_size_t == 2
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="`style` must be one of"):
        build_tiny_components("7b")


def test_tiny_tokenizer_is_a_t5_tokenizer_with_real_pieces(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path)
    assert type(tokenizer).__name__.startswith("T5Tokenizer") and 200 <= len(tokenizer) <= 500
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("A cat walks on the beach at sunset!").input_ids
    assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
    assert os.path.isfile(tmp_path / "spiece.model")
    assert type(tokenizer).from_pretrained(tmp_path)("a dog").input_ids == tokenizer("a dog").input_ids


def test_from_pretrained_on_a_cogvideox_folder(stock_folder, reference):
    pipe = Mask2DiTPipeline.from_pretrained(stock_folder)
    assert type(pipe) is Mask2DiTPipeline and isinstance(pipe.transformer, Mask2DiTTransformer3DModel)
    torch.testing.assert_close(latents_of(pipe), reference, atol=1e-6, rtol=0)


def test_diffusion_pipeline_with_the_custom_pipeline_folder(stock_folder, reference):
    assert CUSTOM_PIPELINE_FOLDER == os.path.join(os.path.dirname(diffusers_mask2dit.__file__), "custom_pipeline")
    assert os.path.isfile(os.path.join(CUSTOM_PIPELINE_FOLDER, "pipeline.py"))
    pipe = DiffusionPipeline.from_pretrained(stock_folder, custom_pipeline=CUSTOM_PIPELINE_FOLDER, trust_remote_code=True)
    assert type(pipe).__name__ == "Mask2DiTPipeline" and isinstance(pipe.transformer, Mask2DiTTransformer3DModel)
    torch.testing.assert_close(latents_of(pipe), reference, atol=1e-6, rtol=0)


def test_authors_layout_without_model_index(stock_folder, reference, tmp_path):
    folder = tmp_path / "Mask2DiT"
    shutil.copytree(stock_folder, folder)
    os.remove(folder / "model_index.json")
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="CogVideoXTransformer3DModelMask2DiT", attn_msk_version=3)
    config_path.write_text(json.dumps(config))

    for pipe in (Mask2DiTPipeline.from_pretrained(folder), Mask2DiTPipeline.from_official(folder)):
        assert isinstance(pipe.transformer, Mask2DiTTransformer3DModel)
        assert pipe.transformer.config.attn_mask_variant == "v3"  # read from the authors' `attn_msk_version`
        assert type(pipe.scheduler).__name__ == "CogVideoXDDIMScheduler"
    torch.testing.assert_close(latents_of(pipe, attention_kwargs={"scene_mask": "v2"}), reference, atol=1e-6, rtol=0)


def test_authors_hub_id_from_the_local_cache_offline(stock_folder, reference, tmp_path):
    """`from_pretrained("qth/Mask2DiT")` with no model_index.json in the (here fake, offline) Hub cache."""
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--qth--Mask2DiT"
    shutil.copytree(stock_folder, repo / "snapshots" / commit)
    os.remove(repo / "snapshots" / commit / "model_index.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = Mask2DiTPipeline.from_pretrained("qth/Mask2DiT", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    assert isinstance(pipe.transformer, Mask2DiTTransformer3DModel)
    torch.testing.assert_close(latents_of(pipe), reference, atol=1e-6, rtol=0)


def test_save_pretrained_round_trip_keeps_weights_and_mask(stock_folder, reference, tmp_path):
    pipe = Mask2DiTPipeline.from_pretrained(stock_folder)
    pipe.transformer.register_to_config(attn_mask_variant="v1")
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "Mask2DiTPipeline"
    assert index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]  # still a CogVideoX checkpoint

    reloaded = Mask2DiTPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.transformer.config.attn_mask_variant == "v1"
    torch.testing.assert_close(latents_of(reloaded, attention_kwargs={"scene_mask": "v2"}), reference, atol=1e-6, rtol=0)
    custom = DiffusionPipeline.from_pretrained(tmp_path / "saved", custom_pipeline=CUSTOM_PIPELINE_FOLDER,
                                               trust_remote_code=True)
    assert type(custom).__name__ == "Mask2DiTPipeline"
    plain = CogVideoXPipeline.from_pretrained(tmp_path / "saved")
    assert type(plain.transformer) is CogVideoXTransformer3DModel


def test_lora_load_set_adapters_and_fuse(tmp_path):
    source = Mask2DiTPipeline(**build_tiny_components("5b"))
    torch.manual_seed(1)
    lora_config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)  # random B: the LoRA changes the output
    source.transformer.add_adapter(lora_config)
    expected = latents_of(source)
    Mask2DiTPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(source.transformer))

    pipe = Mask2DiTPipeline(**build_tiny_components("5b"))
    base = latents_of(pipe)
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    with_lora = latents_of(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, expected, atol=1e-6, rtol=0)
    half = latents_of(pipe, attention_kwargs={"scale": 0.5})
    assert (half - base).abs().max() > 1e-4 and (half - with_lora).abs().max() > 1e-4

    pipe.set_adapters(["style"], [0.0])
    torch.testing.assert_close(latents_of(pipe), base, atol=1e-6, rtol=0)
    pipe.set_adapters(["style"], [1.0])
    pipe.fuse_lora()
    torch.testing.assert_close(latents_of(pipe), with_lora, atol=1e-4, rtol=0)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(latents_of(pipe), base, atol=1e-4, rtol=0)
