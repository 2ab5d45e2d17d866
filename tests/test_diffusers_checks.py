"""Our own versions of the checks diffusers' CogVideoX pipeline tests make (issue 13).

`tools/run_diffusers_suite.py` runs diffusers' tests on our classes; this module asks the same
questions of `Mask2DiTPipeline` on the tiny models, so CI keeps asking them without diffusers' sources.
Inputs are stock-style: one scene given as a plain string, 8 frames (a count only one scene may use).
"""

import numpy as np
import pytest
import torch
from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from test_pipeline import gen, make_pipe, pipe  # noqa: F401  (shared helpers and the `pipe` fixture)

from diffusers_mask2dit import Mask2DiTPipeline

ONE_SCENE = dict(prompt="a cat walks", num_frames=8, num_inference_steps=2, output_type="pt")


def run(pipe, seed=0, **kwargs):
    return pipe(**{**ONE_SCENE, "generator": gen(seed), **kwargs})


def test_output_shape_and_tuple_output(pipe):
    output = run(pipe)
    assert output.frames.shape == (1, 8, 3, 64, 64)
    as_tuple = run(pipe, return_dict=False)
    assert torch.equal(as_tuple[0], output.frames)


def test_save_and_load_round_trip_gives_the_same_video(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = Mask2DiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert (run(loaded).frames - run(pipe).frames).abs().max() < 1e-4


def test_guidance_on_and_off_give_the_same_shape_and_different_videos(pipe):
    without = run(pipe, guidance_scale=1.0).frames
    with_guidance = run(pipe, guidance_scale=7.5).frames
    assert without.shape == with_guidance.shape and not torch.equal(without, with_guidance)


def test_callback_gets_exactly_the_tensors_asked_for_and_can_replace_latents(pipe):
    requested = []

    def record(p, step, timestep, tensors):
        requested.append(sorted(tensors))
        return tensors

    run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"], output_type="latent")
    run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
        output_type="latent")
    assert requested == [["latents"]] * 2 + [sorted(pipe._callback_tensor_inputs)] * 2

    def zero_at_last_step(p, step, timestep, tensors):
        if step == p.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    output = run(pipe, callback_on_step_end=zero_at_last_step, output_type="latent").frames
    assert output.abs().sum() == 0


def test_callback_can_change_the_guidance_scale(pipe):
    def raise_guidance(p, step, timestep, tensors):
        p._guidance_scale += 1.0
        return tensors

    run(pipe, guidance_scale=2.0, callback_on_step_end=raise_guidance)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


def test_a_batch_of_one_scene_samples_matches_each_sample_alone(pipe):
    """Our batch is a list of scene lists; each sample equals the same prompt generated alone."""
    prompts = ["a cat walks", "a dog runs", "a bird flies"]
    batch = pipe([[p] for p in prompts], num_frames=8, num_inference_steps=2, output_type="pt",
                 generator=[gen(i) for i in range(3)]).frames
    for index, prompt in enumerate(prompts):
        alone = run(pipe, seed=index, prompt=prompt).frames
        assert (batch[index] - alone[0]).abs().max() < 1e-3


def test_vae_tiling_changes_the_video_little():
    pipe = make_pipe()
    untiled = run(pipe, height=128, width=128).frames
    pipe.vae.enable_tiling(
        tile_sample_min_height=96, tile_sample_min_width=96, tile_overlap_factor_height=1 / 12,
        tile_overlap_factor_width=1 / 12,
    )
    tiled = run(pipe, height=128, width=128).frames
    # The random tiny VAE blends tile seams coarsely: a few seam pixels move, the video as a whole does not.
    assert tiled.shape == untiled.shape and (tiled - untiled).abs().mean() < 0.02


def test_fused_qkv_projections_keep_the_one_scene_video():
    pipe = make_pipe()
    plain = run(pipe).frames
    pipe.fuse_qkv_projections()
    fused = run(pipe).frames
    pipe.unfuse_qkv_projections()
    assert (fused - plain).abs().max() < 1e-3 and (run(pipe).frames - plain).abs().max() < 1e-3


@pytest.mark.parametrize(
    "config",
    [
        lambda p: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: p.current_timestep,
        ),
        lambda p: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
            current_timestep_callback=lambda: p.current_timestep, is_guidance_distilled=False,
        ),
        lambda p: FirstBlockCacheConfig(threshold=0.8),
    ],
    ids=["pyramid_attention_broadcast", "faster_cache", "first_block_cache"],
)
def test_diffusers_caches_run_and_disabling_restores_the_plain_video(config):
    pipe = make_pipe()
    plain = run(pipe, num_inference_steps=4).frames
    pipe.transformer.enable_cache(config(pipe))
    cached = run(pipe, num_inference_steps=4).frames
    pipe.transformer.disable_cache()
    restored = run(pipe, num_inference_steps=4).frames
    assert cached.shape == plain.shape and np.isfinite(cached.numpy()).all()
    assert (cached - plain).abs().max() < 0.2
    assert (restored - plain).abs().max() < 1e-4
