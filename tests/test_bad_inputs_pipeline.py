"""Bad input to `Mask2DiTPipeline`: every case ends in a ValueError that names the parameter (issue 15).

Nothing is silently replaced: 0 is a value, not "unset", so ``num_frames=0`` or ``height=0`` is refused
rather than taken as the default. Each case also names what is accepted. Cases that are not errors but a
documented behaviour (uint8 pixel frames) are tested at the end.
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from diffusers_mask2dit import Mask2DiTPipeline
from diffusers_mask2dit.tiny import build_tiny_components

PROMPTS = ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the ocean"]
CONTEXT = dict(prompt="a fish swims", context_prompts=PROMPTS[:2])


@pytest.fixture(scope="module")
def pipe():
    pipe = Mask2DiTPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def no_denoising(pipe, monkeypatch):
    """Fails the test if the transformer runs: errors must come before any generation work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the transformer ran before the bad input was refused")

    monkeypatch.setattr(pipe.transformer, "forward", refuse)


def context_latents(batch=1, frames=6, size=8):
    return torch.randn(batch, frames, 4, size, size, generator=torch.Generator().manual_seed(0))


CALL_CASES = [
    # Zero and negative sizes are not "unset": they are refused, never replaced by the defaults.
    (dict(num_frames=0), "`num_frames` must be a positive number of frames; scene 1 has 0"),
    (dict(num_frames=-3), "`num_frames` must be a positive number of frames"),
    (dict(num_frames=[9, 0, 9]), "`num_frames` must be a positive number of frames; scene 2 has 0"),
    (dict(num_frames=9.0), "`num_frames` must be an int"),
    (dict(num_frames="9"), "`num_frames` must be an int"),
    (dict(height=0), r"`height` must be a positive multiple of 16.*got 0"),
    (dict(width=0), r"`width` must be a positive multiple of 16.*got 0"),
    (dict(height=-64), "`height` must be a positive multiple of 16"),
    (dict(height=64.0), r"`height` must be an int number of pixels.*got 64\.0 \(float\)"),
    (dict(width="64"), r"`width` must be an int number of pixels"),
    (dict(height=True), r"`height` must be an int number of pixels"),
    # Step counts, videos per prompt, text length.
    (dict(num_inference_steps=0), r"`num_inference_steps` must be a positive int \(denoising steps\); got 0"),
    (dict(num_inference_steps=-2), "`num_inference_steps` must be a positive int"),
    (dict(num_inference_steps=2.5), "`num_inference_steps` must be a positive int"),
    (dict(timesteps=[]), "`timesteps` must list at least one timestep"),
    (dict(num_videos_per_prompt=0), "`num_videos_per_prompt` must be a positive int; got 0"),
    (dict(num_videos_per_prompt=-1), "`num_videos_per_prompt` must be a positive int"),
    (dict(max_sequence_length=0), r"`max_sequence_length` must be a positive int \(text tokens"),
    # Prompts and embeddings.
    (dict(prompt=5), "`prompt` must be a list with one prompt per scene"),
    (dict(prompt=[["a cat"], "a dog"]), "`prompt` must be a list with one prompt per scene"),
    (dict(negative_prompt=3), "`negative_prompt` must be a string"),
    (dict(negative_prompt_embeds=torch.zeros(1, 3, 226, 32)), "`negative_prompt_embeds` goes with `prompt_embeds`"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 3, 226, 31)), r"`prompt_embeds` has width 31 .*width 32"),
    (dict(prompt=None, prompt_embeds=torch.zeros(226, 32)), r"`prompt_embeds` must be a tensor \(batch, num_scenes"),
    (dict(prompt=None, prompt_embeds=np.zeros((1, 226, 32))), "`prompt_embeds` must be a tensor"),
    (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 2, 226, 32), negative_prompt_embeds=torch.zeros(1, 3, 226, 32)),
        "`negative_prompt_embeds` must have the shape of `prompt_embeds`",
    ),
    (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 226, 32), negative_prompt_embeds=torch.zeros(1, 226, 31)),
        "`negative_prompt_embeds` has width 31",
    ),
    (
        dict(prompt=None, prompt_embeds=torch.zeros(1, 226, 32), negative_prompt="x",
             negative_prompt_embeds=torch.zeros(1, 226, 32)),
        "at most one of `negative_prompt` and `negative_prompt_embeds`",
    ),
    # Options.
    (dict(output_type="video"), "`output_type` must be one of"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "`callback_on_step_end_tensor_inputs` must be among"),
    (dict(latents=torch.zeros(1, 9, 4, 8, 9)), r"`latents` must have shape \(1, 9, 4, 8, 8\)"),
    (dict(latents=np.zeros((1, 9, 4, 8, 8))), r"`latents` must have shape \(1, 9, 4, 8, 8\)"),
    (dict(attention_kwargs={"attention_backend": "fast"}), r"`attention_kwargs\['attention_backend'\]`"),
    # Issue 21: values that used to run silently.
    (dict(guidance_scale=-1.0), r"`guidance_scale` must be a finite number >= 0 .*got -1\.0"),
    (dict(guidance_scale=float("nan")), "`guidance_scale` must be a finite number >= 0"),
    (dict(eta=-0.5), r"`eta` must be a finite number >= 0 .*got -0\.5"),
    (dict(attention_kwargs={"scene_msk": "v1"}), r"`attention_kwargs` takes the keys .*unknown \['scene_msk'\]"),
    (dict(max_sequence_length=227), r"`max_sequence_length` must be at most the transformer's .*\(226\).*got 227"),
]


@pytest.mark.parametrize("kwargs, match", CALL_CASES)
def test_bad_call_input_names_the_parameter(pipe, no_denoising, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**{"prompt": PROMPTS, "num_inference_steps": 1, "output_type": "latent", **kwargs})


def test_a_float_height_is_not_given_nearest_multiples_that_contain_it(pipe, no_denoising):
    with pytest.raises(ValueError) as error:
        pipe(PROMPTS, height=64.0, num_inference_steps=1)
    assert "16 and 32" not in str(error.value)


EXTEND_CASES = [
    (dict(context_latents=context_latents(), num_frames=0), "`num_frames` must be a positive number of frames"),
    (dict(context_latents=context_latents(), context_num_frames=0), "`context_num_frames` must be a positive number"),
    (dict(context_latents=context_latents(), context_num_frames=[9, 9.0]), "`context_num_frames` must be an int"),
    (dict(context_latents=context_latents(), height=0), r"`height` must be a positive multiple of 16.*got 0"),
    (dict(context_latents=context_latents(), width=64.0), "`width` must be an int number of pixels"),
    # A size that does not match the context is refused before any denoising.
    (dict(context_latents=context_latents(), height=128), r"context latents are \(channels, h, w\).*`height`/`width`"),
    (dict(context_latents=context_latents(), num_new_scenes=0), "`num_new_scenes` must be a positive int; got 0"),
    (dict(context_latents=context_latents(), num_inference_steps=0), "`num_inference_steps` must be a positive int"),
    (dict(context_latents=context_latents(), num_videos_per_prompt=0), "`num_videos_per_prompt` must be a positive"),
    (dict(context_latents=context_latents(), max_sequence_length=-1), "`max_sequence_length` must be a positive int"),
    (dict(context_latents=context_latents()[0]), r"`context_latents` must be a tensor \(batch, latent frames"),
    (dict(context_latents=context_latents(), latents=torch.zeros(1, 2, 4, 8, 8)), r"`latents` must have shape"),
    (dict(context_latents=context_latents(), output_type="gif"), "`output_type` must be one of"),
    (
        dict(context_frames=[np.zeros((9, 64, 64, 3), np.float32)] * 2, context_num_frames=9),
        "`context_num_frames` describes `context_latents`",
    ),
    (
        dict(context_frames=[np.full((9, 64, 64, 3), 200.0, np.float32)] * 2),
        r"`context_frames\[0\]` float values must be in \[0, 1\] \(or pass uint8 frames in \[0, 255\]\)",
    ),
    (
        dict(context_frames=[np.zeros((9, 64, 64, 3), np.int32)] * 2),
        r"`context_frames\[0\]` must hold uint8 values in \[0, 255\] or floats in \[0, 1\]",
    ),
    (dict(context_frames=[np.zeros((64, 64, 3), np.uint8)] * 2), r"`context_frames\[0\]` must be a video"),
    (dict(context_frames=[[], []]), r"`context_frames\[0\]` has no frames"),
]


@pytest.mark.parametrize("kwargs, match", EXTEND_CASES)
def test_bad_extend_input_names_the_parameter(pipe, no_denoising, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.extend(**{**CONTEXT, "num_inference_steps": 1, "output_type": "latent", **kwargs})


LONG_CASES = [
    (dict(scenes_per_window=1), "`scenes_per_window` must be an int >= 2"),
    (dict(scenes_per_window=True), "`scenes_per_window` must be an int >= 2"),
    (dict(scenes_per_window=2.0), "`scenes_per_window` must be an int >= 2"),
    (dict(prompts=[]), "`prompts` must be a list with one prompt per scene"),
    (dict(num_frames=0), "`num_frames` must be a positive number of frames"),
    (dict(num_frames=[9, 9]), "`num_frames` lists 2 scenes but there are 4"),
    (dict(height=0), "`height` must be a positive multiple of 16"),
    (dict(num_inference_steps=-1), "`num_inference_steps` must be a positive int"),
    (dict(num_videos_per_prompt=0), "`num_videos_per_prompt` must be a positive int"),
    (dict(negative_prompt=["blurry", "dark"]), r"`negative_prompt` must be a string .*one string per scene \(4\)"),
    (dict(latents=torch.zeros(1, 9, 4, 8, 8)), r"`latents` must have shape \(1, 12, 4, 8, 8\)"),
    (dict(output_type="mp4"), "`output_type` must be one of"),
    (dict(callback_on_step_end_tensor_inputs=["timestep"]), "`callback_on_step_end_tensor_inputs` must be among"),
]


@pytest.mark.parametrize("kwargs, match", LONG_CASES)
def test_bad_generate_long_input_names_the_parameter(pipe, no_denoising, kwargs, match):
    arguments = {"prompts": PROMPTS + ["a fish swims"], "num_inference_steps": 1, "output_type": "latent", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.generate_long(**arguments)


# ------------------------------------------------------------------------------------------------
# Documented behaviour rather than an error
# ------------------------------------------------------------------------------------------------


def test_uint8_context_frames_are_read_as_0_to_255(pipe):
    """`read_video` returns uint8 frames: they are scaled to [0, 1] first, not taken as [0, 1] values."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
    as_float = [scene.astype(np.float32) / 255.0 for scene in frames]
    expected, _ = pipe.encode_video_scenes(as_float)
    from_uint8, counts = pipe.encode_video_scenes(frames)
    from_tensor, _ = pipe.encode_video_scenes([torch.from_numpy(s).permute(0, 3, 1, 2) for s in frames])
    assert counts == [9, 9]
    assert torch.equal(from_uint8, expected) and torch.equal(from_tensor, expected)
    output = pipe.extend(**CONTEXT, context_frames=frames, num_inference_steps=1, output_type="latent")
    assert torch.equal(output.frames[:, :6], expected)


def test_a_folders_generation_defaults_fill_what_the_caller_leaves_out(pipe, tmp_path):
    """`generation_defaults.json` is saved and loaded with the folder; arguments left at None take it, given ones win."""
    run = dict(prompt=PROMPTS[:2], output_type="latent")
    pipe.generation_defaults = {"num_inference_steps": 2, "guidance_scale": 1.0, "num_frames": 1}
    try:
        pipe.save_pretrained(str(tmp_path / "folder"))
    finally:
        pipe.generation_defaults = {}
    loaded = Mask2DiTPipeline.from_pretrained(str(tmp_path / "folder"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.generation_defaults == {"num_inference_steps": 2, "guidance_scale": 1.0, "num_frames": 1}
    defaulted = loaded(**run, generator=torch.Generator().manual_seed(0))
    explicit = loaded(**run, num_inference_steps=2, guidance_scale=1.0, num_frames=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(defaulted.frames, explicit.frames)
    other = loaded(**run, num_inference_steps=3, guidance_scale=1.0, num_frames=1, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(defaulted.frames, other.frames)  # the comparison can fail
    assert loaded(**run, num_frames=9, num_inference_steps=1).frames.shape[1] == 6  # given values win


def test_bad_generation_defaults_name_the_file(tmp_path):
    from diffusers_mask2dit.release_loading import load_generation_defaults

    (tmp_path / "generation_defaults.json").write_text('{"steps": 20}')
    with pytest.raises(ValueError, match=r"generation_defaults.json must be a JSON object with keys among .*\['steps'\]"):
        load_generation_defaults(str(tmp_path), {})


def test_loading_our_own_folder_prints_no_config_warning(pipe, tmp_path):
    """diffusers would say the saved `attn_mask_variant` "will be ignored"; the pipeline reads it back, so no warning."""
    from diffusers.utils import logging as diffusers_logging

    pipe.transformer.register_to_config(attn_mask_variant="v3")
    try:
        pipe.save_pretrained(str(tmp_path / "folder"))
    finally:
        pipe.transformer.register_to_config(attn_mask_variant="v2")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        loaded = Mask2DiTPipeline.from_pretrained(str(tmp_path / "folder"))
        stock = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "folder"), subfolder="transformer")
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert loaded.transformer.config.attn_mask_variant == "v3"
    ignored = [r.getMessage() for r in records if "will be ignored" in r.getMessage()]
    assert len(ignored) == 1 and "attn_mask_variant" in ignored[0]  # the stock class alone still says so
