"""Mask²DiT text-to-multi-scene-video pipeline: n scenes in one pass, scene extension, long videos.

`Mask2DiTPipeline` subclasses diffusers' `CogVideoXPipeline` and reuses its prompt encoding, latent
preparation, VAE decoding, scheduler handling and LoRA loading. What it adds:

- ``__call__``: one prompt per scene; the scenes' prompt embeddings and latents are concatenated and
  denoised together by `Mask2DiTTransformer3DModel` under the Mask²DiT scene mask;
- ``extend``: the next scene(s) conditioned on the last scenes, held clean at timestep 0 (the paper's
  segment-level conditional mask); only the new scenes are denoised;
- ``generate_long``: a first window of n scenes, then one scene at a time over a sliding window of the
  last n-1 scenes' latents.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from transformers import T5EncoderModel, T5Tokenizer

from .attention import BACKENDS
from .layout import check_mask_variant
from .transformer import Mask2DiTTransformer3DModel, drop_leading_frames, patch_aligned_frames

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

# The released checkpoint (Hub `qth/Mask2DiT`) was trained on 3 scenes x 49 frames at 480x720, shown at 8 fps.
DEFAULT_NUM_SCENES = 3
DEFAULT_FPS = 8
OFFICIAL_MODEL_ID = "qth/Mask2DiT"

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_COMPONENT_NAMES = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
# Download options every component loader accepts.
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")

# Recent diffusers renamed `torch_dtype` to `dtype` and warn on the old name: pass the name it takes.
_DIFFUSERS_DTYPE_KWARG = (
    "dtype"
    if hasattr(importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype")
    else "torch_dtype"
)

ScenePrompts = Union[str, List[str], List[List[str]]]
FrameCounts = Union[int, List[int]]


@dataclass
class Mask2DiTPipelineOutput(BaseOutput):
    """Output of `Mask2DiTPipeline`.

    Args:
        frames: the whole video of each sample, all scenes one after the other: ``(B, F, H, W, 3)`` array
            for ``"np"``, ``(B, F, 3, H, W)`` tensor for ``"pt"``, a list of lists of PIL images for ``"pil"``,
            latents ``(B, F_latent, C, h, w)`` for ``"latent"``.
        scene_frames: per sample, the list of each scene's frames, in the same format (one scene per entry).
    """

    frames: Union[torch.Tensor, np.ndarray, List[List[PIL.Image.Image]]]
    scene_frames: List[List[Any]]


# --------------------------------------------------------------------------------------------------
# Input normalisation. Every helper raises a ValueError that names the parameter and what it accepts.
# --------------------------------------------------------------------------------------------------


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _scene_prompt_lists(prompt: Any, name: str) -> List[List[str]]:
    """``prompt`` as ``[sample][scene]``: a str is one scene, a list of str one sample, a list of lists a batch."""
    accepted = (
        f"`{name}` must be a list with one prompt per scene (one sample), a list of such lists (a batch) or "
        "a single string (one scene)"
    )
    if isinstance(prompt, str):
        return [[prompt]]
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise ValueError(f"{accepted}; got {prompt!r}.")
    if _is_str_list(prompt):
        return [list(prompt)]
    if all(_is_str_list(sample) for sample in prompt):
        counts = [len(sample) for sample in prompt]
        if min(counts) == 0:
            raise ValueError(f"{accepted}; sample {counts.index(0)} has no scene prompts.")
        if len(set(counts)) != 1:
            raise ValueError(f"Every sample of `{name}` must have the same number of scenes; got {counts}.")
        return [list(sample) for sample in prompt]
    raise ValueError(f"{accepted}; got {prompt!r}.")


def _negative_prompt_lists(negative_prompt: Any, batch_size: int, num_scenes: int) -> List[List[str]]:
    """``negative_prompt`` as ``[sample][scene]`` for ``batch_size`` samples of ``num_scenes`` scenes."""
    if negative_prompt is None:
        negative_prompt = ""
    if isinstance(negative_prompt, str):
        return [[negative_prompt] * num_scenes for _ in range(batch_size)]
    if _is_str_list(negative_prompt) and len(negative_prompt) == num_scenes:
        return [list(negative_prompt) for _ in range(batch_size)]
    if (
        isinstance(negative_prompt, (list, tuple))
        and len(negative_prompt) == batch_size
        and all(_is_str_list(sample) and len(sample) == num_scenes for sample in negative_prompt)
    ):
        return [list(sample) for sample in negative_prompt]
    raise ValueError(
        f"`negative_prompt` must be a string (used for every scene), a list with one string per scene "
        f"({num_scenes}) or a list of {batch_size} such lists (one per sample); got {negative_prompt!r}."
    )


def _new_scene_prompts(prompt: Any, batch_size: int, batched: bool) -> List[List[str]]:
    """The new scenes' prompts of `extend` as ``[sample][scene]``, matching the context's batch layout."""
    if not batched:
        if isinstance(prompt, str) or _is_str_list(prompt):
            return _scene_prompt_lists(prompt, "prompt")
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
        if not (isinstance(entry, str) or (_is_str_list(entry) and len(entry) > 0)):
            raise ValueError(f"`prompt[{index}]` must be a string or a non-empty list of strings; got {entry!r}.")
        new.append(_scene_prompt_lists(entry, "prompt")[0])
    return new


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _per_scene_counts(value: FrameCounts, num_scenes: int, name: str) -> List[int]:
    """An int for every scene, or a list with one int per scene."""
    if _is_int(value):
        return [int(value)] * num_scenes
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        if len(value) != num_scenes:
            raise ValueError(f"`{name}` lists {len(value)} scenes but there are {num_scenes} scene prompts.")
        return [int(v) for v in value]
    raise ValueError(
        f"`{name}` must be an int (every scene) or a list of {num_scenes} ints (one per scene); got {value!r}."
    )


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


class Mask2DiTPipeline(CogVideoXPipeline):
    r"""Multi-scene text-to-video generation with Mask²DiT on CogVideoX (2b, 5b and 1.5 transformers).

    Takes the components of a `CogVideoXPipeline`; a plain `CogVideoXTransformer3DModel` is turned into a
    `Mask2DiTTransformer3DModel` in place (same weights). LoRA loading (`load_lora_weights`, `set_adapters`,
    `fuse_lora`) and `save_lora_weights` come from `CogVideoXLoraLoaderMixin`. For less VAE memory use
    ``pipe.vae.enable_tiling()`` / ``pipe.vae.enable_slicing()``; scenes are decoded one at a time.

    Loading: ``Mask2DiTPipeline.from_pretrained(path_or_id)`` takes a CogVideoX folder, a folder saved by
    this pipeline, or the authors' released layout (component folders without ``model_index.json``).
    """

    default_fps = DEFAULT_FPS

    def __init__(
        self,
        tokenizer: T5Tokenizer,
        text_encoder: T5EncoderModel,
        vae: AutoencoderKLCogVideoX,
        transformer: CogVideoXTransformer3DModel,
        scheduler: SchedulerMixin,
    ):
        # A transformer saved by this pipeline comes back as a plain CogVideoX one; its config still holds
        # `attn_mask_variant`, which the conversion keeps.
        transformer = Mask2DiTTransformer3DModel.from_cogvideox(transformer)
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        # Record the transformer under its diffusers base class (same weights and keys): a saved folder stays a
        # CogVideoX checkpoint that this class, `CogVideoXPipeline` and `DiffusionPipeline(custom_pipeline=...)`
        # all load. diffusers cannot load a component recorded under an outside module's class name.
        self.register_to_config(transformer=("diffusers", "CogVideoXTransformer3DModel"))

    # ----------------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "Mask2DiTPipeline":
        """Load from a diffusers folder or Hub id; folders without ``model_index.json`` go to `from_official`.

        ``dtype`` and ``torch_dtype`` are the same option, passed on under the name the installed diffusers takes.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        if not _has_model_index(pretrained_model_name_or_path, kwargs):
            return cls.from_official(pretrained_model_name_or_path, dtype=dtype, **kwargs)
        if dtype is not None:
            kwargs[_DIFFUSERS_DTYPE_KWARG] = dtype
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_official(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike] = OFFICIAL_MODEL_ID,
        dtype: Optional[torch.dtype] = None,
        **kwargs,
    ) -> "Mask2DiTPipeline":
        """Load the authors' released layout: ``transformer/ vae/ text_encoder/ tokenizer/ scheduler/``, no
        ``model_index.json``, the transformer config naming the authors' class (and ``attn_msk_version``).

        ``dtype`` (or ``torch_dtype``) sets the models' dtype. Components passed by name (``vae=...``) are used as
        they are; download options (``revision``, ``cache_dir``, ``local_files_only``, ``token``, ...) go to every
        component's loader, other keyword arguments to the diffusers models' ``from_pretrained``.
        """
        import diffusers
        from diffusers.utils import is_transformers_version

        path = os.fspath(pretrained_model_name_or_path)
        components = {name: kwargs.pop(name) for name in _COMPONENT_NAMES if name in kwargs}
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        dtype = dtype or kwargs.pop("torch_dtype", None)
        diffusers_kwargs, text_kwargs = dict(kwargs), dict(hub_kwargs)
        if dtype is not None:
            diffusers_kwargs[_DIFFUSERS_DTYPE_KWARG] = dtype
            text_kwargs["dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype"] = dtype

        if "tokenizer" not in components:
            components["tokenizer"] = T5Tokenizer.from_pretrained(path, subfolder="tokenizer", **hub_kwargs)
        if "text_encoder" not in components:
            components["text_encoder"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", **text_kwargs)
        if "vae" not in components:
            components["vae"] = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", **diffusers_kwargs)
        if "transformer" not in components:
            components["transformer"] = Mask2DiTTransformer3DModel.from_pretrained(
                path, subfolder="transformer", **diffusers_kwargs
            )
        if "scheduler" not in components:
            scheduler_config = diffusers.CogVideoXDDIMScheduler.load_config(path, subfolder="scheduler", **hub_kwargs)
            # The release uses CogVideoXDDIMScheduler; honour another diffusers scheduler its config names.
            scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
            if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
                scheduler_class = diffusers.CogVideoXDDIMScheduler
            components["scheduler"] = scheduler_class.from_config(scheduler_config)
        return cls(**components)

    # ----------------------------------------------------------------------------------------------
    # Checks
    # ----------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        num_scenes: int,
        height: int,
        width: int,
        num_frames: List[int],
        callback_on_step_end_tensor_inputs: Optional[List[str]],
        attention_kwargs: Optional[Dict[str, Any]],
        latents: Optional[torch.Tensor] = None,
        expected_latents_shape: Optional[Tuple[int, ...]] = None,
        output_type: str = "pil",
    ) -> None:
        """Validate sizes, frame counts and options; every error names the parameter and what it accepts."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}; got {output_type!r}.")
        factor = self.vae_scale_factor_spatial * self.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % factor:
                lower = max(factor, (int(value) // factor) * factor) if isinstance(value, int) else factor
                raise ValueError(
                    f"`{name}` must be a positive multiple of {factor} (VAE x{self.vae_scale_factor_spatial} times "
                    f"patch {self.transformer.config.patch_size}); got {value!r}. Nearest valid values: "
                    f"{lower} and {lower + factor}."
                )
        for index, frames in enumerate(num_frames):
            self._check_num_frames(frames, "num_frames", index)
        if len(num_frames) != num_scenes:
            raise ValueError(f"`num_frames` lists {len(num_frames)} scenes but there are {num_scenes} scene prompts.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}; got "
                f"{callback_on_step_end_tensor_inputs}."
            )
        attention_kwargs = attention_kwargs or {}
        if "scene_mask" in attention_kwargs:
            check_mask_variant(attention_kwargs["scene_mask"], "attention_kwargs['scene_mask']")
        if attention_kwargs.get("attention_backend", "auto") not in BACKENDS:
            raise ValueError(
                f"`attention_kwargs['attention_backend']` must be one of {list(BACKENDS)}; got "
                f"{attention_kwargs['attention_backend']!r}."
            )
        if latents is not None and tuple(latents.shape) != tuple(expected_latents_shape):
            raise ValueError(
                f"`latents` must have shape {tuple(expected_latents_shape)} (batch, latent frames of all scenes, "
                f"channels, height/{self.vae_scale_factor_spatial}, width/{self.vae_scale_factor_spatial}); got "
                f"{tuple(latents.shape)}."
            )

    # ----------------------------------------------------------------------------------------------
    # Building blocks shared by __call__, extend and generate_long
    # ----------------------------------------------------------------------------------------------

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a scene of ``num_frames = 4k+1`` pixel frames: k+1."""
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1

    def decoded_frames(self, latent_frames: int) -> int:
        """Pixel frames the CogVideoX VAE decodes from ``latent_frames``.

        Each 2x temporal upsampling keeps the first frame apart only when the count is odd (n -> 2n - 1);
        an even count is doubled (n -> 2n). So 13 latent frames give 49, but 12 give 48, not 45.
        """
        frames = latent_frames
        for _ in range(int(math.log2(self.vae_scale_factor_temporal))):
            frames = 2 * frames - 1 if frames % 2 else 2 * frames
        return frames

    def is_valid_num_frames(self, num_frames: int) -> bool:
        """Whether a scene of ``num_frames`` pixel frames encodes and decodes back to that many frames
        (1, 9, 17, ..., 49, ... for CogVideoX: 4k+1 with an odd latent count k+1)."""
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            return False  # the first latent frame holds the first pixel frame alone, each later one 4 frames
        return self.decoded_frames(self.latent_frames(num_frames)) == num_frames

    def _check_num_frames(self, num_frames: int, name: str, scene_index: int) -> None:
        if self.is_valid_num_frames(num_frames):
            return
        lower = next((f for f in range(num_frames - 1, 0, -1) if self.is_valid_num_frames(f)), None)
        upper = next(f for f in range(max(num_frames, 0) + 1, max(num_frames, 1) + 64) if self.is_valid_num_frames(f))
        nearest = f"{lower} and {upper}" if lower else str(upper)
        raise ValueError(
            f"`{name}` must be a pixel frame count the VAE decodes back exactly (1, 9, 17, ..., 49: 4k+1 frames with "
            f"an odd number k+1 of latent frames); scene {scene_index + 1} has {num_frames}. Nearest valid values: "
            f"{nearest}."
        )

    def _warn_truncated(self, prompts: List[List[str]], max_sequence_length: int) -> None:
        """Warn, naming the scene, about prompts longer than ``max_sequence_length`` tokens."""
        if self.tokenizer is None:
            return
        for sample_index, sample in enumerate(prompts):
            for scene_index, text in enumerate(sample):
                ids = self.tokenizer(text, add_special_tokens=True).input_ids
                if len(ids) > max_sequence_length:
                    removed = self.tokenizer.decode(ids[max_sequence_length - 1 : -1])
                    where = f"scene {scene_index + 1}" + (f" of sample {sample_index + 1}" if len(prompts) > 1 else "")
                    logger.warning(
                        f"The prompt of {where} has {len(ids)} tokens, more than `max_sequence_length` "
                        f"({max_sequence_length}); this part was cut: {removed!r}"
                    )

    def encode_scene_prompts(
        self,
        prompts: List[List[str]],
        negative_prompts: Optional[List[List[str]]],
        do_classifier_free_guidance: bool,
        num_videos_per_prompt: int = 1,
        max_sequence_length: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[int]]:
        """Encode each scene's prompt on its own and concatenate the scenes.

        Args:
            prompts: ``[sample][scene]`` strings.
            negative_prompts: same layout; used only with classifier-free guidance.

            max_sequence_length: tokens per prompt; None takes the transformer's ``max_text_seq_length``, the
                length it was trained with (226 for CogVideoX).

        Returns:
            ``prompt_embeds (B * num_videos_per_prompt, n * L, D)``, the negative ones of the same shape
            (None without guidance) and the text length of each scene (``[L] * n``).
        """
        if max_sequence_length is None:
            max_sequence_length = int(self.transformer.config.max_text_seq_length)
        self._warn_truncated(prompts, max_sequence_length)
        num_scenes = len(prompts[0])
        positive, negative = [], []
        for scene in range(num_scenes):
            scene_positive, scene_negative = self.encode_prompt(
                [sample[scene] for sample in prompts],
                [sample[scene] for sample in negative_prompts] if do_classifier_free_guidance else None,
                do_classifier_free_guidance=do_classifier_free_guidance,
                num_videos_per_prompt=num_videos_per_prompt,
                max_sequence_length=max_sequence_length,
                device=device,
                dtype=dtype,
            )
            positive.append(scene_positive)
            negative.append(scene_negative)
        text_lengths = [embeds.shape[1] for embeds in positive]
        prompt_embeds = torch.cat(positive, dim=1)
        negative_prompt_embeds = torch.cat(negative, dim=1) if do_classifier_free_guidance else None
        return prompt_embeds, negative_prompt_embeds, text_lengths

    def _scene_embeds(
        self, embeds: torch.Tensor, name: str, num_videos_per_prompt: int, device, dtype
    ) -> Tuple[torch.Tensor, List[int]]:
        """Per-scene embeddings ``(B, n, L, D)`` -> ``(B * num_videos_per_prompt, n * L, D)`` and ``[L] * n``."""
        if not torch.is_tensor(embeds) or embeds.dim() != 4:
            shape = getattr(embeds, "shape", embeds)
            raise ValueError(f"`{name}` must be a tensor (batch, num_scenes, tokens, dim); got {shape!r}.")
        batch_size, num_scenes, length, dim = embeds.shape
        embeds = embeds.to(device=device, dtype=dtype).repeat_interleave(num_videos_per_prompt, dim=0)
        return embeds.reshape(batch_size * num_videos_per_prompt, num_scenes * length, dim), [length] * num_scenes

    @torch.no_grad()
    def encode_video_scenes(
        self,
        scenes: Sequence[Any],
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, List[int]]:
        """Encode pixel scenes with the VAE, each scene on its own (as scenes are decoded).

        Args:
            scenes: one video per scene, each in a format `VideoProcessor.preprocess_video` takes: a list of PIL
                images, a float array ``(F, H, W, 3)`` in [0, 1], a tensor ``(F, 3, H, W)`` in [0, 1], or 5D
                batched versions of the last two. Each scene needs a frame count `is_valid_num_frames` accepts.
            generator: None takes the posterior mode (deterministic); a generator samples the posterior with it.

        Returns:
            Latents ``(B, F_latent, C, h, w)`` of all scenes concatenated, scaled like the pipeline's latents,
            and the pixel frame count of each scene.
        """
        latents, pixel_frames = [], []
        for index, scene in enumerate(scenes):
            video = self.video_processor.preprocess_video(scene, height=height, width=width)
            video = video.to(device=self._execution_device, dtype=self.vae.dtype)  # (B, C, F, H, W)
            frames = video.shape[2]
            self._check_num_frames(frames, "context_frames", index)
            posterior = self.vae.encode(video).latent_dist
            scene_latents = posterior.mode() if generator is None else posterior.sample(generator)
            latents.append(self.vae_scaling_factor_image * scene_latents.permute(0, 2, 1, 3, 4))
            pixel_frames.append(frames)
        batch_sizes = {t.shape[0] for t in latents}
        if len(batch_sizes) != 1:
            raise ValueError(
                f"Every scene of `context_frames` must have the same batch size; got {sorted(batch_sizes)}."
            )
        return torch.cat(latents, dim=1), pixel_frames

    def _denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        scene_frames: List[int],
        text_lengths: List[int],
        timesteps: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        use_dynamic_cfg: bool,
        extra_step_kwargs: Dict[str, Any],
        attention_kwargs: Optional[Dict[str, Any]],
        callback_on_step_end: Optional[Callable],
        callback_on_step_end_tensor_inputs: List[str],
        context_latents: Optional[torch.Tensor] = None,
        num_context_scenes: int = 0,
    ) -> torch.Tensor:
        """The denoising loop over the new scenes' ``latents (B, F_new, C, h, w)``.

        ``context_latents (B, F_ctx, C, h, w)``, when given, are the first ``num_context_scenes`` scenes of
        ``scene_frames``; they stay clean at timestep 0 and the scheduler steps only ``latents``.
        With classifier-free guidance ``negative_prompt_embeds`` is given and the model runs on a doubled batch.
        """
        do_classifier_free_guidance = negative_prompt_embeds is not None
        num_context_frames = 0 if context_latents is None else context_latents.shape[1]
        num_scenes = len(scene_frames)

        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        old_pred_original_sample = None  # CogVideoXDPMScheduler's multistep state
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            if getattr(self, "_progress_desc", None):  # set by `generate_long`: which scene this loop makes
                progress_bar.set_description(self._progress_desc)
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t

                model_latents = self.scheduler.scale_model_input(latents, t)
                text_embeds = prompt_embeds
                if context_latents is not None:
                    model_latents = torch.cat([context_latents, model_latents], dim=1)
                if do_classifier_free_guidance:
                    model_latents = torch.cat([model_latents] * 2)
                    text_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)

                if context_latents is None:
                    timestep = t.expand(model_latents.shape[0])
                else:
                    # Context scenes are clean (timestep 0); the new scenes are at t (segment-level conditional mask).
                    timestep = torch.zeros(model_latents.shape[0], num_scenes, dtype=t.dtype, device=t.device)
                    timestep[:, num_context_scenes:] = t

                # diffusers' cache hooks (e.g. FasterCache) key on this context; older diffusers have none.
                cache_context = getattr(self.transformer, "cache_context", None)
                with cache_context("cond_uncond") if cache_context else contextlib.nullcontext():
                    noise_pred = self.transformer(
                        hidden_states=model_latents,
                        encoder_hidden_states=text_embeds,
                        timestep=timestep,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                        scene_frames=scene_frames,
                        text_lengths=text_lengths,
                    )[0]
                noise_pred = noise_pred[:, num_context_frames:].float()

                if use_dynamic_cfg:
                    # The formula of `CogVideoXPipeline`, kept as it is so one scene reproduces it.
                    self._guidance_scale = 1 + guidance_scale * (
                        (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2
                    )
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                if not isinstance(self.scheduler, CogVideoXDPMScheduler):
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                else:
                    latents, old_pred_original_sample = self.scheduler.step(
                        noise_pred,
                        old_pred_original_sample,
                        t,
                        timesteps[i - 1] if i > 0 else None,
                        latents,
                        **extra_step_kwargs,
                        return_dict=False,
                    )
                latents = latents.to(prompt_embeds.dtype)

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        self._current_timestep = None
        return latents

    @torch.no_grad()
    def decode_scenes(
        self, latents: torch.Tensor, scene_frames: List[int], output_type: str = "pil"
    ) -> Tuple[Any, List[List[Any]]]:
        """Decode each scene's latents on its own and join them.

        Args:
            latents: ``(B, F_latent, C, h, w)``, the scenes one after the other.
            scene_frames: latent frames of each scene.
            output_type: "pil", "np", "pt" or "latent".

        Returns:
            The whole videos and, per sample, the list of scene videos (see `Mask2DiTPipelineOutput`).
        """
        bounds = np.cumsum([0] + list(scene_frames)).tolist()
        if output_type == "latent":
            scenes = [[latents[b, s:e] for s, e in zip(bounds[:-1], bounds[1:])] for b in range(latents.shape[0])]
            return latents, scenes

        decoded = [self.decode_latents(latents[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])]  # (B, 3, F_i, H, W)
        pixel_bounds = np.cumsum([0] + [scene.shape[2] for scene in decoded]).tolist()
        video = self.video_processor.postprocess_video(video=torch.cat(decoded, dim=2), output_type=output_type)
        scenes = [
            [sample[s:e] for s, e in zip(pixel_bounds[:-1], pixel_bounds[1:])]
            for sample in video
        ]
        return video, scenes

    def _timesteps(self, num_inference_steps: int, timesteps: Optional[List[int]], device) -> Tuple[torch.Tensor, int]:
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        self._num_timesteps = len(timesteps)
        return timesteps, num_inference_steps

    def _begin(self, guidance_scale: float, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs):
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return callback_on_step_end_tensor_inputs

    # ----------------------------------------------------------------------------------------------
    # Multi-scene generation
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[ScenePrompts] = None,
        negative_prompt: Optional[ScenePrompts] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[FrameCounts] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
    ) -> Union[Mask2DiTPipelineOutput, Tuple]:
        """Generate n scenes at once, one prompt per scene.

        Args:
            prompt: ``[scene_1, ..., scene_n]`` for one video, a list of such lists for a batch (same n).
                The released checkpoint was trained with 3 scenes.
            negative_prompt: a string for every scene, one per scene, or a list of those per sample.
            height, width: pixels; default from the transformer config (480x720 for CogVideoX-5b / Mask²DiT).
            num_frames: pixel frames per scene (int for every scene, or a list), one `is_valid_num_frames` accepts
                (1, 9, ..., 49 for CogVideoX); default the transformer's
                ``sample_frames`` (49).
            prompt_embeds, negative_prompt_embeds: instead of prompts, per-scene embeddings ``(B, n, L, D)``.
            attention_kwargs: ``scene_mask`` ("v1", "v2", "v3", "full"), ``attention_backend`` and LoRA ``scale``.
            latents: initial noise ``(B * num_videos_per_prompt, F_latent, C, height / 8, width / 8)``.
            output_type: "pil", "np", "pt" or "latent".

        Returns:
            `Mask2DiTPipelineOutput` (``frames``: whole videos; ``scene_frames``: per sample, each scene) or the
            tuple ``(frames, scene_frames)``.
        """
        callback_on_step_end_tensor_inputs = self._begin(
            guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # 1. Check inputs and resolve defaults
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` (one string per scene) and `prompt_embeds` (B, n, L, D).")
        if prompt is not None:
            prompts = _scene_prompt_lists(prompt, "prompt")
            batch_size, num_scenes = len(prompts), len(prompts[0])
        else:
            if not torch.is_tensor(prompt_embeds) or prompt_embeds.dim() != 4:
                raise ValueError("`prompt_embeds` must be a tensor (batch, num_scenes, tokens, dim).")
            batch_size, num_scenes = prompt_embeds.shape[:2]
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        num_frames = _per_scene_counts(num_frames or self.transformer.config.sample_frames, num_scenes, "num_frames")
        scene_frames = [self.latent_frames(frames) for frames in num_frames]
        # CogVideoX 1.5 denoises whole temporal patches: like `CogVideoXPipeline`, each scene gets filler noise
        # frames in front, dropped before decoding.
        denoised_frames = patch_aligned_frames(scene_frames, self.transformer.config.patch_size_t)
        latents_shape = (
            batch_size * num_videos_per_prompt,
            sum(denoised_frames),
            self.transformer.config.in_channels,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        self.check_inputs(
            num_scenes, height, width, num_frames, callback_on_step_end_tensor_inputs, attention_kwargs, latents,
            latents_shape, output_type,
        )

        # 2. Encode the scene prompts, each on its own, and concatenate them
        if prompt is not None:
            negative_prompts = _negative_prompt_lists(negative_prompt, batch_size, num_scenes)
            prompt_embeds, negative_prompt_embeds, text_lengths = self.encode_scene_prompts(
                prompts, negative_prompts, do_classifier_free_guidance, num_videos_per_prompt, max_sequence_length,
                device,
            )
        else:
            dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
            prompt_embeds, text_lengths = self._scene_embeds(
                prompt_embeds, "prompt_embeds", num_videos_per_prompt, device, dtype
            )
            if do_classifier_free_guidance:
                if negative_prompt_embeds is None:
                    raise ValueError(
                        "With `prompt_embeds` and `guidance_scale` > 1, pass `negative_prompt_embeds` too."
                    )
                negative_prompt_embeds, _ = self._scene_embeds(
                    negative_prompt_embeds, "negative_prompt_embeds", num_videos_per_prompt, device, dtype
                )
                if negative_prompt_embeds.shape != prompt_embeds.shape:
                    raise ValueError("`negative_prompt_embeds` must have the shape of `prompt_embeds`.")
            else:
                negative_prompt_embeds = None

        # 3. Timesteps
        timesteps, num_inference_steps = self._timesteps(num_inference_steps, timesteps, device)

        # 4. Initial noise for all scenes' latent frames, drawn as one tensor (one scene draws what CogVideoX draws)
        latents = self.prepare_latents(
            latents_shape[0],
            latents_shape[2],
            (latents_shape[1] - 1) * self.vae_scale_factor_temporal + 1,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoise all scenes together
        latents = self._denoise(
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            denoised_frames,
            text_lengths,
            timesteps,
            num_inference_steps,
            guidance_scale,
            use_dynamic_cfg,
            extra_step_kwargs,
            attention_kwargs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 6. Decode each scene (without the noise frames that filled its temporal patches)
        latents = drop_leading_frames(latents, scene_frames, denoised_frames)
        video, scenes = self.decode_scenes(latents, scene_frames, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, scenes)
        return Mask2DiTPipelineOutput(frames=video, scene_frames=scenes)

    # ----------------------------------------------------------------------------------------------
    # Scene extension
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def extend(
        self,
        prompt: ScenePrompts,
        context_prompts: Union[List[str], List[List[str]]],
        context_latents: Optional[torch.Tensor] = None,
        context_frames: Optional[Sequence[Any]] = None,
        num_new_scenes: int = 1,
        negative_prompt: Optional[ScenePrompts] = None,
        num_frames: Optional[FrameCounts] = None,
        context_num_frames: Optional[FrameCounts] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        context_generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
    ) -> Union[Mask2DiTPipelineOutput, Tuple]:
        """Generate the next scene(s) conditioned on context scenes (paper Sec. 3.3, segment-level conditional mask).

        The context scenes' latents stay clean at timestep 0 and are never stepped by the scheduler; only the
        new scenes are denoised. Pass the context as latents (exact, preferred) or as pixels (VAE-encoded).

        Args:
            prompt: the new scene(s): a string or a list of ``num_new_scenes`` strings for one video; for a batch
                (``context_prompts`` a list of lists), one such entry per sample.
            context_prompts: the context scenes' prompts, oldest first (n-1 of them for a model trained on n).
            context_latents: ``(B, F, C, h, w)``, e.g. ``output_type="latent"`` frames of an earlier call; the
                last ``len(context_prompts)`` scenes' worth of frames are used.
            context_frames: instead, one pixel video per context scene (the last ones are used); formats as in
                `encode_video_scenes`.
            num_new_scenes: how many scenes to generate (each new scene has one prompt).
            negative_prompt: a string, or one per scene of the window (context scenes first).
            num_frames: pixel frames per new scene (as in ``__call__``); default the transformer's ``sample_frames``.
            context_num_frames: pixel frames per context scene for ``context_latents``; default ``num_frames``.
            context_generator: samples the VAE posterior when encoding ``context_frames``; None uses its mode.
            Other arguments as in ``__call__``; callbacks see the new scenes' latents.

        Returns:
            `Mask2DiTPipelineOutput` over the whole window: the context scenes, unchanged (in the pipeline's dtype),
            then the new scenes.
        """
        callback_on_step_end_tensor_inputs = self._begin(
            guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # 1. Check inputs: prompts [sample][scene] for the context and the new scenes
        context = _scene_prompt_lists(context_prompts, "context_prompts")
        new = _new_scene_prompts(prompt, len(context), batched=not _is_str_list(context_prompts))
        if not isinstance(num_new_scenes, int) or num_new_scenes < 1:
            raise ValueError(f"`num_new_scenes` must be a positive int; got {num_new_scenes!r}.")
        counts = sorted({len(sample) for sample in new})
        if counts != [num_new_scenes]:
            raise ValueError(
                f"`prompt` gives {counts if len(counts) > 1 else counts[0]} new scene prompt(s) per sample but "
                f"`num_new_scenes` is {num_new_scenes}; pass one prompt per new scene."
            )
        batch_size, num_context_scenes = len(context), len(context[0])
        prompts = [ctx + new_scenes for ctx, new_scenes in zip(context, new)]
        num_scenes = num_context_scenes + num_new_scenes
        if (context_latents is None) == (context_frames is None):
            raise ValueError(
                "Pass exactly one of `context_latents` (B, F, C, h, w) and `context_frames` (one video per context "
                "scene)."
            )
        num_frames = _per_scene_counts(
            num_frames or self.transformer.config.sample_frames, num_new_scenes, "num_frames"
        )

        # 2. Context latents: the last `num_context_scenes` scenes, kept exactly as given
        if context_frames is not None:
            if not isinstance(context_frames, (list, tuple)) or len(context_frames) < num_context_scenes:
                have = len(context_frames) if isinstance(context_frames, (list, tuple)) else "not a list"
                raise ValueError(
                    f"`context_frames` must be a list with one video per context scene; {num_context_scenes} context "
                    f"prompts need {num_context_scenes} videos, got {have}."
                )
            for index, video in enumerate(context_frames):
                if isinstance(video, PIL.Image.Image) or (hasattr(video, "ndim") and video.ndim < 4):
                    raise ValueError(
                        f"`context_frames` must be a list of videos, one per context scene; entry {index} is a single "
                        "image. Wrap one scene's frames in a list: `context_frames=[frames]`."
                    )
            context_latents, context_pixel_frames = self.encode_video_scenes(
                context_frames[len(context_frames) - num_context_scenes :], height, width, context_generator
            )
        else:
            if not torch.is_tensor(context_latents) or context_latents.dim() != 5:
                raise ValueError(
                    f"`context_latents` must be a tensor (batch, latent frames, channels, height/8, width/8); got "
                    f"{getattr(context_latents, 'shape', type(context_latents).__name__)}."
                )
            context_pixel_frames = _per_scene_counts(
                context_num_frames or num_frames[0], num_context_scenes, "context_num_frames"
            )
            needed = sum(self.latent_frames(frames) for frames in context_pixel_frames)
            if context_latents.shape[1] < needed:
                raise ValueError(
                    f"`context_latents` has {context_latents.shape[1]} latent frames, but {num_context_scenes} context "
                    f"scenes of {context_pixel_frames} pixel frames need {needed}: the context is shorter than needed."
                )
            context_latents = context_latents[:, context_latents.shape[1] - needed :]
        latent_height, latent_width = context_latents.shape[-2:]
        height = height or latent_height * self.vae_scale_factor_spatial
        width = width or latent_width * self.vae_scale_factor_spatial
        all_frames = context_pixel_frames + num_frames
        scene_frames = [self.latent_frames(frames) for frames in all_frames]
        # Context scenes are given as they are; new scenes are drawn with whole temporal patches (CogVideoX 1.5).
        new_frames = patch_aligned_frames(scene_frames[num_context_scenes:], self.transformer.config.patch_size_t)
        denoised_frames = scene_frames[:num_context_scenes] + new_frames
        effective_batch = batch_size * num_videos_per_prompt
        new_shape = (
            effective_batch,
            sum(new_frames),
            self.transformer.config.in_channels,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        for index, frames in enumerate(context_pixel_frames):
            self._check_num_frames(frames, "context_num_frames", index)
        self.check_inputs(
            num_new_scenes, height, width, num_frames, callback_on_step_end_tensor_inputs, attention_kwargs, latents,
            new_shape, output_type,
        )
        if tuple(context_latents.shape[2:]) != new_shape[2:]:
            raise ValueError(
                f"The context latents are (channels, h, w) = {tuple(context_latents.shape[2:])} but `height`/`width` "
                f"and the transformer need {new_shape[2:]}."
            )
        if context_latents.shape[0] == batch_size and num_videos_per_prompt > 1:
            context_latents = context_latents.repeat_interleave(num_videos_per_prompt, dim=0)
        elif context_latents.shape[0] == 1 and effective_batch > 1:
            context_latents = context_latents.expand(effective_batch, -1, -1, -1, -1)
        if context_latents.shape[0] != effective_batch:
            raise ValueError(
                f"The context has batch size {context_latents.shape[0]}; it must be 1, the number of samples "
                f"({batch_size}) or samples x `num_videos_per_prompt` ({effective_batch})."
            )

        # 3. Encode the window's prompts (context scenes first)
        negative_prompts = _negative_prompt_lists(negative_prompt, batch_size, num_scenes)
        prompt_embeds, negative_prompt_embeds, text_lengths = self.encode_scene_prompts(
            prompts, negative_prompts, do_classifier_free_guidance, num_videos_per_prompt, max_sequence_length, device
        )
        context_latents = context_latents.to(device=device, dtype=prompt_embeds.dtype)

        # 4. Timesteps and the new scenes' initial noise
        timesteps, num_inference_steps = self._timesteps(num_inference_steps, timesteps, device)
        latents = self.prepare_latents(
            new_shape[0],
            new_shape[2],
            (new_shape[1] - 1) * self.vae_scale_factor_temporal + 1,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoise the new scenes with the context clean at timestep 0
        latents = self._denoise(
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            denoised_frames,
            text_lengths,
            timesteps,
            num_inference_steps,
            guidance_scale,
            use_dynamic_cfg,
            extra_step_kwargs,
            attention_kwargs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            context_latents=context_latents,
            num_context_scenes=num_context_scenes,
        )

        # 6. Decode the window, each scene on its own
        latents = drop_leading_frames(latents, scene_frames[num_context_scenes:], new_frames)
        video, scenes = self.decode_scenes(torch.cat([context_latents, latents], dim=1), scene_frames, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, scenes)
        return Mask2DiTPipelineOutput(frames=video, scene_frames=scenes)

    # ----------------------------------------------------------------------------------------------
    # Long videos
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_long(
        self,
        prompts: Union[List[str], List[List[str]]],
        scenes_per_window: int = DEFAULT_NUM_SCENES,
        negative_prompt: Optional[str] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[FrameCounts] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        max_sequence_length: Optional[int] = None,
    ) -> Union[Mask2DiTPipelineOutput, Tuple]:
        """Generate N scenes: the first ``scenes_per_window`` together, then one at a time, each conditioned on
        the previous ``scenes_per_window - 1`` scenes' latents (no decode / re-encode between windows).

        Args:
            prompts: N scene prompts for one video, or a list of such lists for a batch.
            scenes_per_window: n, the scenes the model sees at once (3 for the released checkpoint).
            negative_prompt: one string for every scene.
            num_frames: pixel frames (as in ``__call__``): one int for every scene or a list of N.
            Other arguments as in ``__call__``.

        Returns:
            `Mask2DiTPipelineOutput` with all N scenes.
        """
        scene_prompts = _scene_prompt_lists(prompts, "prompts")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}; got {output_type!r}.")
        if not isinstance(scenes_per_window, int) or scenes_per_window < 2:
            raise ValueError(
                f"`scenes_per_window` must be an int >= 2 (scene extension needs at least one context scene); "
                f"got {scenes_per_window!r}."
            )
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(
                f"`negative_prompt` of `generate_long` must be one string for every scene; got {negative_prompt!r}."
            )
        num_total = len(scene_prompts[0])
        num_frames = _per_scene_counts(num_frames or self.transformer.config.sample_frames, num_total, "num_frames")
        window = min(scenes_per_window, num_total)
        batched = len(scene_prompts) > 1
        latent_frames = [self.latent_frames(frames) for frames in num_frames]
        common = dict(
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            guidance_scale=guidance_scale,
            use_dynamic_cfg=use_dynamic_cfg,
            num_videos_per_prompt=num_videos_per_prompt,
            eta=eta,
            generator=generator,
            output_type="latent",
            attention_kwargs=attention_kwargs,
            max_sequence_length=max_sequence_length,
        )

        try:
            # 1. The first window: `window` scenes generated together
            self._progress_desc = f"scenes 1-{window}/{num_total}"
            first = self(prompt=[sample[:window] for sample in scene_prompts], num_frames=num_frames[:window], **common)
            scene_latents = list(torch.split(first.frames, latent_frames[:window], dim=1))  # each (B, F_i, C, h, w)

            # 2. Extend one scene at a time over a sliding window of the last `scenes_per_window - 1` scenes' latents
            context_count = scenes_per_window - 1
            for index in range(window, num_total):
                self._progress_desc = f"scene {index + 1}/{num_total}"
                context_prompts = [sample[index - context_count : index] for sample in scene_prompts]
                new_prompts = [sample[index] for sample in scene_prompts]
                extended = self.extend(
                    prompt=new_prompts if batched else new_prompts[0],
                    context_prompts=context_prompts if batched else context_prompts[0],
                    context_latents=torch.cat(scene_latents[-context_count:], dim=1),
                    num_frames=num_frames[index],
                    context_num_frames=num_frames[index - context_count : index],
                    **common,
                )
                scene_latents.append(extended.frames[:, -latent_frames[index] :])
        finally:
            self._progress_desc = None

        # 3. Decode every scene
        latents = torch.cat(scene_latents, dim=1)
        video, scenes = self.decode_scenes(latents, latent_frames, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, scenes)
        return Mask2DiTPipelineOutput(frames=video, scene_frames=scenes)


def _has_model_index(pretrained_model_name_or_path: Union[str, os.PathLike], kwargs: Dict[str, Any]) -> bool:
    """Whether a local folder or Hub repo holds ``model_index.json`` (the authors' release may not)."""
    path = os.fspath(pretrained_model_name_or_path)
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, subfolder, "model_index.json"))
    try:
        from huggingface_hub import file_exists, try_to_load_from_cache
        from huggingface_hub.file_download import _CACHED_NO_EXIST

        filename = "/".join(p for p in (subfolder, "model_index.json") if p)
        cached = try_to_load_from_cache(
            path, filename, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
        )
        if isinstance(cached, str):
            return True
        if cached is _CACHED_NO_EXIST:
            return False
        offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        if kwargs.get("local_files_only") or offline:
            # Offline: a cached transformer config without a cached model_index.json is the authors' layout.
            transformer_config = "/".join(p for p in (subfolder, "transformer", "config.json") if p)
            cached = try_to_load_from_cache(
                path, transformer_config, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
            )
            return not isinstance(cached, str)
        return file_exists(path, filename, revision=kwargs.get("revision"), token=kwargs.get("token"))
    except Exception:  # offline or unknown repo: diffusers' own loader gives the clearer error
        return True
