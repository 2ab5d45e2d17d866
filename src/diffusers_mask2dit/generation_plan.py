"""Describing a generation: the `GenerationPlan` that `Mask2DiTPipeline`'s core runs.

``__call__``, ``extend`` and ``generate_long`` each turn their arguments into a plan (scenes, frames per
scene, prompts or embeddings, clean context latents, sizes) in two steps, then run it through the one core,
`Mask2DiTPipeline._generate`:

1. ``check_call_inputs`` / ``check_extend_inputs`` check every argument (with the per-argument checks of
   `pipeline_inputs`) and return them normalised as `CallInputs` / `ExtendInputs`; a bad argument is refused
   here, before any model runs;
2. ``call_plan`` / ``extend_plan`` build the plan from those alone, doing the model work the plan needs
   (encoding a negative prompt for given embeddings, VAE-encoding context pixels).

A ``__call__`` is an ``extend`` without context; a long video is a first window and then one window per extra
scene (``window_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from .pipeline_inputs import (
    FrameCounts,
    check_frame_counts,
    check_latents,
    is_str_list,
    joined_scene_embeddings,
    negative_prompt_lists,
    new_scene_prompts,
    per_scene_counts,
    pixel_size,
    positive_int,
    scene_embeddings,
    scene_prompt_lists,
    scene_videos,
)
from .transformer import patch_aligned_frames


@dataclass
class GenerationPlan:
    """One generation as the core runs it: ``num_context_scenes`` clean scenes, then the scenes to denoise.

    Attributes:
        batch_size: samples ``B``; the model runs ``B * num_videos_per_prompt`` videos.
        scene_frames: latent frames of every scene, context scenes first.
        denoised_frames: latent frames as the model takes them: context scenes as given, new scenes rounded up
            to whole temporal patches (CogVideoX 1.5: filler noise frames in front, dropped after denoising).
        height, width: pixels.
        prompts, negative_prompts: ``[sample][scene]`` texts of every scene; None when embeddings are given.
        prompt_embeds, negative_prompt_embeds: ``(B * num_videos_per_prompt, n * L, D)``, or None to encode
            ``prompts``; ``text_lengths`` the tokens of each scene.
        context_latents: ``(B * num_videos_per_prompt, F_ctx, C, h, w)``, clean; None without context.
        latents: initial noise of the new scenes ``(B * num_videos_per_prompt, F_new, C, h, w)``, or None.
        description: progress-bar label.
    """

    batch_size: int
    num_videos_per_prompt: int
    scene_frames: List[int]
    denoised_frames: List[int]
    height: int
    width: int
    prompts: Optional[List[List[str]]] = None
    negative_prompts: Optional[List[List[str]]] = None
    prompt_embeds: Optional[torch.Tensor] = None
    negative_prompt_embeds: Optional[torch.Tensor] = None
    text_lengths: Optional[List[int]] = None
    num_context_scenes: int = 0
    context_latents: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None
    description: Optional[str] = None

    @property
    def new_frames(self) -> List[int]:
        """Latent frames of each scene to denoise, as denoised (with filler frames)."""
        return self.denoised_frames[self.num_context_scenes :]


@dataclass
class Mask2DiTPipelineOutput(BaseOutput):
    """Output of `Mask2DiTPipeline`.

    Args:
        frames: the whole video of each sample, all scenes one after the other: ``(B, F, H, W, 3)`` array
            for ``"np"``, ``(B, F, 3, H, W)`` tensor for ``"pt"``, a list of lists of PIL images for ``"pil"``,
            latents ``(B, F_latent, C, h, w)`` for ``"latent"``.
        scene_frames: per sample, the list of each scene's frames, in the same format (one scene per entry).
        latents: the final latents ``(B, F_latent, C, h, w)`` of all scenes, whatever ``output_type``: save them
            to continue exactly with ``extend(context_latents=...)`` (decoded video re-encoded is not exact).
    """

    frames: Union[torch.Tensor, np.ndarray, List[List[PIL.Image.Image]]]
    scene_frames: List[List[Any]]
    latents: Optional[torch.Tensor] = None


@dataclass
class SamplingOptions:
    """How a plan is denoised: the arguments ``__call__``, ``extend`` and ``generate_long`` share."""

    num_inference_steps: int
    timesteps: Optional[List[int]]
    guidance_scale: float
    use_dynamic_cfg: bool
    eta: float
    generator: Optional[Union[torch.Generator, List[torch.Generator]]]
    attention_kwargs: Optional[Dict[str, Any]]
    callback_on_step_end: Optional[Callable]
    callback_on_step_end_tensor_inputs: List[str]
    max_sequence_length: Optional[int]
    output_type: str = "pil"

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0


def with_generation_defaults(sampling: SamplingOptions, defaults: Dict[str, Any]) -> SamplingOptions:
    """``sampling`` with the options left at None taken from a folder's ``defaults`` (`generation_defaults`), then
    CogVideoX's (50 steps, guidance 6); a ``scene_mask`` default joins ``attention_kwargs`` unless given there."""
    if sampling.num_inference_steps is None:
        sampling.num_inference_steps = defaults.get("num_inference_steps", 50)
    if sampling.guidance_scale is None:
        sampling.guidance_scale = defaults.get("guidance_scale", 6.0)
    if "scene_mask" in defaults and "scene_mask" not in (sampling.attention_kwargs or {}):
        sampling.attention_kwargs = {**(sampling.attention_kwargs or {}), "scene_mask": defaults["scene_mask"]}
    return sampling


# --------------------------------------------------------------------------------------------------
# Checked inputs: what the caller asked for, every argument checked and normalised
# --------------------------------------------------------------------------------------------------


@dataclass
class CallInputs:
    """The arguments of ``__call__`` (or ``generate_long``) once `check_call_inputs` has accepted them; `call_plan`
    builds the plan from these alone.

    Attributes:
        batch_size: samples ``B``.
        num_videos_per_prompt: videos made of each sample.
        num_frames: pixel frames of every scene (in `ExtendInputs`, the context scenes first).
        height, width: pixels, defaults filled in.
        prompts: ``[sample][scene]`` texts; None with ``prompt_embeds``.
        negative_prompts: ``[sample][scene]`` texts. With ``prompts``, the unconditional texts of guidance; with
            ``prompt_embeds``, the texts to encode into the negative embeddings (None when ``negative_prompt_embeds``
            is given or there is no guidance).
        prompt_embeds: ``(B, n, L, D)``, the given embeddings (a one-scene ``(B, L, D)`` seen as n = 1), or None.
        negative_prompt_embeds: given with ``prompt_embeds`` under guidance: ``(B, n', L', D)`` with
            ``n' * L' = n * L``; None otherwise.
        latents: initial noise of the scenes to denoise, its shape checked:
            ``(B * num_videos_per_prompt, F_new, C, height / vae_scale, width / vae_scale)``; or None.
    """

    batch_size: int
    num_videos_per_prompt: int
    num_frames: List[int]
    height: int
    width: int
    prompts: Optional[List[List[str]]] = None
    negative_prompts: Optional[List[List[str]]] = None
    prompt_embeds: Optional[torch.Tensor] = None
    negative_prompt_embeds: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None


@dataclass
class ExtendInputs(CallInputs):
    """The arguments of ``extend`` once `check_extend_inputs` has accepted them (prompts, not embeddings); `extend_plan`
    builds the plan from these alone. ``prompts``, ``negative_prompts`` and ``num_frames`` cover the context scenes,
    then the new ones.

    Attributes:
        num_context_scenes: the clean scenes in front.
        context_latents: ``(b, F_ctx, C, height / vae_scale, width / vae_scale)``, exactly the context scenes'
            frames, b one of 1, ``B`` and ``B * num_videos_per_prompt``; None when the context comes as pixels.
        context_videos: instead, one pixel video ``(b, 3, F, height, width)`` per context scene, values in [-1, 1],
            for the VAE to encode.
        context_generator: samples the VAE posterior of ``context_videos``; None takes its mode.
    """

    num_context_scenes: int = 0
    context_latents: Optional[torch.Tensor] = None
    context_videos: Optional[List[torch.Tensor]] = None
    context_generator: Optional[torch.Generator] = None


def pixel_dimension(pipe, value: Any, name: str) -> int:
    """A given ``height`` or ``width``: a positive multiple of what the VAE and the transformer's patches divide."""
    patch_size, spatial = pipe.transformer.config.patch_size, pipe.vae_scale_factor_spatial
    return pixel_size(value, name, spatial * patch_size, f"VAE x{spatial} times patch {patch_size}")


def plan_pixel_size(pipe, height: Any, width: Any) -> Tuple[int, int]:
    """``height`` and ``width`` checked; None takes the folder's `generation_defaults`, then the transformer's sample
    size (nothing else is a default)."""
    config = pipe.transformer.config
    defaults = getattr(pipe, "generation_defaults", {})
    default_height = defaults.get("height", config.sample_height * pipe.vae_scale_factor_spatial)
    default_width = defaults.get("width", config.sample_width * pipe.vae_scale_factor_spatial)
    return (
        default_height if height is None else pixel_dimension(pipe, height, "height"),
        default_width if width is None else pixel_dimension(pipe, width, "width"),
    )


def scene_frame_counts(pipe, num_frames: Optional[FrameCounts], num_scenes: int, name: str) -> List[int]:
    """``num_frames`` as one pixel frame count per scene; None takes `generation_defaults`, then ``sample_frames``."""
    default = getattr(pipe, "generation_defaults", {}).get("num_frames", pipe.transformer.config.sample_frames)
    return per_scene_counts(default if num_frames is None else num_frames, num_scenes, name)


def scene_latent_frames(pipe, num_frames: List[int], num_context_scenes: int = 0) -> Tuple[List[int], List[int]]:
    """Latent frames of scenes of ``num_frames`` pixel frames: each scene's, and each scene's as denoised."""
    scene_frames = [pipe.latent_frames(frames) for frames in num_frames]
    # CogVideoX 1.5 denoises whole temporal patches: like `CogVideoXPipeline`, each new scene gets filler noise
    # frames in front, dropped before decoding. Context scenes are given as they are.
    new_frames = patch_aligned_frames(scene_frames[num_context_scenes:], pipe.transformer.config.patch_size_t)
    return scene_frames, scene_frames[:num_context_scenes] + new_frames


def check_noise(pipe, latents: Any, num_videos: int, num_frames: List[int], num_context_scenes: int, height: int,
                width: int) -> None:
    """The initial noise ``latents``, when given: ``(num_videos, F_new, C, height / vae_scale, width / vae_scale)``
    with F_new the latent frames the new scenes are denoised with (after the ``num_context_scenes`` in front)."""
    factor = pipe.vae_scale_factor_spatial
    denoised = scene_latent_frames(pipe, num_frames, num_context_scenes)[1]
    shape = (num_videos, sum(denoised[num_context_scenes:]), pipe.transformer.config.in_channels)
    check_latents(latents, shape + (height // factor, width // factor), factor)


def check_call_inputs(
    pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, num_frames,
    num_videos_per_prompt, latents, guidance_scale, prompt_name: str = "prompt",
) -> CallInputs:
    """Every argument of ``__call__`` checked, in this order: sizes, videos per prompt, prompts or prompt embeddings
    ``(B, n, L, D)`` / ``(B, L, D)``, frame counts, initial noise. Raises the ValueError of the first bad one."""
    height, width = plan_pixel_size(pipe, height, width)
    positive_int(num_videos_per_prompt, "num_videos_per_prompt")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of `prompt` (one string per scene) and `prompt_embeds` (B, n, L, D).")
    if prompt is not None:
        if negative_prompt_embeds is not None:
            raise ValueError(
                "`negative_prompt_embeds` goes with `prompt_embeds`; with `prompt` pass `negative_prompt`."
            )
        prompts = scene_prompt_lists(prompt, prompt_name)
        batch_size, num_scenes = len(prompts), len(prompts[0])
        texts = dict(prompts=prompts, negative_prompts=negative_prompt_lists(negative_prompt, batch_size, num_scenes))
    else:
        texts = check_prompt_embeds(pipe, prompt_embeds, negative_prompt, negative_prompt_embeds, guidance_scale)
        batch_size, num_scenes = texts["prompt_embeds"].shape[:2]
    counts = scene_frame_counts(pipe, num_frames, num_scenes, "num_frames")
    check_frame_counts(counts, "num_frames", pipe.is_valid_num_frames, multi_scene=num_scenes > 1)
    check_noise(pipe, latents, batch_size * num_videos_per_prompt, counts, 0, height, width)
    return CallInputs(
        batch_size=batch_size, num_videos_per_prompt=num_videos_per_prompt, num_frames=counts, height=height,
        width=width, latents=latents, **texts,
    )


def check_prompt_embeds(pipe, prompt_embeds, negative_prompt, negative_prompt_embeds, guidance_scale) -> Dict[str, Any]:
    """`CallInputs` fields from ``prompt_embeds``: the embeddings seen as ``(B, n, L, D)`` and what guidance needs,
    the given ``negative_prompt_embeds`` or else the ``negative_prompt`` texts (default "") to encode for every
    scene, as `CogVideoXPipeline` does. Without guidance neither is used, so neither is checked."""
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
    text_dim = pipe.transformer.config.text_embed_dim
    embeds = scene_embeddings(prompt_embeds, "prompt_embeds", text_dim)
    fields: Dict[str, Any] = dict(prompt_embeds=embeds)
    if guidance_scale <= 1.0:
        return fields
    if negative_prompt_embeds is None:
        if pipe.text_encoder is None:
            raise ValueError("With `prompt_embeds` and `guidance_scale` > 1, pass `negative_prompt_embeds` too.")
        fields["negative_prompts"] = negative_prompt_lists(negative_prompt, embeds.shape[0], embeds.shape[1])
        return fields
    negative = scene_embeddings(negative_prompt_embeds, "negative_prompt_embeds", text_dim)
    # Both are joined to (B, n * L, D) for the transformer: that is the shape that must agree.
    joined = [(e.shape[0], e.shape[1] * e.shape[2], e.shape[3]) for e in (negative, embeds)]
    if joined[0] != joined[1]:
        raise ValueError(
            f"`negative_prompt_embeds` must have the shape of `prompt_embeds`; got "
            f"{tuple(negative_prompt_embeds.shape)} and {tuple(prompt_embeds.shape)}."
        )
    fields["negative_prompt_embeds"] = negative
    return fields


def check_extend_inputs(
    pipe, prompt, context_prompts, context_latents, context_frames, num_new_scenes, negative_prompt, num_frames,
    context_num_frames, height, width, num_videos_per_prompt, latents, context_generator,
) -> ExtendInputs:
    """Every argument of ``extend`` checked, before any model runs: prompts, the new scenes' frame counts, the
    context (``context_latents`` sliced to the context scenes, or ``context_frames`` preprocessed for the VAE),
    sizes (None: the context's), negative prompts, the context's shape and batch, initial noise."""
    positive_int(num_videos_per_prompt, "num_videos_per_prompt")
    context, new = extend_prompt_lists(prompt, context_prompts, num_new_scenes)
    batch_size, num_context_scenes = len(context), len(context[0])
    if (context_latents is None) == (context_frames is None):
        raise ValueError(
            "Pass exactly one of `context_latents` (B, F, C, h, w) and `context_frames` (one video per context "
            "scene)."
        )
    # Sizes given are checked before the context is read; None stays None: the context's size.
    height = None if height is None else pixel_dimension(pipe, height, "height")
    width = None if width is None else pixel_dimension(pipe, width, "width")
    new_counts = scene_frame_counts(pipe, num_frames, num_new_scenes, "num_frames")
    # Checked before `context_num_frames` defaults to them.
    check_frame_counts(new_counts, "num_frames", pipe.is_valid_num_frames, multi_scene=True)
    context_videos = None
    if context_frames is not None:
        context_videos, context_counts = context_scene_videos(
            pipe, context_frames, context_num_frames, num_context_scenes, height, width
        )
        context_batch_size, context_size = context_videos[0].shape[0], context_videos[0].shape[-2:]
    else:
        context_latents, context_counts = context_scene_latents(
            pipe, context_latents, context_num_frames, num_context_scenes, new_counts[0]
        )
        context_batch_size = context_latents.shape[0]
        context_size = [size * pipe.vae_scale_factor_spatial for size in context_latents.shape[-2:]]
    # Sizes left at None are the context's: the preprocessed pixels' (the VAE encodes H to H / vae_scale exactly).
    height = pixel_dimension(pipe, context_size[0], "height") if height is None else height
    width = pixel_dimension(pipe, context_size[1], "width") if width is None else width
    negatives = negative_prompt_lists(negative_prompt, batch_size, num_context_scenes + num_new_scenes)
    # Pixels were resized to `height`/`width`; their latent channels are the VAE's, checked once it has encoded.
    if context_latents is not None:
        check_context_shape(pipe, context_latents, height, width)
    check_context_batch(context_batch_size, batch_size, num_videos_per_prompt)
    counts = context_counts + new_counts
    check_noise(pipe, latents, batch_size * num_videos_per_prompt, counts, num_context_scenes, height, width)
    return ExtendInputs(
        batch_size=batch_size, num_videos_per_prompt=num_videos_per_prompt, num_frames=counts, height=height,
        width=width, prompts=[ctx + new_scenes for ctx, new_scenes in zip(context, new)], negative_prompts=negatives,
        latents=latents, num_context_scenes=num_context_scenes, context_latents=context_latents,
        context_videos=context_videos, context_generator=context_generator,
    )


def extend_prompt_lists(prompt, context_prompts, num_new_scenes) -> Tuple[List[List[str]], List[List[str]]]:
    """The context scenes' and the new scenes' prompts, each ``[sample][scene]``, ``num_new_scenes`` new ones."""
    context = scene_prompt_lists(context_prompts, "context_prompts")
    new = new_scene_prompts(prompt, len(context), batched=not is_str_list(context_prompts))
    positive_int(num_new_scenes, "num_new_scenes")
    counts = sorted({len(sample) for sample in new})
    if counts != [num_new_scenes]:
        raise ValueError(
            f"`prompt` gives {counts if len(counts) > 1 else counts[0]} new scene prompt(s) per sample but "
            f"`num_new_scenes` is {num_new_scenes}; pass one prompt per new scene."
        )
    return context, new


def context_scene_videos(
    pipe, context_frames, context_num_frames, num_context_scenes, height, width
) -> Tuple[List[torch.Tensor], List[int]]:
    """The last ``num_context_scenes`` videos of ``context_frames`` made ready for the VAE (`scene_videos`): each
    ``(b, 3, F, H, W)``, and each one's pixel frame count F."""
    if not isinstance(context_frames, (list, tuple)) or len(context_frames) < num_context_scenes:
        have = len(context_frames) if isinstance(context_frames, (list, tuple)) else "not a list"
        raise ValueError(
            f"`context_frames` must be a list with one video per context scene; {num_context_scenes} context "
            f"prompts need {num_context_scenes} videos, got {have}."
        )
    if context_num_frames is not None:
        raise ValueError(
            "`context_num_frames` describes `context_latents`; with `context_frames` each scene has its "
            "video's own frame count. Pass one of them."
        )
    scenes = context_frames[len(context_frames) - num_context_scenes :]
    return scene_videos(scenes, pipe.video_processor, height, width, pipe.is_valid_num_frames)


def context_scene_latents(
    pipe, context_latents, context_num_frames, num_context_scenes, default_frames
) -> Tuple[torch.Tensor, List[int]]:
    """The last ``num_context_scenes`` scenes' latents ``(b, F_ctx, C, h, w)`` of ``context_latents``, kept exactly as
    given, and each context scene's pixel frame count (``context_num_frames``, default ``default_frames``)."""
    if not torch.is_tensor(context_latents) or context_latents.dim() != 5:
        raise ValueError(
            f"`context_latents` must be a tensor (batch, latent frames, channels, height/8, width/8); got "
            f"{getattr(context_latents, 'shape', type(context_latents).__name__)}."
        )
    counts = scene_frame_counts(
        pipe, default_frames if context_num_frames is None else context_num_frames, num_context_scenes,
        "context_num_frames",
    )
    check_frame_counts(counts, "context_num_frames", pipe.is_valid_num_frames, multi_scene=True)
    needed = sum(pipe.latent_frames(frames) for frames in counts)
    if context_latents.shape[1] < needed:
        raise ValueError(
            f"`context_latents` has {context_latents.shape[1]} latent frames, but {num_context_scenes} context "
            f"scenes of {counts} pixel frames need {needed}: the context is shorter than needed."
        )
    return context_latents[:, context_latents.shape[1] - needed :], counts


def check_context_shape(pipe, context_latents: torch.Tensor, height: int, width: int) -> None:
    """Context latents ``(b, F_ctx, C, h, w)``: C the transformer's channels, h and w those of ``height``/``width``."""
    factor = pipe.vae_scale_factor_spatial
    expected = (pipe.transformer.config.in_channels, height // factor, width // factor)
    if tuple(context_latents.shape[2:]) != expected:
        raise ValueError(
            f"The context latents are (channels, h, w) = {tuple(context_latents.shape[2:])} but `height`/`width` "
            f"and the transformer need {expected}."
        )


def check_context_batch(context_batch_size: int, batch_size: int, num_videos_per_prompt: int) -> None:
    """The context serves all samples (1), one per sample (``B``) or one per video (``B * num_videos_per_prompt``)."""
    if context_batch_size not in (1, batch_size, batch_size * num_videos_per_prompt):
        raise ValueError(
            f"The context has batch size {context_batch_size}; it must be 1, the number of samples "
            f"({batch_size}) or samples x `num_videos_per_prompt` ({batch_size * num_videos_per_prompt})."
        )


# --------------------------------------------------------------------------------------------------
# Plans: built from checked inputs, raising nothing on the caller's input
# --------------------------------------------------------------------------------------------------


def plan_scenes(pipe, inputs: CallInputs, num_context_scenes: int = 0, **fields) -> GenerationPlan:
    """The plan of the scenes of ``inputs`` (the first ``num_context_scenes`` clean); ``fields`` are its texts or
    embeddings."""
    scene_frames, denoised_frames = scene_latent_frames(pipe, inputs.num_frames, num_context_scenes)
    return GenerationPlan(
        batch_size=inputs.batch_size,
        num_videos_per_prompt=inputs.num_videos_per_prompt,
        scene_frames=scene_frames,
        denoised_frames=denoised_frames,
        height=inputs.height,
        width=inputs.width,
        num_context_scenes=num_context_scenes,
        latents=inputs.latents,
        **fields,
    )


def call_plan(pipe, inputs: CallInputs) -> GenerationPlan:
    """The plan of ``__call__`` (or of ``generate_long``'s whole story): scenes from prompts, encoded later by the
    core, or from ``prompt_embeds``, laid out here (with the negative prompt encoded when guidance needs it)."""
    if inputs.prompt_embeds is None:
        return plan_scenes(pipe, inputs, prompts=inputs.prompts, negative_prompts=inputs.negative_prompts)
    dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
    device, videos = pipe._execution_device, inputs.num_videos_per_prompt
    embeds, text_lengths = joined_scene_embeddings(inputs.prompt_embeds, videos, device, dtype)
    negative = None
    if inputs.negative_prompt_embeds is not None:
        negative, _ = joined_scene_embeddings(inputs.negative_prompt_embeds, videos, device, dtype)
    elif inputs.negative_prompts is not None:
        negative = pipe.encode_scene_prompts(
            inputs.negative_prompts, None, False, videos, text_lengths[0], device, dtype
        )[0]
    return plan_scenes(
        pipe, inputs, prompt_embeds=embeds, negative_prompt_embeds=negative, text_lengths=text_lengths
    )


def extend_plan(pipe, inputs: ExtendInputs) -> GenerationPlan:
    """The plan of ``extend``: the context scenes (``context_videos`` VAE-encoded here), then the new scenes."""
    context_latents = inputs.context_latents
    if context_latents is None:
        context_latents = encode_scene_videos(pipe, inputs.context_videos, inputs.context_generator)
        # The one check after model work: the VAE's latent channels show only once it has encoded (the latent
        # height and width follow from the videos' checked size).
        check_context_shape(pipe, context_latents, inputs.height, inputs.width)
    plan = plan_scenes(
        pipe, inputs, inputs.num_context_scenes, prompts=inputs.prompts, negative_prompts=inputs.negative_prompts
    )
    plan.context_latents = context_batch(context_latents, inputs.batch_size, inputs.num_videos_per_prompt)
    return plan


def encode_scene_videos(pipe, videos: List[torch.Tensor], generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pixel videos ``(b, 3, F_i, H, W)`` (from `scene_videos`) -> latents ``(b, sum F_latent, C, h, w)``, each
    scene encoded on its own (as scenes are decoded), scaled like the pipeline's latents. ``generator`` samples
    the VAE posterior; None takes its mode (deterministic)."""
    latents = []
    for video in videos:
        posterior = pipe.vae.encode(video.to(device=pipe._execution_device, dtype=pipe.vae.dtype)).latent_dist
        scene_latents = posterior.mode() if generator is None else posterior.sample(generator)
        latents.append(pipe.vae_scaling_factor_image * scene_latents.permute(0, 2, 1, 3, 4))
    return torch.cat(latents, dim=1)


def context_batch(context_latents: torch.Tensor, batch_size: int, num_videos_per_prompt: int) -> torch.Tensor:
    """Context latents of 1, ``B`` or ``B * num_videos_per_prompt`` samples (`check_context_batch`) ->
    ``B * num_videos_per_prompt``."""
    if context_latents.shape[0] == batch_size and num_videos_per_prompt > 1:
        return context_latents.repeat_interleave(num_videos_per_prompt, dim=0)
    if context_latents.shape[0] == 1 and batch_size * num_videos_per_prompt > 1:
        return context_latents.expand(batch_size * num_videos_per_prompt, -1, -1, -1, -1)
    return context_latents


def window_plan(story, start, stop, num_context, scene_latents, positive, negative) -> GenerationPlan:
    """The plan of scenes ``start:stop`` of ``story``, the first ``num_context`` of them the clean context
    (``scene_latents`` holds every scene made so far; ``positive`` / ``negative`` each scene's embeddings)."""
    first_new = start + num_context
    noise = None
    if story.latents is not None:
        offsets = np.cumsum([0] + story.denoised_frames).tolist()
        noise = story.latents[:, offsets[first_new] : offsets[stop]]
    return GenerationPlan(
        batch_size=story.batch_size,
        num_videos_per_prompt=story.num_videos_per_prompt,
        scene_frames=story.scene_frames[start:stop],
        denoised_frames=story.scene_frames[start:first_new] + story.denoised_frames[first_new:stop],
        height=story.height,
        width=story.width,
        prompt_embeds=torch.cat(positive[start:stop], dim=1),
        negative_prompt_embeds=None if negative is None else torch.cat(negative[start:stop], dim=1),
        text_lengths=story.text_lengths[start:stop],
        num_context_scenes=num_context,
        context_latents=torch.cat(scene_latents[start:first_new], dim=1) if num_context else None,
        latents=noise,
        description=f"scenes 1-{stop}/{len(story.scene_frames)}" if start == 0 and not num_context
        else f"scene {stop}/{len(story.scene_frames)}",
    )
