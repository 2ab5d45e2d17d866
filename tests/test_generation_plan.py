"""Check first, then plan (issue 21, point 2): every entry point checks all of its arguments into `CallInputs` /
`ExtendInputs` before any model runs, then builds its `GenerationPlan` from that object alone.

So a bad argument is refused before the VAE encodes context pixels or the text encoder encodes a negative
prompt, whatever the argument; and building a plan never looks at (or checks) the caller's arguments again.
"""

import numpy as np
import pytest
import torch

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit import generation_plan
from diffusers_mask2dit.generation_plan import (
    CallInputs,
    ExtendInputs,
    call_plan,
    check_call_inputs,
    check_extend_inputs,
    extend_plan,
    plan_scenes,
)
from diffusers_mask2dit.tiny import build_tiny_components

PROMPTS = ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the ocean"]
# The tiny model: 64x64 pixels are 8x8 latents of 4 channels; 9 pixel frames are 3 latent frames.
PIXELS = [np.zeros((9, 64, 64, 3), np.float32)] * 2
CONTEXT = dict(prompt="a fish swims", context_prompts=PROMPTS[:2], context_frames=PIXELS)
# The per-argument checks `generation_plan` uses: building a plan must call none of them.
CHECKS = (
    "check_frame_counts", "check_latents", "negative_prompt_lists", "new_scene_prompts", "per_scene_counts",
    "pixel_size", "positive_int", "scene_embeddings", "scene_prompt_lists", "scene_videos",
)


@pytest.fixture(scope="module")
def pipe():
    pipe = Mask2DiTPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def vae_calls(pipe, monkeypatch):
    """Records each VAE encode (and still encodes)."""
    calls = []
    encode = pipe.vae.encode

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", spy)
    return calls


@pytest.fixture
def no_checks(monkeypatch):
    """Makes every per-argument check fail the test if it runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a check of the caller's input ran while building the plan")

    for name in CHECKS:
        monkeypatch.setattr(generation_plan, name, refuse)


def call_arguments(**kwargs):
    arguments = dict(
        prompt=PROMPTS, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, height=None,
        width=None, num_frames=None, num_videos_per_prompt=1, latents=None, guidance_scale=6.0,
    )
    return {**arguments, **kwargs}


def extend_arguments(**kwargs):
    arguments = dict(
        prompt="a fish swims", context_prompts=PROMPTS[:2], context_latents=None, context_frames=PIXELS,
        num_new_scenes=1, negative_prompt=None, num_frames=None, context_num_frames=None, height=None, width=None,
        num_videos_per_prompt=1, latents=None, context_generator=None,
    )
    return {**arguments, **kwargs}


# ------------------------------------------------------------------------------------------------
# Refused before any model runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # These were checked only after the context had been encoded.
        (dict(latents=torch.zeros(1, 2, 4, 8, 8)), r"`latents` must have shape \(1, 3, 4, 8, 8\)"),
        (dict(negative_prompt=["blurry", "dark"]), r"`negative_prompt` must be a string .*one string per scene \(3\)"),
        (dict(context_frames=[np.zeros((3, 9, 64, 64, 3), np.float32)] * 2), "context has batch size 3"),
        # A context of two sizes failed inside the encoder's output join.
        (dict(context_frames=[PIXELS[0], np.zeros((9, 32, 32, 3), np.float32)]), r"same \(height, width\)"),
        # Checked first already; they stay so.
        (dict(num_frames=8), r"`num_frames`.*scene 1 has 8"),
        (dict(height=72), r"`height` must be a positive multiple of 16"),
        (dict(context_frames=[np.zeros((8, 64, 64, 3), np.float32)] * 2), r"`context_frames`.*scene 1 has 8"),
    ],
)
def test_extend_refuses_bad_input_before_the_vae_encodes_the_context(pipe, vae_calls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.extend(**{**CONTEXT, "num_inference_steps": 1, "output_type": "latent", **kwargs})
    assert vae_calls == []


def test_extend_with_good_input_encodes_each_context_scene_once(pipe, vae_calls):
    """The spy sees encodes: the refusals above are not a spy that never records."""
    pipe.extend(**CONTEXT, num_inference_steps=1, output_type="latent")
    assert vae_calls == [torch.Size([1, 3, 9, 64, 64])] * 2


def test_call_with_embeddings_refuses_bad_noise_before_encoding_the_negative_prompt(pipe, monkeypatch):
    """Guidance with ``prompt_embeds`` and no ``negative_prompt_embeds`` encodes the negative prompt: only once the
    noise shape (and everything else) is checked."""
    encoded = []
    encode = pipe.encode_scene_prompts
    monkeypatch.setattr(pipe, "encode_scene_prompts", lambda *a, **k: encoded.append(a[0]) or encode(*a, **k))
    embeds = torch.zeros(1, 3, 226, 32)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 9, 4, 8, 8\)"):
        pipe(prompt_embeds=embeds, negative_prompt="blurry", latents=torch.zeros(1, 3, 4, 8, 8), num_inference_steps=1)
    assert encoded == []
    pipe(prompt_embeds=embeds, negative_prompt="blurry", num_inference_steps=1, output_type="latent")
    assert encoded == [[["blurry"] * 3]]


# ------------------------------------------------------------------------------------------------
# Checked inputs, then the plan from them alone
# ------------------------------------------------------------------------------------------------


def test_checked_call_inputs_are_normalised(pipe):
    noise = torch.zeros(2, 9, 4, 8, 8)
    inputs = check_call_inputs(pipe, **call_arguments(negative_prompt="blurry", num_videos_per_prompt=2, latents=noise))
    assert isinstance(inputs, CallInputs)
    assert (inputs.batch_size, inputs.num_frames, inputs.height, inputs.width) == (1, [9, 9, 9], 64, 64)
    assert inputs.prompts == [PROMPTS] and inputs.negative_prompts == [["blurry"] * 3]
    assert inputs.latents is noise and inputs.prompt_embeds is None


def test_checked_embeddings_keep_only_what_guidance_uses(pipe):
    embeds = torch.zeros(2, 226, 32)  # one scene, a batch of 2
    with_guidance = check_call_inputs(pipe, **call_arguments(prompt=None, prompt_embeds=embeds, negative_prompt="x"))
    assert with_guidance.prompt_embeds.shape == (2, 1, 226, 32) and with_guidance.negative_prompts == [["x"], ["x"]]
    without = check_call_inputs(
        pipe, **call_arguments(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=embeds, guidance_scale=1.0)
    )
    assert without.negative_prompt_embeds is None and without.negative_prompts is None


def test_the_plan_is_built_from_checked_inputs_without_checking_again(pipe, monkeypatch):
    inputs = check_call_inputs(pipe, **call_arguments(num_frames=[9, 17, 9]))
    for name in CHECKS:
        monkeypatch.setattr(generation_plan, name, lambda *a, **k: pytest.fail("a check ran while building the plan"))
    plan = call_plan(pipe, inputs)
    assert plan.scene_frames == [3, 5, 3] and plan.denoised_frames == [3, 5, 3]
    assert plan.prompts == [PROMPTS] and plan.negative_prompts == [[""] * 3] and plan.num_context_scenes == 0


def test_plan_scenes_does_not_check_frame_counts_again(pipe, no_checks):
    """8 frames is refused for several scenes by the check step; building takes the checked inputs as they are."""
    inputs = CallInputs(batch_size=1, num_videos_per_prompt=1, num_frames=[8, 8], height=64, width=64)
    plan = plan_scenes(pipe, inputs)
    assert plan.scene_frames == [2, 2]


def test_extend_inputs_hold_the_preprocessed_context_and_the_plan_encodes_it(pipe, vae_calls, monkeypatch):
    inputs = check_extend_inputs(pipe, **extend_arguments(num_videos_per_prompt=2))
    assert isinstance(inputs, ExtendInputs) and vae_calls == []
    assert inputs.context_latents is None and [video.shape for video in inputs.context_videos] == [(1, 3, 9, 64, 64)] * 2
    assert (inputs.num_context_scenes, inputs.num_frames, inputs.height, inputs.width) == (2, [9, 9, 9], 64, 64)
    assert inputs.prompts == [PROMPTS[:2] + ["a fish swims"]]
    for name in CHECKS:
        monkeypatch.setattr(generation_plan, name, lambda *a, **k: pytest.fail("a check ran while building the plan"))
    plan = extend_plan(pipe, inputs)
    assert len(vae_calls) == 2 and plan.num_context_scenes == 2
    assert plan.context_latents.shape == (2, 6, 4, 8, 8)  # one context per video: the batch of 1 repeated
    expected, _ = pipe.encode_video_scenes(PIXELS)
    assert torch.equal(plan.context_latents[1], expected[0])


def test_extend_inputs_from_latents_keep_the_context_scenes_frames_exactly(pipe, vae_calls):
    context = torch.randn(1, 8, 4, 8, 8)  # two frames more than the two context scenes need
    inputs = check_extend_inputs(pipe, **extend_arguments(context_frames=None, context_latents=context))
    assert inputs.context_videos is None and torch.equal(inputs.context_latents, context[:, 2:])
    assert extend_plan(pipe, inputs).context_latents.data_ptr() == context[:, 2:].data_ptr() and vae_calls == []
