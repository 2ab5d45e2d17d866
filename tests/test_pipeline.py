"""Mask2DiTPipeline: multi-scene generation, scene extension, long videos, input checks (tiny random models)."""

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
)

import diffusers_mask2dit.pipeline as pipeline_module
from diffusers_mask2dit import Mask2DiTPipeline, Mask2DiTPipelineOutput, Mask2DiTTransformer3DModel
from diffusers_mask2dit.tiny import build_tiny_components

STEPS = 2
PROMPTS = ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the ocean"]


def make_pipe(style="5b", seed=0, cls=Mask2DiTPipeline):
    pipe = cls(**build_tiny_components(style=style, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def test_init_converts_a_plain_transformer_in_place():
    components = build_tiny_components()
    transformer = components["transformer"]
    pipe = Mask2DiTPipeline(**components)
    assert pipe.transformer is transformer
    assert isinstance(pipe.transformer, Mask2DiTTransformer3DModel)
    assert pipe.transformer.config.attn_mask_variant == "v2"


@pytest.mark.parametrize("style, dynamic_cfg", [("5b", False), ("5b", True), ("2b", False), ("1.5", False)])
def test_one_scene_reproduces_cogvideox_pipeline(style, dynamic_cfg):
    kwargs = dict(num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=dynamic_cfg, output_type="np")
    expected = make_pipe(style, cls=CogVideoXPipeline)("a cat walks on the beach", generator=gen(), **kwargs).frames
    output = make_pipe(style)(["a cat walks on the beach"], generator=gen(), **kwargs)
    assert output.frames.shape == expected.shape == (1, 9, 64, 64, 3)
    assert np.abs(output.frames - expected).max() < 1e-4
    np.testing.assert_array_equal(output.scene_frames[0][0], output.frames[0])


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_scenes_of_different_lengths_in_every_output_type(pipe, output_type):
    output = pipe(PROMPTS, num_frames=[9, 1, 9], num_inference_steps=STEPS, generator=gen(), output_type=output_type)
    assert isinstance(output, Mask2DiTPipelineOutput)
    scenes = output.scene_frames[0]
    lengths = [3, 1, 3] if output_type == "latent" else [9, 1, 9]
    assert [len(scene) for scene in scenes] == lengths
    assert len(output.frames[0]) == sum(lengths)
    if output_type == "np":
        assert output.frames.shape == (1, 19, 64, 64, 3)
        np.testing.assert_array_equal(np.concatenate(scenes, axis=0), output.frames[0])
    elif output_type == "pt":
        assert output.frames.shape == (1, 19, 3, 64, 64)
        assert torch.equal(torch.cat(scenes, dim=0), output.frames[0])
    elif output_type == "pil":
        assert output.frames[0][9] is scenes[1][0] and output.frames[0][0].size == (64, 64)
        assert output.frames[0][10] is scenes[2][0]
    else:
        assert output.frames.shape == (1, 7, 4, 8, 8)


def test_each_scene_is_decoded_on_its_own(pipe, monkeypatch):
    decoded_frames = []
    original = pipe.vae.decode

    def spy(latents, *args, **kwargs):
        decoded_frames.append(latents.shape[2])
        return original(latents, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", spy)
    pipe(PROMPTS, num_frames=[9, 1, 9], num_inference_steps=1, generator=gen(), output_type="np")
    assert decoded_frames == [3, 1, 3]


def test_vae_tiling_and_slicing_are_usable(monkeypatch):
    pipe = make_pipe()
    # Tile sizes whose overlaps are whole latent pixels (diffusers' tiled decode needs that at toy sizes).
    pipe.vae.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)
    pipe.vae.enable_slicing()
    tiled_calls = []
    tiled_decode = pipe.vae.tiled_decode
    monkeypatch.setattr(pipe.vae, "tiled_decode", lambda z, *a, **k: tiled_calls.append(z.shape) or tiled_decode(z, *a, **k))
    output = pipe(PROMPTS[:2], num_videos_per_prompt=2, num_inference_steps=1, generator=gen(), output_type="np")
    assert output.frames.shape == (2, 18, 64, 64, 3) and np.isfinite(output.frames).all()
    assert tiled_calls == [(1, 4, 3, 8, 8)] * 4  # 2 scenes x 2 samples, one sample at a time (slicing)


def test_each_prompt_is_encoded_on_its_own_and_concatenated(pipe):
    embeds, negative, text_lengths = pipe.encode_scene_prompts(
        [PROMPTS, PROMPTS[::-1]], [["", "", "blurry"]] * 2, True, max_sequence_length=226
    )
    assert text_lengths == [226, 226, 226] and embeds.shape == (2, 3 * 226, 32) == negative.shape
    alone, _ = pipe.encode_prompt(PROMPTS[1], do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds[0, 226:452], alone[0])
    blurry, _ = pipe.encode_prompt("blurry", do_classifier_free_guidance=False)
    torch.testing.assert_close(negative[1, 452:], blurry[0])


def test_v1_isolates_scenes_and_v2_lets_video_mix(pipe):
    """Changing scene 3's prompt: under v1 (isolated scenes) scene 1 is untouched; under v2 its video tokens
    attend to scene 3's, so it changes. Checks that the pipeline passes the scene layout and the mask."""

    def first_scene(prompts, mask):
        latents = pipe(prompts, num_inference_steps=STEPS, generator=gen(), output_type="latent",
                       attention_kwargs={"scene_mask": mask}).frames
        return latents[:, :3]

    changed = PROMPTS[:2] + ["a red car drives at night"]
    torch.testing.assert_close(first_scene(PROMPTS, "v1"), first_scene(changed, "v1"), atol=1e-6, rtol=0)
    assert (first_scene(PROMPTS, "v2") - first_scene(changed, "v2")).abs().max() > 1e-4


def test_batch_and_num_videos_per_prompt(pipe):
    output = pipe([PROMPTS[:2], PROMPTS[1:]], num_videos_per_prompt=2, num_inference_steps=STEPS, generator=gen(),
                  output_type="latent")
    assert output.frames.shape == (4, 6, 4, 8, 8) and len(output.scene_frames) == 4
    assert not torch.allclose(output.frames[0], output.frames[1])  # two videos of one prompt differ


def test_prompt_embeds_give_the_same_video_as_prompts(pipe):
    embeds, negative, _ = pipe.encode_scene_prompts([PROMPTS], [[""] * 3], True)
    from_text = pipe(PROMPTS, num_inference_steps=STEPS, generator=gen(), output_type="latent").frames
    from_embeds = pipe(prompt_embeds=embeds.view(1, 3, 226, -1), negative_prompt_embeds=negative.view(1, 3, 226, -1),
                       num_inference_steps=STEPS, generator=gen(), output_type="latent").frames
    torch.testing.assert_close(from_embeds, from_text, atol=1e-5, rtol=0)


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    output = pipe(PROMPTS, num_inference_steps=3, generator=gen(), output_type="latent", callback_on_step_end=callback)
    assert seen == [(0, (1, 9, 4, 8, 8)), (1, (1, 9, 4, 8, 8)), (2, (1, 9, 4, 8, 8))]
    assert torch.count_nonzero(output.frames) == 0


@pytest.mark.parametrize("style", ["2b", "1.5"])
def test_multiscene_runs_for_2b_and_15_styles(style):
    pipe = make_pipe(style)
    output = pipe(PROMPTS, num_frames=[9, 1, 9], num_inference_steps=STEPS, generator=gen(), output_type="np")
    assert output.frames.shape == (1, 19, 64, 64, 3) and np.isfinite(output.frames).all()
    # Extension too; with 1.5 the new scene is drawn with a filler frame that must not leak into the output.
    first = pipe(PROMPTS[:2], num_inference_steps=STEPS, generator=gen(), output_type="latent").frames
    extended = pipe.extend("a fish swims", context_prompts=PROMPTS[1:2], context_latents=first[:, 3:],
                           num_inference_steps=STEPS, generator=gen(1), output_type="latent").frames
    assert extended.shape == (1, 6, 4, 8, 8) and torch.equal(extended[:, :3], first[:, 3:])


# ------------------------------------------------------------------------------------------------
# Scene extension
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler_class", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler]
)
def test_every_scheduler_generates_and_extends(scheduler_class):
    pipe = make_pipe()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    first = pipe(PROMPTS[:2], num_inference_steps=3, generator=gen(), output_type="latent").frames
    assert torch.isfinite(first).all()
    extended = pipe.extend("a fish swims", context_prompts=PROMPTS[1:2], context_latents=first, num_inference_steps=3,
                           generator=gen(1), output_type="latent").frames
    assert torch.equal(extended[:, :3], first[:, 3:])
    assert torch.isfinite(extended).all() and extended[:, 3:].std() > 0.1


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
def test_extension_keeps_context_exact_with_a_real_loop(pipe, monkeypatch, guidance_scale):
    context = torch.randn(2, 6, 4, 8, 8, generator=gen(3))
    timesteps_seen, step_calls = [], []
    forward = pipe.transformer.forward

    def spy_forward(*args, **kwargs):
        timesteps_seen.append(kwargs["timestep"].clone())
        assert kwargs["scene_frames"] == [3, 3, 3] and kwargs["text_lengths"] == [226] * 3
        return forward(*args, **kwargs)

    step = pipe.scheduler.step

    def spy_step(model_output, timestep, sample, *args, **kwargs):
        step_calls.append(tuple(sample.shape))
        return step(model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy_forward)
    monkeypatch.setattr(pipe.scheduler, "step", spy_step)
    output = pipe.extend(
        prompt=["a fish swims", "a boat sails"],
        context_prompts=[PROMPTS[:2], PROMPTS[1:]],
        context_latents=context,
        guidance_scale=guidance_scale,
        num_inference_steps=3,
        generator=gen(),
        output_type="latent",
    )
    assert torch.equal(output.frames[:, :6], context)  # bit for bit
    assert step_calls == [(2, 3, 4, 8, 8)] * 3  # the scheduler steps only the new scene, every step
    cfg_batch = 4 if guidance_scale > 1 else 2
    for t, timestep in zip(pipe.scheduler.timesteps, timesteps_seen):
        assert timestep.shape == (cfg_batch, 3)
        assert (timestep[:, :2] == 0).all() and (timestep[:, 2] == t).all()
    assert len(timesteps_seen) == 3


def test_extension_uses_the_last_scenes_of_a_longer_context(pipe):
    context = torch.randn(1, 12, 4, 8, 8, generator=gen(4))
    output = pipe.extend("a fish", context_prompts=PROMPTS[1:], context_latents=context, num_inference_steps=1,
                         generator=gen(), output_type="latent")
    assert torch.equal(output.frames[:, :6], context[:, 6:])
    assert [len(s) for s in output.scene_frames[0]] == [3, 3, 3]


def test_extension_from_pixels_encodes_with_the_posterior_mode(pipe):
    scenes = [np.random.default_rng(i).random((9, 64, 64, 3), dtype=np.float32) for i in range(2)]
    expected, pixel_frames = pipe.encode_video_scenes(scenes)
    again, _ = pipe.encode_video_scenes(scenes)
    sampled, _ = pipe.encode_video_scenes(scenes, generator=gen())
    assert pixel_frames == [9, 9] and torch.equal(expected, again) and not torch.equal(expected, sampled)
    output = pipe.extend("a fish", context_prompts=PROMPTS[1:], context_frames=scenes, num_inference_steps=1,
                         generator=gen(), output_type="latent")
    assert torch.equal(output.frames[:, :6], expected)


def test_generate_long_is_a_first_window_then_sliding_extensions(pipe):
    prompts = PROMPTS + ["a fish swims", "a boat sails"]
    long = pipe.generate_long(prompts, scenes_per_window=3, num_inference_steps=STEPS, generator=gen(),
                              output_type="latent").frames
    assert long.shape == (1, 15, 4, 8, 8)

    generator = gen()
    first = pipe(prompts[:3], num_inference_steps=STEPS, generator=generator, output_type="latent").frames
    fourth = pipe.extend(prompts[3], context_prompts=prompts[1:3], context_latents=first[:, 3:],
                         num_inference_steps=STEPS, generator=generator, output_type="latent").frames[:, 6:]
    torch.testing.assert_close(long[:, :9], first, atol=0, rtol=0)
    torch.testing.assert_close(long[:, 9:12], fourth, atol=0, rtol=0)

    decoded = pipe.generate_long(prompts, num_inference_steps=1, generator=gen(), output_type="np")
    assert decoded.frames.shape == (1, 45, 64, 64, 3) and len(decoded.scene_frames[0]) == 5


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), "`prompt` must be a list with one prompt per scene"),
        (dict(prompt=[PROMPTS, PROMPTS[:2]]), r"same number of scenes; got \[3, 2\]"),
        (dict(prompt=PROMPTS, num_frames=12), r"`num_frames`.*scene 1 has 12. Nearest valid values: 9 and 17"),
        # 4k+1 but an even latent count: the VAE would decode 8 frames, not 5
        (dict(prompt=PROMPTS, num_frames=[9, 9, 5]), r"scene 3 has 5. Nearest valid values: 1 and 9"),
        (dict(prompt=PROMPTS, num_frames=[9, 9]), "`num_frames` lists 2 scenes but there are 3"),
        (dict(prompt=PROMPTS, height=72), r"`height` must be a positive multiple of 16.*64 and 80"),
        (dict(prompt=PROMPTS, width=40), "`width` must be a positive multiple of 16"),
        (dict(prompt=PROMPTS, negative_prompt=["ugly", "blurry"]), "`negative_prompt` must be a string"),
        (dict(prompt=PROMPTS, attention_kwargs={"scene_mask": "v4"}), r"attention_kwargs\['scene_mask'\]"),
        (dict(prompt=PROMPTS, attention_kwargs={"attention_backend": "xformers"}), "attention_backend"),
        (dict(prompt=PROMPTS, latents=torch.randn(1, 3, 4, 8, 8)), r"`latents` must have shape \(1, 9, 4, 8, 8\)"),
        (dict(prompt=None), "exactly one of `prompt`"),
        (dict(prompt=PROMPTS, output_type="mp4"), "`output_type` must be one of"),
    ],
)
def test_bad_call_input_raises_a_clear_value_error(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=1, **{"output_type": "latent", **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="x", context_prompts=PROMPTS[:2], context_latents=torch.randn(1, 3, 4, 8, 8)),
         "context is shorter than needed"),
        (dict(prompt="x", context_prompts=PROMPTS[:2], context_frames=[np.zeros((9, 64, 64, 3), np.float32)]),
         "2 context prompts need 2 videos, got 1"),
        (dict(prompt="x", context_prompts=PROMPTS[:2]), "exactly one of `context_latents`"),
        (dict(prompt=["x", "y"], context_prompts=PROMPTS[:2], context_latents=torch.randn(1, 6, 4, 8, 8)),
         "`num_new_scenes` is 1"),
        (dict(prompt="x", context_prompts=[PROMPTS[:2]] * 2, context_latents=torch.randn(2, 6, 4, 8, 8)),
         "`prompt` must be a list of 2 entries"),
        (dict(prompt="x", context_prompts=PROMPTS[:2], context_latents=torch.randn(3, 6, 4, 8, 8)),
         "context has batch size 3"),
        (dict(prompt="x", context_prompts=PROMPTS[:1], context_frames=[np.zeros((8, 64, 64, 3), np.float32)]),
         "`context_frames`.*scene 1 has 8"),
        (dict(prompt="x", context_prompts=PROMPTS[:2], context_latents=torch.randn(1, 6, 4, 8, 8),
              context_num_frames=[9, 5]), "`context_num_frames`.*scene 2 has 5"),
    ],
)
def test_bad_extension_input_raises_a_clear_value_error(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.extend(num_inference_steps=1, output_type="latent", **kwargs)


def test_generate_long_needs_a_window_of_two(pipe):
    with pytest.raises(ValueError, match="`scenes_per_window` must be an int >= 2"):
        pipe.generate_long(PROMPTS, scenes_per_window=1)


def test_long_prompt_warning_names_the_scene(pipe, monkeypatch):
    warnings = []
    monkeypatch.setattr(pipeline_module.logger, "warning", lambda message, *a, **k: warnings.append(message))
    pipe.encode_scene_prompts([["a cat", "a dog " * 20]], None, False, max_sequence_length=16)
    assert len(warnings) == 1 and "scene 2" in warnings[0] and "16" in warnings[0] and "dog" in warnings[0]
