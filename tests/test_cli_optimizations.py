"""The memory and speed switches and the diffusers-style knobs of `mask2dit generate / extend / demo`, through the
command-line entry point on a tiny random model (CPU, offline): each reaches the pipeline, is recorded in
settings.json and reused by `extend --from`. Bad values are in test_bad_inputs_cli.py's table."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusers_mask2dit import Mask2DiTPipeline, attention, cli
from diffusers_mask2dit.generate import cli as generate_cli
from diffusers_mask2dit.optimization import apply_optimizations
from diffusers_mask2dit.tiny import save_tiny_cogvideox

TINY_ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--frames", "9", "--device", "cpu", "--seed", "3"]
PROMPTS = ["a cat walks on the beach", "the cat sleeps"]
QUANTIZED_WEIGHT = "transformer_blocks.0.attn1.to_q.weight"  # a linear layer the recipes convert
KEPT_WEIGHT = "transformer_blocks.0.norm1.linear.weight"  # a norm's modulation: kept in its dtype


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def loaded(monkeypatch):
    """The pipelines the commands load, in order."""
    pipes = []

    def keep(*args, **kwargs):
        pipes.append(load_pipeline(*args, **kwargs))
        return pipes[-1]

    load_pipeline = generate_cli.load_pipeline
    monkeypatch.setattr(generate_cli, "load_pipeline", keep)
    return pipes


@pytest.fixture
def dense_calls(monkeypatch):
    """Counts the calls of the registered ``dense`` attention backend."""
    calls = []
    dense = attention.get_attention_backend("dense")

    def counted(*args):
        calls.append(1)
        return dense.attend(*args)

    monkeypatch.setitem(attention._ATTENTION_BACKENDS, "dense", attention.AttentionBackend(name="dense", attend=counted))
    return calls


def latents_of(folder):
    return load_file(os.path.join(folder, "latents.safetensors"))["latents"]


def settings_of(folder):
    with open(os.path.join(folder, "settings.json"), encoding="utf-8") as handle:
        return json.load(handle)


SWITCHES = ["--quantize", "fp8-layerwise", "--cache", "first-block:0.3", "--vae-slicing", "--vae-tiling",
            "--attention-backend", "dense", "--max-sequence-length", "8", "--compile", "off"]


def test_switches_reach_the_pipeline_and_equal_the_python_helper(model, loaded, dense_calls, tmp_path):
    base = ["generate", "--model", model, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance", "1"] + TINY_ARGS
    assert cli.main(base + SWITCHES + ["--out", str(tmp_path / "fast")]) == 0
    pipe = loaded[-1]
    weights = dict(pipe.transformer.named_parameters())
    assert weights[QUANTIZED_WEIGHT].dtype == torch.float8_e4m3fn  # stored in fp8 ...
    assert weights[KEPT_WEIGHT].dtype == torch.float32  # ... but not the scene-aware norms
    assert pipe.transformer.is_cache_enabled and pipe.vae.use_slicing and pipe.vae.use_tiling
    assert dense_calls  # the attention backend asked for ran
    recorded = settings_of(tmp_path / "fast")
    assert recorded["quantize"] == "fp8-layerwise" and recorded["cache"] == "first-block:0.3"
    assert recorded["attention_backend"] == "dense" and recorded["max_sequence_length"] == 8 and recorded["vae_tiling"]

    # the same as the Python API with `apply_optimizations` and the same call arguments
    reference = Mask2DiTPipeline.from_pretrained(model)
    apply_optimizations(reference, quantize="fp8-layerwise", cache="first-block:0.3", vae_slicing=True, vae_tiling=True)
    call = dict(prompt=PROMPTS, num_frames=9, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                output_type="latent", max_sequence_length=8, attention_kwargs={"attention_backend": "dense"})
    expected = reference(generator=torch.Generator().manual_seed(3), **call).frames
    assert torch.equal(latents_of(tmp_path / "fast"), expected)
    plain = Mask2DiTPipeline.from_pretrained(model)(generator=torch.Generator().manual_seed(3), **call).frames
    assert (expected - plain).abs().max() > 0  # the switches change the computation (fp8 weights)

    # `extend --from` reuses every switch the folder recorded; one given on its command line wins
    assert cli.main(["extend", "--model", model, "--from", str(tmp_path / "fast"), "--prompt", "a bird flies",
                     "--cache", "none", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "more")]) == 0
    pipe = loaded[-1]
    assert dict(pipe.transformer.named_parameters())[QUANTIZED_WEIGHT].dtype == torch.float8_e4m3fn
    assert not pipe.transformer.is_cache_enabled and pipe.vae.use_tiling
    recorded = settings_of(tmp_path / "more")
    assert recorded["quantize"] == "fp8-layerwise" and recorded["cache"] == "none"
    assert recorded["attention_backend"] == "dense" and recorded["max_sequence_length"] == 8


def test_extend_from_an_older_folder_takes_the_defaults(model, loaded, tmp_path):
    """A settings.json written before these switches existed: extend runs without any of them."""
    base = ["generate", "--model", model, "--prompt", PROMPTS[0], "--guidance", "1"] + TINY_ARGS
    assert cli.main(base + ["--out", str(tmp_path / "old")]) == 0
    recorded = settings_of(tmp_path / "old")
    assert recorded["quantize"] == "none" and recorded["compile"] == "off" and recorded["lora"] is None
    old = {name: value for name, value in recorded.items() if name not in ("quantize", "cache", "compile", "offload")}
    (tmp_path / "old" / "settings.json").write_text(json.dumps(old))
    assert cli.main(["extend", "--from", str(tmp_path / "old"), "--prompt", "a bird", "--steps", "1", "--device",
                     "cpu", "--out", str(tmp_path / "new")]) == 0
    assert not loaded[-1].transformer.is_cache_enabled
    assert settings_of(tmp_path / "new")["quantize"] == "none"


def _random_lora(model, folder, seed):
    """A LoRA with random (non-zero) weights on the attention projections, saved as diffusers saves one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = Mask2DiTPipeline.from_pretrained(model)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    Mask2DiTPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return str(folder)


def test_several_loras_with_their_scales(model, tmp_path):
    loras = [_random_lora(model, tmp_path / name, seed) for seed, name in enumerate(("a", "b"))]
    base = ["generate", "--model", model, "--prompt", PROMPTS[0], "--guidance", "1"] + TINY_ARGS
    two = base + ["--lora", loras[0], "--lora", loras[1], "--lora-scale", "0.5", "--lora-scale", "1.5"]
    assert cli.main(two + ["--out", str(tmp_path / "two")]) == 0
    assert cli.main(base + ["--lora", loras[0], "--out", str(tmp_path / "one")]) == 0

    pipe = Mask2DiTPipeline.from_pretrained(model)
    call = dict(prompt=PROMPTS[:1], num_frames=9, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                output_type="latent")
    pipe.load_lora_weights(loras[0], adapter_name="a")
    pipe.load_lora_weights(loras[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 1.5])
    both = pipe(generator=torch.Generator().manual_seed(3), **call).frames
    pipe.set_adapters(["a"], [1.0])
    first = pipe(generator=torch.Generator().manual_seed(3), **call).frames
    assert torch.equal(latents_of(tmp_path / "two"), both) and torch.equal(latents_of(tmp_path / "one"), first)
    assert (both - first).abs().max() > 1e-4
    recorded = settings_of(tmp_path / "two")
    assert recorded["lora"] == [os.path.abspath(path) for path in loras] and recorded["lora_scale"] == [0.5, 1.5]
