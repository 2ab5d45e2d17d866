"""The recipes where only a GPU can run them (issue 22): offload (model, sequential, group with CUDA streams) on
``__call__``, ``extend`` and ``generate_long``; bitsandbytes 4- and 8-bit at load; torchao on CUDA; Inductor
compile (regional and whole) with the varlen FlashAttention backend. The GPU script runs this file as its own step
(`benchmarks/gpu/run.py`, ``pytest_recipes_cuda``); CI has no GPU and skips every test here.

A tiny bf16 model: each recipe's result is compared with the same pipeline plain on the GPU.
"""

import pytest
import torch

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.optimization import apply_optimizations, pipeline_quantization_config
from diffusers_mask2dit.tiny import build_tiny_components, save_tiny_cogvideox

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the ocean"]
STORY = PROMPTS + ["a fish swims"]
COMMON = dict(num_frames=9, height=64, width=64, num_inference_steps=3, output_type="latent")


def _pipe(on_gpu: bool = True):
    pipe = Mask2DiTPipeline(**build_tiny_components("5b")).to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda") if on_gpu else pipe


def _runs(pipe, mask: str = "v2"):
    """A 3-scene ``__call__``, an ``extend`` of its last two scenes and a 4-scene ``generate_long`` (fp32 latents)."""
    attention = {"scene_mask": mask}
    call = pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), attention_kwargs=attention, **COMMON).frames
    extended = pipe.extend(
        prompt="a fish swims", context_prompts=PROMPTS[1:], context_latents=call[:, 3:],
        generator=torch.Generator().manual_seed(1), attention_kwargs=attention, **COMMON,
    ).frames
    long = pipe.generate_long(STORY, generator=torch.Generator().manual_seed(2), attention_kwargs=attention, **COMMON).frames
    return [latents.float().cpu() for latents in (call, extended, long)]


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def plain():
    pipe = _pipe()
    return {"v2": _runs(pipe), "full": _runs(pipe, "full")}


@pytest.mark.parametrize("offload", ["model", "sequential", "group"])
def test_offload_gives_the_plain_gpu_result_for_call_extend_and_long_videos(offload, plain):
    """The same kernels on the same device, weights moved in and out: the same latents (up to bf16 rounding)."""
    pipe = apply_optimizations(_pipe(on_gpu=False), offload=offload, device=torch.device("cuda"))
    for made, expected in zip(_runs(pipe), plain["v2"]):
        assert _relative_error(made, expected) < 1e-2


@pytest.mark.parametrize("quantize", ["nf4", "int8-bnb"])
def test_bitsandbytes_at_load_stays_close_and_keeps_the_mask(quantize, plain, tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = save_tiny_cogvideox(tmp_path / "tiny")
    pipe = Mask2DiTPipeline.from_pretrained(
        folder, quantization_config=pipeline_quantization_config(quantize), torch_dtype=torch.bfloat16
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    quantized = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert type(quantized).__module__.startswith("bitsandbytes"), type(quantized)
    assert isinstance(pipe.transformer.proj_out, torch.nn.Linear) and pipe.transformer.proj_out.weight.dtype == torch.bfloat16
    made, made_full = _runs(pipe)[0], _runs(pipe, "full")[0]
    error = _relative_error(made, plain["v2"][0])
    # nearer the unquantized v2 result than the unmasked one, and the mask still changes the result
    assert error < _relative_error(made, plain["full"][0]), error
    mask_effect = _relative_error(plain["full"][0], plain["v2"][0])
    assert 0.5 < _relative_error(made_full, made) / mask_effect < 2


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_torchao_on_cuda_stays_close(quantize, plain):
    pytest.importorskip("torchao")
    if quantize == "fp8" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torchao float8 weight-only needs sm89+")
    pipe = apply_optimizations(_pipe(), quantize=quantize)
    made = _runs(pipe)[0]
    assert _relative_error(made, plain["v2"][0]) < 0.05


@pytest.mark.parametrize("compile_mode", ["blocks", "full"])
def test_inductor_compile_with_flash_attention_matches_eager_without_recompiling(compile_mode, plain):
    """Inductor on the GPU (the CPU tests use dynamo's eager backends), with the flash backend, shared and per-scene
    (extension) timesteps: close to eager, and a second round of the same calls compiles nothing new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe = apply_optimizations(_pipe(), compile=compile_mode)
    first = _runs(pipe)
    graphs = counters["stats"]["unique_graphs"]
    again = _runs(pipe)
    assert counters["stats"]["unique_graphs"] == graphs  # the same shapes: no new graph
    for made, repeat, expected in zip(first, again, plain["v2"]):
        assert torch.equal(made, repeat)
        assert _relative_error(made, expected) < 2e-2
