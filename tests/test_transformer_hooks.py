"""diffusers' hooks on our transformer: caches, group offloading, layerwise casting, fused projections.

Each hook must engage on our model exactly where it engages on stock `CogVideoXTransformer3DModel` (the
same hooked modules run, in the same order), give stock's output bit for bit with one scene, and keep the
scene mask with several (a 2-scene v2 output still differs from ``scene_mask="full"``).
"""

import functools

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from diffusers_mask2dit import Mask2DiTAttnProcessor, Mask2DiTTransformer3DModel
from diffusers_mask2dit.transformer import FusedMask2DiTAttnProcessor, scene_rotary_emb
from test_transformer import TEXT, tiny_config

CPU = torch.device("cpu")


def build(cls, style="5b"):
    """Stock or ours with the same random weights (same seed, same module order)."""
    torch.manual_seed(0)
    return cls(**tiny_config(style)).eval()


@functools.lru_cache(maxsize=None)
def rope_config():
    return build(Mask2DiTTransformer3DModel).config


def make_inputs(num_scenes, batch=2, seed=1):
    """Keyword inputs for ``num_scenes`` scenes of 2 latent frames; per-scene timesteps set by the caller."""
    generator = torch.Generator().manual_seed(seed)
    frames = [2] * num_scenes
    inputs = dict(
        hidden_states=torch.randn(batch, sum(frames), 4, 8, 8, generator=generator),
        encoder_hidden_states=torch.randn(batch, num_scenes * TEXT, 12, generator=generator),
        image_rotary_emb=scene_rotary_emb(rope_config(), 8, 8, frames, CPU),
    )
    if num_scenes > 1:
        inputs["scene_frames"] = frames
    return inputs


def record_hooked_calls(model):
    """Names of the modules carrying a diffusers hook, in the order they are called (the list fills as the
    model runs). A hook lives in its module's ``forward``, so a module that is never called never runs it."""
    calls = []
    for name, module in model.named_modules():
        if hasattr(module, "_diffusers_hook"):
            module.register_forward_pre_hook(lambda _module, _args, name=name: calls.append(name))
    return calls


def denoise(model, inputs, timesteps, clock, scene_mask=None, per_scene=False):
    """One output per step, as a pipeline calls the model (keyword inputs, inside a cache context)."""
    outputs = []
    batch = inputs["hidden_states"].shape[0]
    kwargs = dict(inputs)
    if scene_mask is not None:
        kwargs["attention_kwargs"] = {"scene_mask": scene_mask}
    with torch.no_grad():
        for step, t in enumerate(timesteps):
            clock[0] = t
            timestep = torch.full((batch,), t)
            if per_scene:  # a clean context scene at 0, the new scene at t
                timestep = torch.stack([torch.zeros_like(timestep), timestep], dim=1)
            kwargs["hidden_states"] = inputs["hidden_states"] + 0.01 * step
            with model.cache_context("cond_uncond"):
                outputs.append(model(timestep=timestep, **kwargs).sample)
    return outputs


TIMESTEPS = [999, 800, 600, 400]

CACHES = {
    "first_block_cache": lambda clock: FirstBlockCacheConfig(threshold=10.0),
    "pyramid_attention_broadcast": lambda clock: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: clock[0],
    ),
    "faster_cache": lambda clock: FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: clock[0], attention_weight_callback=lambda _: 0.5,
        unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 1001),
        tensor_format="BFCHW", is_guidance_distilled=False,
    ),
}


def cached_run(cls, cache, inputs, **kwargs):
    """(uncached outputs, cached outputs, hooked calls) of a fresh model over TIMESTEPS."""
    clock = [0]
    model = build(cls)
    plain = denoise(model, inputs, TIMESTEPS, clock, **kwargs)
    model.enable_cache(CACHES[cache](clock))
    calls = record_hooked_calls(model)
    return plain, denoise(model, inputs, TIMESTEPS, clock, **kwargs), calls


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_cache_engages_as_on_stock_with_one_scene(cache):
    inputs = make_inputs(1)
    stock_plain, stock_cached, stock_calls = cached_run(CogVideoXTransformer3DModel, cache, inputs)
    plain, cached, calls = cached_run(Mask2DiTTransformer3DModel, cache, inputs)
    assert calls == stock_calls and any(name.startswith("transformer_blocks.") for name in calls)
    stock_skipped = [not torch.equal(p, c) for p, c in zip(stock_plain, stock_cached)]
    assert any(stock_skipped)  # the cache does something on stock ...
    assert [not torch.equal(p, c) for p, c in zip(plain, cached)] == stock_skipped  # ... and the same on ours
    for ours, theirs in zip(cached, stock_cached):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_cache_keeps_the_scene_mask(cache):
    inputs = make_inputs(2)
    plain, cached, calls = cached_run(Mask2DiTTransformer3DModel, cache, inputs, per_scene=True)
    one_scene_calls = cached_run(Mask2DiTTransformer3DModel, cache, make_inputs(1))[2]
    assert calls == one_scene_calls  # the same hooked modules run with 2 scenes as with one
    assert any(not torch.equal(p, c) for p, c in zip(plain, cached))
    _, full, _ = cached_run(Mask2DiTTransformer3DModel, cache, inputs, per_scene=True, scene_mask="full")
    for masked, unmasked in zip(cached, full):
        assert (masked - unmasked).abs().max() > 1e-4


def run_once(model, num_scenes, **kwargs):
    inputs = make_inputs(num_scenes)
    timestep = torch.tensor([[0, 700], [300, 500]]) if num_scenes == 2 else torch.tensor([300, 500])
    with torch.no_grad():
        return model(timestep=timestep, **inputs, **kwargs).sample


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_on_cpu(tmp_path, offload_type, to_disk):
    """Offloading to disk frees the weights between calls: a module whose hook does not run computes with
    emptied weights (the block-level case gave NaN before blocks were called as modules)."""
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    seen = {}
    for cls, scenes in [(CogVideoXTransformer3DModel, 1), (Mask2DiTTransformer3DModel, 1), (Mask2DiTTransformer3DModel, 2)]:
        expected = run_once(build(cls), scenes)
        model = build(cls)
        if to_disk:
            extra["offload_to_disk_path"] = str(tmp_path / f"{cls.__name__}-{scenes}")
        model.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=offload_type, **extra)
        calls = record_hooked_calls(model)
        assert torch.equal(run_once(model, scenes), expected)
        seen[(cls, scenes)] = set(calls)
    stock_calls = seen[(CogVideoXTransformer3DModel, 1)]
    assert any(name.startswith("transformer_blocks.") for name in stock_calls)
    assert seen[(Mask2DiTTransformer3DModel, 1)] == stock_calls == seen[(Mask2DiTTransformer3DModel, 2)]


def test_layerwise_casting_as_on_stock():
    def cast(model):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        return model

    def hooked(model):
        return sorted(name for name, m in model.named_modules() if hasattr(m, "_diffusers_hook"))

    stock, ours = cast(build(CogVideoXTransformer3DModel)), cast(build(Mask2DiTTransformer3DModel))
    assert hooked(ours) == hooked(stock) and hooked(stock)
    assert torch.equal(run_once(ours, 1), run_once(stock, 1))
    masked = run_once(ours, 2)
    assert (masked - run_once(build(Mask2DiTTransformer3DModel), 2)).abs().max() > 1e-4  # the casting is felt
    assert (masked - run_once(ours, 2, attention_kwargs={"scene_mask": "full"})).abs().max() > 1e-4


def test_fused_projections_keep_the_scene_mask():
    model = build(Mask2DiTTransformer3DModel)
    unfused = run_once(model, 2)
    full = run_once(model, 2, attention_kwargs={"scene_mask": "full"})
    model.fuse_qkv_projections()
    assert all(isinstance(p, FusedMask2DiTAttnProcessor) for p in model.attn_processors.values())
    fused = run_once(model, 2)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    assert (fused - full).abs().max() > 1e-3
    model.unfuse_qkv_projections()
    assert all(type(p) is Mask2DiTAttnProcessor for p in model.attn_processors.values())
    assert torch.equal(run_once(model, 2), unfused)


def test_a_stock_processor_with_several_scenes_fails_loudly():
    model = build(Mask2DiTTransformer3DModel)
    model.set_attn_processor(CogVideoXAttnProcessor2_0())
    # One scene: nothing to mask, it is stock CogVideoX.
    assert torch.equal(run_once(model, 1), run_once(build(CogVideoXTransformer3DModel), 1))
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn1.*CogVideoXAttnProcessor2_0.*scene mask"):
        run_once(model, 2)
