"""`diffusers_mask2dit.optimization`: the recipes on a 3-scene v2 pipeline (tiny model, CPU), the command-line
switches on a bare parser, and the clear refusals for what this machine cannot run."""

import argparse

import pytest
import torch

from diffusers_mask2dit import Mask2DiTAttnProcessor, Mask2DiTPipeline
from diffusers_mask2dit.optimization import (
    SKIP_MODULE_PATTERNS,
    add_optimization_arguments,
    apply_optimizations,
    optimizations_from_args,
    pipeline_quantization_config,
)
from diffusers_mask2dit.tiny import build_tiny_components

PROMPTS = ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the ocean"]
HAS_ACCELERATOR = torch.cuda.is_available()


def _pipe(dtype=torch.float32):
    pipe = Mask2DiTPipeline(**build_tiny_components("5b")).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, mask="v2"):
    return pipe(
        prompt=PROMPTS, num_frames=9, height=64, width=64, num_inference_steps=3, output_type="latent",
        generator=torch.Generator().manual_seed(0), attention_kwargs={"scene_mask": mask},
    ).frames.float()


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference():
    pipe = _pipe(torch.bfloat16)
    return {"v2": _latents(pipe), "full": _latents(pipe, "full")}


@pytest.mark.parametrize("quantize", ["int8", "fp8", "fp8-layerwise"])
def test_quantized_3_scene_result_stays_close_and_keeps_the_mask(quantize, reference):
    pytest.importorskip("torchao") if quantize != "fp8-layerwise" else None
    pipe = apply_optimizations(_pipe(torch.bfloat16), quantize=quantize)
    quantized, quantized_full = _latents(pipe), _latents(pipe, "full")
    error = _relative_error(quantized, reference["v2"])
    # close to the unquantized v2 result, nearer to it than to the unmasked result ...
    assert error < 0.05 and error < _relative_error(quantized, reference["full"]), error
    # ... and the mask still changes the result as much as without quantization
    mask_effect = _relative_error(reference["full"], reference["v2"])
    assert 0.5 < _relative_error(quantized_full, quantized) / mask_effect < 2


def test_quantization_skips_every_module_this_package_makes_scene_aware():
    pytest.importorskip("torchao")
    pipe = apply_optimizations(_pipe(torch.bfloat16), quantize="int8")
    weights = {name: type(module.weight).__name__ for name, module in pipe.transformer.named_modules()
               if isinstance(module, torch.nn.Linear)}
    kept = [name for name in weights if any(f"{p}." in f"{name}." for p in SKIP_MODULE_PATTERNS)]
    assert any(".norm1." in name for name in kept) and any("norm_out" in name for name in kept)
    assert all(weights[name] in ("Parameter", "Tensor") for name in kept)
    assert weights["transformer_blocks.0.attn1.to_q"] not in ("Parameter", "Tensor")


def test_layerwise_casting_stores_float8_except_the_skipped_modules():
    pipe = apply_optimizations(_pipe(torch.bfloat16), quantize="fp8-layerwise")
    transformer = pipe.transformer
    assert transformer.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert transformer.transformer_blocks[0].norm1.linear.weight.dtype == torch.bfloat16
    assert transformer.norm_out.linear.weight.dtype == torch.bfloat16
    assert transformer.transformer_blocks[0].attn1.norm_q.weight.dtype == torch.bfloat16
    assert transformer.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.float8_e4m3fn


def test_torchao_load_time_config_quantizes_while_loading(tmp_path):
    pytest.importorskip("torchao")
    _pipe(torch.bfloat16).save_pretrained(tmp_path)
    pipe = Mask2DiTPipeline.from_pretrained(
        tmp_path, quantization_config=pipeline_quantization_config("int8"), torch_dtype=torch.bfloat16
    )
    weight = pipe.transformer.transformer_blocks[0].attn1.to_q.weight
    assert type(weight).__name__ not in ("Parameter", "Tensor")
    assert type(pipe.transformer.norm_out.linear.weight).__name__ == "Parameter"


class CountingProcessor(Mask2DiTAttnProcessor):
    calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 scene_layout=None, scene_options=None, scene_shard=None):
        CountingProcessor.calls += 1
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                scene_layout, scene_options, scene_shard)


def _counted_run(cache):
    pipe = _pipe()
    pipe.transformer.set_attn_processor(CountingProcessor())
    apply_optimizations(pipe, cache=cache)
    CountingProcessor.calls = 0
    latents = pipe(
        prompt=PROMPTS, num_frames=9, height=64, width=64, num_inference_steps=6, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    return latents, CountingProcessor.calls


def test_first_block_cache_skips_blocks_and_stays_close():
    plain, plain_calls = _counted_run("none")
    cached, cached_calls = _counted_run("first-block:0.3")
    assert plain_calls == 2 * 6 and cached_calls < plain_calls  # 2 blocks x 6 steps; the cache skipped some
    assert _relative_error(cached, plain) < 0.05


def test_taylorseer_caches_every_blocks_attention():
    """diffusers' default TaylorSeer patterns miss CogVideoX's `attn1` (nothing was cached); ours hook it."""
    plain, plain_calls = _counted_run("none")
    cached, cached_calls = _counted_run("taylorseer")
    # 6 steps: 3 warm-up steps computed, then step 4 computed and steps 3 and 5 predicted from the cache
    assert plain_calls == 2 * 6 and cached_calls == 2 * 4
    assert 0 < _relative_error(cached, plain) < 0.5


def _args(*argv):
    return add_optimization_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_arguments_default_to_no_optimization_and_round_trip():
    assert optimizations_from_args(_args()) == dict(
        compile="off", quantize="none", offload="none", cache="none", vae_tiling=False, vae_slicing=False
    )
    options = optimizations_from_args(
        _args("--compile", "blocks", "--quantize", "fp8-layerwise", "--cache", "first-block:0.1", "--vae-tiling")
    )
    assert options["compile"] == "blocks" and options["cache"] == "first-block:0.1" and options["vae_tiling"]
    assert options["quantize"] == "fp8-layerwise"


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_torchao_recipes_need_torchao_or_are_refused_up_front(quantize, monkeypatch):
    """With torchao the value passes the check; without it, one error names the option and the extra to install."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(
            importlib.util, "find_spec",
            lambda name, *rest: (object() if installed else None) if name == "torchao" else real_find_spec(name, *rest),
        )
        if installed:
            assert optimizations_from_args(_args("--quantize", quantize))["quantize"] == quantize
        else:
            with pytest.raises(ValueError, match=f"--quantize {quantize} needs torchao: pip install"):
                optimizations_from_args(_args("--quantize", quantize))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cache", "fast"], "--cache must be one of none, first-block"),
        (["--cache", "first-block:-1"], "--cache 'first-block:-1': the first-block threshold must be a positive"),
        (["--cache", "pab:2"], "--cache must be one of"),
    ],
)
def test_bad_cache_argument_names_the_option(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        optimizations_from_args(_args(*argv))


def test_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _args("--quantize", "int4")
    assert exit_info.value.code == 2 and "--quantize" in capsys.readouterr().err


@pytest.mark.skipif(HAS_ACCELERATOR, reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("argv, message", [
    (["--offload", "model"], "--offload model moves weights between the CPU and an accelerator"),
    (["--offload", "group"], "--offload group moves weights"),
    (["--quantize", "nf4"], "--quantize nf4 needs bitsandbytes on a CUDA GPU"),
])
def test_what_a_cpu_cannot_run_is_refused_before_anything_changes(argv, message):
    with pytest.raises(ValueError, match=message):
        optimizations_from_args(_args(*argv))
    pipe = _pipe()
    with pytest.raises(ValueError, match=message.replace("--", "`").split(" ")[0]):
        apply_optimizations(pipe, **{argv[0][2:]: argv[1]})
    assert pipe.transformer.config.num_layers == 2 and not hasattr(pipe, "_all_hooks")  # nothing was applied


def test_python_helper_names_the_parameter():
    with pytest.raises(ValueError, match="`compile` must be one of off, blocks, full; got 'max'"):
        apply_optimizations(_pipe(), compile="max")
