"""One scene behaves as `CogVideoXPipeline`, and long videos do each job once (issue 13, pipeline side).

- every frame count `CogVideoXPipeline` takes for one scene (8, 48, ...) gives the stock output;
- a pipeline with ``transformer=None`` encodes prompts like the stock one;
- 3-D prompt embeddings (what `encode_prompt` returns) are one scene; without negative embeddings,
  guidance encodes the negative prompt as stock does;
- the pipeline passes RoPE to the transformer itself, as stock does;
- ``generate_long`` runs the text encoder once per distinct prompt, moves each model once, and takes
  ``latents``, ``callback_on_step_end`` and per-scene negative prompts;
- outputs carry the final latents, from which ``extend`` continues exactly.
"""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline
from test_pipeline import PROMPTS, gen, make_pipe, pipe  # noqa: F401  (shared helpers and the `pipe` fixture)

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.tiny import build_tiny_components

STORY = PROMPTS + ["a fish swims", "a boat sails", "a train crosses a bridge"]


# ------------------------------------------------------------------------------------------------
# One scene is CogVideoX
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style, num_frames", [("5b", 8), ("5b", 48), ("5b", 10), ("2b", 8), ("1.5", 8), ("1.5", 12)])
def test_one_scene_takes_every_frame_count_stock_takes(style, num_frames):
    kwargs = dict(num_frames=num_frames, num_inference_steps=2, output_type="pt")
    expected = make_pipe(style, cls=CogVideoXPipeline)("a cat walks", generator=gen(), **kwargs).frames
    output = make_pipe(style)("a cat walks", generator=gen(), **kwargs)
    assert output.frames.shape == expected.shape
    assert (output.frames - expected).abs().max() < 1e-4
    assert len(output.scene_frames[0]) == 1 and output.scene_frames[0][0].shape[0] == expected.shape[1]


def test_several_scenes_still_need_frame_counts_that_join_exactly(pipe):
    with pytest.raises(ValueError, match=r"`num_frames`.*when there are several scenes.*scene 1 has 8"):
        pipe(PROMPTS[:2], num_frames=8, num_inference_steps=1)


def test_text_encoder_only_pipeline_encodes_prompts_like_stock():
    components = build_tiny_components()
    text_only = {"tokenizer": components["tokenizer"], "text_encoder": components["text_encoder"]}
    ours = Mask2DiTPipeline(**text_only, vae=None, transformer=None, scheduler=None)
    stock = CogVideoXPipeline(**text_only, vae=None, transformer=None, scheduler=None)
    embeds, negative = ours.encode_prompt("a cat walks", "blurry", do_classifier_free_guidance=True)
    expected, expected_negative = stock.encode_prompt("a cat walks", "blurry", do_classifier_free_guidance=True)
    assert torch.equal(embeds, expected) and torch.equal(negative, expected_negative)
    with pytest.raises(ValueError, match="no transformer"):
        ours("a cat walks", num_inference_steps=1)


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_three_dimensional_prompt_embeds_are_one_scene_without_text_encoders(guidance_scale):
    """Embeddings from a text-encoder-only pipeline drive a pipeline without text encoders to the full output."""
    components = build_tiny_components()
    text_only = Mask2DiTPipeline(components["tokenizer"], components["text_encoder"], None, None, None)
    with torch.no_grad():  # as inside the pipeline: T5's numerics differ slightly with autograd on
        embeds, negative = text_only.encode_prompt("a cat walks", "", do_classifier_free_guidance=True)
    no_text = Mask2DiTPipeline(**{**components, "tokenizer": None, "text_encoder": None})
    no_text.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent")
    from_text = make_pipe()("a cat walks", generator=gen(), **kwargs).frames
    from_embeds = no_text(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=gen(), **kwargs).frames
    assert torch.equal(from_embeds, from_text)


def test_prompt_embeds_without_negative_embeds_encode_the_negative_prompt(pipe):
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("a cat walks", do_classifier_free_guidance=False)
    kwargs = dict(num_inference_steps=2, output_type="latent", negative_prompt="blurry")
    from_text = pipe("a cat walks", generator=gen(), **kwargs).frames
    assert torch.equal(pipe(prompt_embeds=embeds, generator=gen(), **kwargs).frames, from_text)


@pytest.mark.parametrize("style", ["5b", "1.5"])
def test_the_pipeline_passes_rope_over_all_scenes(style, monkeypatch):
    pipe = make_pipe(style)
    seen = []
    forward = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["image_rotary_emb"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    pipe(PROMPTS, num_frames=[9, 1, 9], num_inference_steps=1, output_type="latent")
    frames = [3, 1, 3] if style == "5b" else [4, 2, 4]  # 1.5: whole temporal patches of 2
    expected = pipe._prepare_rotary_positional_embeddings(64, 64, sum(frames), torch.device("cpu"))
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], expected))
    assert seen[0][0].shape[0] == sum(frames) // (2 if style == "1.5" else 1) * 16


# ------------------------------------------------------------------------------------------------
# Long videos: each prompt encoded once, each model moved once
# ------------------------------------------------------------------------------------------------


def test_generate_long_encodes_each_prompt_once_and_uses_each_model_in_one_run(pipe, monkeypatch):
    calls = []
    for name in ("text_encoder", "transformer", "vae"):
        module = getattr(pipe, name)
        forward = module.forward if name != "vae" else module.decode

        def spy(*args, _name=name, _forward=forward, **kwargs):
            calls.append(_name)
            return _forward(*args, **kwargs)

        monkeypatch.setattr(module, "forward" if name != "vae" else "decode", spy)
    story = [f"scene {index}: {text}" for index, text in enumerate(STORY + STORY[:4])]  # 10 scenes
    output = pipe.generate_long(story, num_inference_steps=1, guidance_scale=6.0, output_type="np")
    assert output.frames.shape == (1, 90, 64, 64, 3)
    # 10 prompts and one negative prompt (the same "" for every scene): 11 text-encoder runs, not 48.
    assert calls.count("text_encoder") == 11
    # Text encoder, then transformer (8 windows x 1 step), then the VAE: with model offloading each moves once.
    runs = [name for index, name in enumerate(calls) if index == 0 or calls[index - 1] != name]
    assert runs == ["text_encoder", "transformer", "vae"] and calls.count("transformer") == 8


def test_generate_long_latents_are_each_windows_noise_in_order(pipe):
    shapes = [(1, 9, 4, 8, 8), (1, 3, 4, 8, 8), (1, 3, 4, 8, 8)]  # first window of 3 scenes, then one scene each
    generator = gen(5)
    noise = torch.cat([torch.randn(shape, generator=generator) for shape in shapes], dim=1)
    kwargs = dict(num_inference_steps=2, output_type="latent")
    from_generator = pipe.generate_long(STORY[:5], generator=gen(5), **kwargs).frames
    from_latents = pipe.generate_long(STORY[:5], latents=noise, **kwargs).frames
    assert torch.equal(from_latents, from_generator)


def test_generate_long_callback_sees_every_step_of_every_window(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {}

    pipe.generate_long(STORY[:4], num_inference_steps=2, output_type="latent", callback_on_step_end=callback)
    assert seen == [(0, (1, 9, 4, 8, 8)), (1, (1, 9, 4, 8, 8)), (0, (1, 3, 4, 8, 8)), (1, (1, 3, 4, 8, 8))]


def test_generate_long_takes_a_negative_prompt_per_scene(pipe):
    kwargs = dict(num_inference_steps=2, output_type="latent")
    plain = pipe.generate_long(STORY[:4], generator=gen(), **kwargs).frames
    per_scene = pipe.generate_long(STORY[:4], negative_prompt=["", "", "", "blurry"], generator=gen(), **kwargs).frames
    assert torch.equal(per_scene[:, :9], plain[:, :9])  # the first window's negatives are the same
    assert not torch.equal(per_scene[:, 9:], plain[:, 9:])


# ------------------------------------------------------------------------------------------------
# Exact latents in every output
# ------------------------------------------------------------------------------------------------


def test_output_latents_let_extend_continue_exactly(pipe):
    decoded = pipe(PROMPTS[:2], num_inference_steps=2, generator=gen(), output_type="np")
    latent = pipe(PROMPTS[:2], num_inference_steps=2, generator=gen(), output_type="latent")
    assert torch.equal(decoded.latents, latent.frames) and torch.equal(latent.latents, latent.frames)
    extended = pipe.extend("a fish swims", context_prompts=PROMPTS[:2], context_latents=decoded.latents,
                           num_inference_steps=2, generator=gen(1), output_type="np")
    assert torch.equal(extended.latents[:, :6], decoded.latents)
    np.testing.assert_array_equal(extended.frames[:, :18], decoded.frames)
    assert pipe(PROMPTS[:1], num_inference_steps=1, output_type="latent", return_dict=False)[0].shape == (1, 3, 4, 8, 8)


@pytest.mark.parametrize("prompt", ["a cat walks", PROMPTS, [PROMPTS, PROMPTS[::-1]]], ids=["string", "scenes", "batch"])
@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_encode_prompt_gives_the_embeddings_call_reads_as_the_same_prompt(pipe, prompt, guidance_scale):
    """`encode_prompt(p)` is what `__call__(p)` encodes: a scene list is (B, n, L, D), never n one-scene videos."""
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(prompt, "blurry", do_classifier_free_guidance=guidance_scale > 1)
    scenes = 1 if isinstance(prompt, str) else len(PROMPTS)
    batch = 2 if isinstance(prompt[0], list) else 1
    assert embeds.shape[:-2] == ((batch,) if scenes == 1 else (batch, scenes))
    assert (negative is None) == (guidance_scale == 1.0) and (negative is None or negative.shape == embeds.shape)
    kwargs = dict(num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent")
    from_text = pipe(prompt, negative_prompt="blurry", generator=gen(), **kwargs).frames
    from_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=gen(), **kwargs).frames
    assert torch.equal(from_embeds, from_text)


def test_encode_prompt_refuses_ragged_scene_lists(pipe):
    with pytest.raises(ValueError, match="same number of scenes"):
        pipe.encode_prompt([PROMPTS, PROMPTS[:2]])
    with pytest.raises(ValueError, match="`negative_prompt` must be"):
        pipe.encode_prompt(PROMPTS, ["blurry", "dark"])
