"""Input normalisation and checks of `Mask2DiTPipeline`.

Pure functions: each turns one user argument into the form the pipeline works with, or raises a
ValueError that names the parameter and says what it accepts. Nothing here falls back to a default when
a value is given (0 is a value, not "unset"); None is the only "unset".
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

from .attention import BACKENDS
from .layout import check_mask_variant

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What `attention_kwargs` may hold: the scene mask and attention backend, and the LoRA scale (as in CogVideoX).
ATTENTION_KWARGS = ("scene_mask", "attention_backend", "scale")

ScenePrompts = Union[str, List[str], List[List[str]]]
FrameCounts = Union[int, List[int]]


def is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """A value as an error message shows it: tensors by shape, others by repr (and type when not an int)."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"{value!r} ({type(value).__name__})" if not is_int(value) else repr(value)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def scene_prompt_lists(prompt: Any, name: str) -> List[List[str]]:
    """``prompt`` as ``[sample][scene]``: a str is one scene, a list of str one sample, a list of lists a batch."""
    accepted = (
        f"`{name}` must be a list with one prompt per scene (one sample), a list of such lists (a batch) or "
        "a single string (one scene)"
    )
    if isinstance(prompt, str):
        return [[prompt]]
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise ValueError(f"{accepted}; got {prompt!r}.")
    if is_str_list(prompt):
        return [list(prompt)]
    if all(is_str_list(sample) for sample in prompt):
        counts = [len(sample) for sample in prompt]
        if min(counts) == 0:
            raise ValueError(f"{accepted}; sample {counts.index(0)} has no scene prompts.")
        if len(set(counts)) != 1:
            raise ValueError(f"Every sample of `{name}` must have the same number of scenes; got {counts}.")
        return [list(sample) for sample in prompt]
    raise ValueError(f"{accepted}; got {prompt!r}.")


def negative_prompt_lists(negative_prompt: Any, batch_size: int, num_scenes: int) -> List[List[str]]:
    """``negative_prompt`` as ``[sample][scene]`` for ``batch_size`` samples of ``num_scenes`` scenes."""
    if negative_prompt is None:
        negative_prompt = ""
    if isinstance(negative_prompt, str):
        return [[negative_prompt] * num_scenes for _ in range(batch_size)]
    if is_str_list(negative_prompt) and len(negative_prompt) == num_scenes:
        return [list(negative_prompt) for _ in range(batch_size)]
    if (
        isinstance(negative_prompt, (list, tuple))
        and len(negative_prompt) == batch_size
        and all(is_str_list(sample) and len(sample) == num_scenes for sample in negative_prompt)
    ):
        return [list(sample) for sample in negative_prompt]
    raise ValueError(
        f"`negative_prompt` must be a string (used for every scene), a list with one string per scene "
        f"({num_scenes}) or a list of {batch_size} such lists (one per sample); got {negative_prompt!r}."
    )


def new_scene_prompts(prompt: Any, batch_size: int, batched: bool) -> List[List[str]]:
    """The new scenes' prompts of `extend` as ``[sample][scene]``, matching the context's batch layout."""
    if not batched:
        if isinstance(prompt, str) or is_str_list(prompt):
            return scene_prompt_lists(prompt, "prompt")
        raise ValueError(
            "`prompt` must be a string or a list of strings (the new scenes) when `context_prompts` is one sample "
            f"(a list of strings); got {prompt!r}."
        )
    if not isinstance(prompt, (list, tuple)) or len(prompt) != batch_size:
        raise ValueError(
            f"With a batch of {batch_size} samples in `context_prompts`, `prompt` must be a list of {batch_size} "
            f"entries, each a string or a list of strings (that sample's new scenes); got {prompt!r}."
        )
    new = []
    for index, entry in enumerate(prompt):
        if not (isinstance(entry, str) or (is_str_list(entry) and len(entry) > 0)):
            raise ValueError(f"`prompt[{index}]` must be a string or a non-empty list of strings; got {entry!r}.")
        new.append(scene_prompt_lists(entry, "prompt")[0])
    return new


def scene_embeddings(embeds: Any, name: str, text_dim: Optional[int]) -> torch.Tensor:
    """Prompt embeddings checked and seen as ``(B, n, L, D)``: n scenes of L tokens each.

    ``(B, n, L, D)`` holds n scenes (`encode_prompt` of scene lists); ``(B, L, D)`` (of a string) is one scene.
    """
    if not torch.is_tensor(embeds) or embeds.dim() not in (3, 4):
        raise ValueError(
            f"`{name}` must be a tensor (batch, num_scenes, tokens, dim), or (batch, tokens, dim) for one scene, as "
            f"`encode_prompt` returns them; got {_describe(embeds)}."
        )
    if embeds.dim() == 3:
        embeds = embeds[:, None]
    batch_size, _, length, dim = embeds.shape
    if text_dim is not None and dim != text_dim:
        raise ValueError(
            f"`{name}` has width {dim} but the transformer takes text embeddings of width {text_dim} "
            "(`transformer.config.text_embed_dim`, the text encoder's hidden size)."
        )
    if min(batch_size, length) == 0:
        raise ValueError(f"`{name}` is empty: shape {tuple(embeds.shape)}.")
    return embeds


def joined_scene_embeddings(
    embeds: torch.Tensor, num_videos_per_prompt: int, device, dtype
) -> Tuple[torch.Tensor, List[int]]:
    """Checked embeddings ``(B, n, L, D)`` -> ``(B * num_videos_per_prompt, n * L, D)``, the scenes one after the
    other as the transformer takes them, and the text length of each scene (``[L] * n``)."""
    batch_size, num_scenes, length, dim = embeds.shape
    embeds = embeds.to(device=device, dtype=dtype).repeat_interleave(num_videos_per_prompt, dim=0)
    return embeds.reshape(batch_size * num_videos_per_prompt, num_scenes * length, dim), [length] * num_scenes


# --------------------------------------------------------------------------------------------------
# Numbers and options
# --------------------------------------------------------------------------------------------------


def positive_int(value: Any, name: str, meaning: str = "") -> int:
    """``value`` as an int >= 1; bools, floats and strings are refused, not converted."""
    if not is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive int{meaning}; got {_describe(value)}.")
    return int(value)


def check_scenes_per_window(value: Any) -> None:
    """``generate_long``'s window: at least one context scene and one new scene."""
    if not is_int(value) or value < 2:
        raise ValueError(
            f"`scenes_per_window` must be an int >= 2 (scene extension needs at least one context scene); "
            f"got {value!r}."
        )


def per_scene_counts(value: FrameCounts, num_scenes: int, name: str) -> List[int]:
    """An int for every scene, or a list with one int per scene."""
    if is_int(value):
        return [int(value)] * num_scenes
    if isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
        if len(value) != num_scenes:
            raise ValueError(f"`{name}` lists {len(value)} scenes but there are {num_scenes} scene prompts.")
        return [int(v) for v in value]
    raise ValueError(
        f"`{name}` must be an int (every scene) or a list of {num_scenes} ints (one per scene); got {value!r}."
    )


def pixel_size(value: Any, name: str, factor: int, detail: str) -> int:
    """A pixel height or width: a positive int multiple of ``factor`` (``detail`` says why)."""
    if not is_int(value):
        raise ValueError(
            f"`{name}` must be an int number of pixels, a positive multiple of {factor}; got {_describe(value)}."
        )
    if value <= 0 or value % factor:
        lower = max(factor, (int(value) // factor) * factor)
        nearest = f"{lower} and {lower + factor}" if value > factor else str(factor)
        raise ValueError(
            f"`{name}` must be a positive multiple of {factor} ({detail}); got {value!r}. Nearest valid values: "
            f"{nearest}."
        )
    return int(value)


def check_sampling(sampling: Any, max_text_seq_length: int) -> None:
    """The `SamplingOptions` every generation shares: step counts (with ``timesteps`` the step count is their number
    and ``num_inference_steps`` is not used), a finite guidance scale >= 0 (<= 1: no guidance), ``eta`` >= 0, a text
    length up to the transformer's ``max_text_seq_length`` (None: that length) and the output type."""
    if sampling.timesteps is None:
        positive_int(sampling.num_inference_steps, "num_inference_steps", " (denoising steps)")
    elif len(sampling.timesteps) == 0:
        raise ValueError("`timesteps` must list at least one timestep; got an empty list.")
    for name in ("guidance_scale", "eta"):
        value = getattr(sampling, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value < float("inf"):
            meaning = " (<= 1 turns guidance off)" if name == "guidance_scale" else " (DDIM's noise; 0 is deterministic)"
            raise ValueError(f"`{name}` must be a finite number >= 0{meaning}; got {_describe(value)}.")
    if sampling.max_sequence_length is not None:
        positive_int(sampling.max_sequence_length, "max_sequence_length", " (text tokens per scene prompt)")
        if sampling.max_sequence_length > max_text_seq_length:
            raise ValueError(
                f"`max_sequence_length` must be at most the transformer's `max_text_seq_length` ({max_text_seq_length}), "
                f"the text length it was trained with; got {sampling.max_sequence_length}."
            )
    if sampling.output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}; got {sampling.output_type!r}.")


def check_options(
    callback_on_step_end_tensor_inputs: Optional[Sequence[str]],
    allowed_tensor_inputs: Sequence[str],
    attention_kwargs: Optional[Dict[str, Any]],
) -> None:
    """Callback tensor names and the scene mask / attention backend of ``attention_kwargs``."""
    if callback_on_step_end_tensor_inputs is not None and not all(
        k in allowed_tensor_inputs for k in callback_on_step_end_tensor_inputs
    ):
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` must be among {list(allowed_tensor_inputs)}; got "
            f"{callback_on_step_end_tensor_inputs}."
        )
    attention_kwargs = attention_kwargs or {}
    unknown = sorted(set(attention_kwargs) - set(ATTENTION_KWARGS))
    if unknown:
        raise ValueError(f"`attention_kwargs` takes the keys {list(ATTENTION_KWARGS)}; got unknown {unknown}.")
    if "scene_mask" in attention_kwargs:
        check_mask_variant(attention_kwargs["scene_mask"], "attention_kwargs['scene_mask']")
    if attention_kwargs.get("attention_backend", "auto") not in BACKENDS:
        raise ValueError(
            f"`attention_kwargs['attention_backend']` must be one of {list(BACKENDS)}; got "
            f"{attention_kwargs['attention_backend']!r}."
        )


def check_latents(latents: Optional[torch.Tensor], expected_shape: Tuple[int, ...], spatial_factor: int) -> None:
    if latents is not None and (not torch.is_tensor(latents) or tuple(latents.shape) != tuple(expected_shape)):
        raise ValueError(
            f"`latents` must have shape {tuple(expected_shape)} (batch x videos per prompt, latent frames "
            f"of the scenes to denoise, channels, height/{spatial_factor}, width/{spatial_factor}); got "
            f"{_describe(latents)}."
        )


def check_frame_counts(
    counts: Sequence[int], name: str, is_valid: Callable[[int], bool], multi_scene: bool
) -> None:
    """Pixel frame counts: any positive count for one scene (as `CogVideoXPipeline` takes); with several scenes
    a count the VAE decodes back exactly, so that scenes join frame-exact and can be re-encoded as context."""
    for index, frames in enumerate(counts):
        if frames < 1:
            raise ValueError(f"`{name}` must be a positive number of frames; scene {index + 1} has {frames}.")
        if not multi_scene or is_valid(frames):
            continue
        lower = next((f for f in range(frames - 1, 0, -1) if is_valid(f)), None)
        upper = next(f for f in range(frames + 1, frames + 64) if is_valid(f))
        nearest = f"{lower} and {upper}" if lower else str(upper)
        raise ValueError(
            f"`{name}` must be a pixel frame count the VAE decodes back exactly (1, 9, 17, ..., 49: 4k+1 frames with "
            f"an odd number k+1 of latent frames) when there are several scenes, so that each scene's frames join the "
            f"next exactly and can be encoded again as context; scene {index + 1} has {frames}. Nearest valid values: "
            f"{nearest}."
        )


# --------------------------------------------------------------------------------------------------
# Pixel frames
# --------------------------------------------------------------------------------------------------


def _float_frames(frames: Any, name: str) -> Any:
    """uint8 frames -> float in [0, 1]; float frames must already be in [0, 1]; PIL images pass through."""
    if isinstance(frames, PIL.Image.Image):
        return frames
    if isinstance(frames, np.ndarray) or torch.is_tensor(frames):
        if frames.dtype in (np.uint8, torch.uint8):
            return frames.astype(np.float32) / 255.0 if isinstance(frames, np.ndarray) else frames.float() / 255.0
        if torch.is_tensor(frames):
            is_float, empty = torch.is_floating_point(frames), frames.numel() == 0
        else:
            is_float, empty = np.issubdtype(frames.dtype, np.floating), frames.size == 0
        if not is_float:
            raise ValueError(
                f"`{name}` must hold uint8 values in [0, 255] or floats in [0, 1]; got dtype {frames.dtype}."
            )
        if empty:
            raise ValueError(f"`{name}` is empty: shape {tuple(frames.shape)}.")
        low, high = float(frames.min()), float(frames.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"`{name}` float values must be in [0, 1] (or pass uint8 frames in [0, 255]); got values in "
                f"[{low:g}, {high:g}]."
            )
        return frames
    raise ValueError(
        f"`{name}` must be a list of PIL images, a numpy array or a torch tensor of frames; got "
        f"{type(frames).__name__}."
    )


def pixel_scene(scene: Any, name: str) -> Any:
    """One scene's frames in a form `VideoProcessor.preprocess_video` reads as intended (floats in [0, 1])."""
    if isinstance(scene, PIL.Image.Image) or (hasattr(scene, "ndim") and scene.ndim < 4):
        raise ValueError(
            f"`{name}` must be a video (a list of frames or a (frames, ...) array); got a single image. Wrap one "
            "scene's frames in a list: `context_frames=[frames]`."
        )
    if isinstance(scene, (list, tuple)):
        if len(scene) == 0:
            raise ValueError(f"`{name}` has no frames.")
        return [_float_frames(frame, f"{name}[{index}]") for index, frame in enumerate(scene)]
    return _float_frames(scene, name)


def scene_videos(
    scenes: Sequence[Any],
    video_processor: Any,
    height: Optional[int],
    width: Optional[int],
    is_valid_num_frames: Callable[[int], bool],
) -> Tuple[List[torch.Tensor], List[int]]:
    """Pixel scenes (formats as in `Mask2DiTPipeline.encode_video_scenes`) checked and made ready for the VAE.

    Returns:
        One video ``(B, 3, F, H, W)`` per scene, as `VideoProcessor.preprocess_video` makes it (values in [-1, 1],
        resized to ``height`` x ``width``; None keeps the frames' size, rounded down to the VAE's factor), and each
        scene's pixel frame count F. Every scene needs a count the VAE decodes back exactly, and the same B, H, W.
    """
    videos = []
    for index, scene in enumerate(scenes):
        scene = pixel_scene(scene, f"context_frames[{index}]")
        videos.append(video_processor.preprocess_video(scene, height=height, width=width))
    pixel_frames = [video.shape[2] for video in videos]
    check_frame_counts(pixel_frames, "context_frames", is_valid_num_frames, multi_scene=True)
    batch_sizes = {video.shape[0] for video in videos}
    if len(batch_sizes) != 1:
        raise ValueError(f"Every scene of `context_frames` must have the same batch size; got {sorted(batch_sizes)}.")
    # Scenes are encoded one by one and joined along frames: a mixed size would only fail there.
    sizes = {tuple(video.shape[-2:]) for video in videos}
    if len(sizes) != 1:
        raise ValueError(
            f"Every scene of `context_frames` must have the same (height, width), or pass `height` and `width` to "
            f"resize them all; got {sorted(sizes)}."
        )
    return videos, pixel_frames
