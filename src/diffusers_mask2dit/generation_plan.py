"""Describing a generation: the `GenerationPlan` that `Mask2DiTPipeline`'s core runs.

``__call__``, ``extend`` and ``generate_long`` each turn their arguments into a plan (scenes, frames per
scene, prompts or embeddings, clean context latents, sizes) with the functions here, then run it through
the one core, `Mask2DiTPipeline._generate`. A ``__call__`` is an ``extend`` without context; a long video is
a first window and then one window per extra scene.
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
    negative_prompt_lists,
    new_scene_prompts,
    per_scene_counts,
    pixel_size,
    positive_int,
    scene_embeddings,
    scene_prompt_lists,
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


def plan_pixel_size(pipe, height: Any, width: Any) -> Tuple[int, int]:
    """``height`` and ``width`` checked; None takes the folder's `generation_defaults`, then the transformer's sample
    size (nothing else is a default)."""
    config = pipe.transformer.config
    factor = pipe.vae_scale_factor_spatial * config.patch_size
    detail = f"VAE x{pipe.vae_scale_factor_spatial} times patch {config.patch_size}"
    defaults = getattr(pipe, "generation_defaults", {})
    default_height = defaults.get("height", config.sample_height * pipe.vae_scale_factor_spatial)
    default_width = defaults.get("width", config.sample_width * pipe.vae_scale_factor_spatial)
    return (
        default_height if height is None else pixel_size(height, "height", factor, detail),
        default_width if width is None else pixel_size(width, "width", factor, detail),
    )

def scene_frame_counts(pipe, num_frames: Optional[FrameCounts], num_scenes: int, name: str) -> List[int]:
    default = getattr(pipe, "generation_defaults", {}).get("num_frames", pipe.transformer.config.sample_frames)
    return per_scene_counts(default if num_frames is None else num_frames, num_scenes, name)

def check_plan(pipe, plan: GenerationPlan) -> None:
    """The shape of the initial noise ``plan.latents``, when given."""
    shape = (
        plan.batch_size * plan.num_videos_per_prompt,
        sum(plan.new_frames),
        pipe.transformer.config.in_channels,
        plan.height // pipe.vae_scale_factor_spatial,
        plan.width // pipe.vae_scale_factor_spatial,
    )
    check_latents(plan.latents, shape, pipe.vae_scale_factor_spatial)

def plan_scenes(pipe, num_frames: List[int], num_context_scenes: int = 0, **fields) -> GenerationPlan:
    """A plan of scenes of ``num_frames`` pixel frames (context first: their counts are checked by the caller);
    ``fields`` fill the rest of `GenerationPlan`."""
    new_counts = num_frames[num_context_scenes:]
    check_frame_counts(new_counts, "num_frames", pipe.is_valid_num_frames, multi_scene=len(num_frames) > 1)
    scene_frames = [pipe.latent_frames(frames) for frames in num_frames]
    # CogVideoX 1.5 denoises whole temporal patches: like `CogVideoXPipeline`, each new scene gets filler noise
    # frames in front, dropped before decoding. Context scenes are given as they are.
    new_frames = patch_aligned_frames(scene_frames[num_context_scenes:], pipe.transformer.config.patch_size_t)
    denoised = scene_frames[:num_context_scenes] + new_frames
    return GenerationPlan(
        scene_frames=scene_frames, denoised_frames=denoised, num_context_scenes=num_context_scenes, **fields
    )

def call_plan(
    pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_frames, guidance_scale,
    prompt_name: str = "prompt", **fields,
) -> GenerationPlan:
    """The plan of ``__call__``: scenes from prompts, or from prompt embeddings ``(B, n, L, D)`` / ``(B, L, D)``."""
    positive_int(fields["num_videos_per_prompt"], "num_videos_per_prompt")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of `prompt` (one string per scene) and `prompt_embeds` (B, n, L, D).")
    if prompt is not None:
        if negative_prompt_embeds is not None:
            raise ValueError(
                "`negative_prompt_embeds` goes with `prompt_embeds`; with `prompt` pass `negative_prompt`."
            )
        prompts = scene_prompt_lists(prompt, prompt_name)
        batch_size, num_scenes = len(prompts), len(prompts[0])
        negatives = negative_prompt_lists(negative_prompt, batch_size, num_scenes)
        fields.update(prompts=prompts, negative_prompts=negatives)
    else:
        embeds = scene_embeds(pipe, prompt_embeds, negative_prompt, negative_prompt_embeds, guidance_scale, fields)
        fields.update(embeds)
        batch_size, num_scenes = prompt_embeds.shape[0], len(embeds["text_lengths"])
    counts = scene_frame_counts(pipe, num_frames, num_scenes, "num_frames")
    return plan_scenes(pipe, counts, batch_size=batch_size, **fields)

def scene_embeds(pipe, prompt_embeds, negative_prompt, negative_prompt_embeds, guidance_scale, fields):
    """Plan fields from prompt embeddings; with guidance and no ``negative_prompt_embeds``, ``negative_prompt``
    (default "") is encoded for every scene, as `CogVideoXPipeline` does."""
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
    dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
    device, text_dim = pipe._execution_device, pipe.transformer.config.text_embed_dim
    videos = fields["num_videos_per_prompt"]
    embeds, text_lengths = scene_embeddings(prompt_embeds, "prompt_embeds", videos, text_dim, device, dtype)
    negative = None
    if guidance_scale > 1.0 and negative_prompt_embeds is None:
        if pipe.text_encoder is None:
            raise ValueError("With `prompt_embeds` and `guidance_scale` > 1, pass `negative_prompt_embeds` too.")
        negatives = negative_prompt_lists(negative_prompt, prompt_embeds.shape[0], len(text_lengths))
        negative = pipe.encode_scene_prompts(negatives, None, False, videos, text_lengths[0], device, dtype)[0]
    elif guidance_scale > 1.0:
        negative, _ = scene_embeddings(
            negative_prompt_embeds, "negative_prompt_embeds", videos, text_dim, device, dtype
        )
        if negative.shape != embeds.shape:
            raise ValueError(
                f"`negative_prompt_embeds` must have the shape of `prompt_embeds`; got "
                f"{tuple(negative_prompt_embeds.shape)} and {tuple(prompt_embeds.shape)}."
            )
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, text_lengths=text_lengths)

def extend_plan(
    pipe, prompt, context_prompts, context_latents, context_frames, num_new_scenes, negative_prompt, num_frames,
    context_num_frames, height, width, context_generator, **fields,
) -> GenerationPlan:
    """The plan of ``extend``: the context scenes (latents, or pixels encoded here), then the new scenes."""
    positive_int(fields["num_videos_per_prompt"], "num_videos_per_prompt")
    context = scene_prompt_lists(context_prompts, "context_prompts")
    new = new_scene_prompts(prompt, len(context), batched=not is_str_list(context_prompts))
    positive_int(num_new_scenes, "num_new_scenes")
    counts = sorted({len(sample) for sample in new})
    if counts != [num_new_scenes]:
        raise ValueError(
            f"`prompt` gives {counts if len(counts) > 1 else counts[0]} new scene prompt(s) per sample but "
            f"`num_new_scenes` is {num_new_scenes}; pass one prompt per new scene."
        )
    batch_size, num_context_scenes = len(context), len(context[0])
    if (context_latents is None) == (context_frames is None):
        raise ValueError(
            "Pass exactly one of `context_latents` (B, F, C, h, w) and `context_frames` (one video per context "
            "scene)."
        )
    plan_pixel_size(pipe, height, width)  # sizes given are checked before the context is encoded
    new_counts = scene_frame_counts(pipe, num_frames, num_new_scenes, "num_frames")
    # Checked before `context_num_frames` defaults to them.
    check_frame_counts(new_counts, "num_frames", pipe.is_valid_num_frames, multi_scene=True)
    context_latents, context_counts = resolve_context(
        pipe, context_latents, context_frames, context_num_frames, num_context_scenes, new_counts[0], height, width,
        context_generator,
    )
    # Sizes not given are the context's.
    context_height, context_width = (size * pipe.vae_scale_factor_spatial for size in context_latents.shape[-2:])
    height, width = plan_pixel_size(
        pipe, context_height if height is None else height, context_width if width is None else width
    )
    plan = plan_scenes(
        pipe, context_counts + new_counts, num_context_scenes, batch_size=batch_size, height=height, width=width,
        prompts=[ctx + new_scenes for ctx, new_scenes in zip(context, new)],
        negative_prompts=negative_prompt_lists(negative_prompt, batch_size, num_context_scenes + num_new_scenes),
        **fields,
    )
    factor = pipe.vae_scale_factor_spatial
    expected = (pipe.transformer.config.in_channels, height // factor, width // factor)
    if tuple(context_latents.shape[2:]) != expected:
        raise ValueError(
            f"The context latents are (channels, h, w) = {tuple(context_latents.shape[2:])} but `height`/`width` "
            f"and the transformer need {expected}."
        )
    plan.context_latents = context_batch(context_latents, batch_size, plan.num_videos_per_prompt)
    return plan

def resolve_context(
    pipe, context_latents, context_frames, context_num_frames, num_context_scenes, default_frames, height, width,
    generator,
) -> Tuple[torch.Tensor, List[int]]:
    """The last ``num_context_scenes`` scenes' latents ``(B, F_ctx, C, h, w)``, kept exactly as given (or encoded
    from ``context_frames``), and each context scene's pixel frame count."""
    if context_frames is not None:
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
        return pipe.encode_video_scenes(scenes, height, width, generator)
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

def context_batch(context_latents: torch.Tensor, batch_size: int, num_videos_per_prompt: int) -> torch.Tensor:
    """Context latents of 1, ``B`` or ``B * num_videos_per_prompt`` samples -> ``B * num_videos_per_prompt``."""
    effective_batch = batch_size * num_videos_per_prompt
    if context_latents.shape[0] == batch_size and num_videos_per_prompt > 1:
        context_latents = context_latents.repeat_interleave(num_videos_per_prompt, dim=0)
    elif context_latents.shape[0] == 1 and effective_batch > 1:
        context_latents = context_latents.expand(effective_batch, -1, -1, -1, -1)
    if context_latents.shape[0] != effective_batch:
        raise ValueError(
            f"The context has batch size {context_latents.shape[0]}; it must be 1, the number of samples "
            f"({batch_size}) or samples x `num_videos_per_prompt` ({effective_batch})."
        )
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
