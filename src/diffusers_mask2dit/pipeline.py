"""Mask²DiT text-to-multi-scene-video pipeline: n scenes in one pass, scene extension, long videos.

`Mask2DiTPipeline` subclasses diffusers' `CogVideoXPipeline` and reuses its prompt encoding, latent
preparation, VAE decoding, scheduler handling and LoRA loading. What it adds:

- ``__call__``: one prompt per scene; the scenes' prompt embeddings and latents are concatenated and
  denoised together by `Mask2DiTTransformer3DModel` under the Mask²DiT scene mask;
- ``extend``: the next scene(s) conditioned on the last scenes, held clean at timestep 0 (the paper's
  segment-level conditional mask); only the new scenes are denoised;
- ``generate_long``: a first window of n scenes, then one scene at a time over a sliding window of the
  last n-1 scenes' latents;
- ``generate_ditctrl`` (from `DiTCtrlMixin`): the training-free alternative on any CogVideoX checkpoint,
  overlapping one-prompt tiles with KV-sharing and latent blending (DiTCtrl).

All three first check every argument (`generation_plan.check_call_inputs` / `check_extend_inputs`, with the
per-argument checks of `pipeline_inputs`), then build a `GenerationPlan` from the checked inputs (a ``__call__``
is an ``extend`` without context) and run it through one core, `_generate`. The authors'-release loader lives
in `release_loading`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import is_torch_xla_available, logging
from transformers import T5EncoderModel, T5Tokenizer

from .ditctrl import DiTCtrlMixin
from .generation_plan import (
    Mask2DiTPipelineOutput,
    GenerationPlan,
    SamplingOptions,
    call_plan,
    check_call_inputs,
    check_extend_inputs,
    encode_scene_videos,
    extend_plan,
    window_plan,
    with_generation_defaults,
)
from .pipeline_inputs import (
    FrameCounts,
    ScenePrompts,
    check_options,
    check_sampling,
    check_scenes_per_window,
    negative_prompt_lists,
    scene_prompt_lists,
    scene_videos,
)
from .release_loading import OFFICIAL_MODEL_ID, Mask2DiTLoadingMixin
from .transformer import Mask2DiTTransformer3DModel, drop_leading_frames, scene_rotary_emb

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

# The released checkpoint (Hub `qth/Mask2DiT`) was trained on 3 scenes x 49 frames at 480x720, shown at 8 fps.
DEFAULT_NUM_SCENES = 3
DEFAULT_FPS = 8
XLA_AVAILABLE = is_torch_xla_available()

__all__ = ["Mask2DiTPipeline", "Mask2DiTPipelineOutput", "GenerationPlan", "OFFICIAL_MODEL_ID"]



class Mask2DiTPipeline(Mask2DiTLoadingMixin, CogVideoXPipeline, DiTCtrlMixin):
    r"""Multi-scene text-to-video generation with Mask²DiT on CogVideoX (2b, 5b and 1.5 transformers).

    Takes the components of a `CogVideoXPipeline`; a plain `CogVideoXTransformer3DModel` is turned into a
    `Mask2DiTTransformer3DModel` in place (same weights). LoRA loading (`load_lora_weights`, `set_adapters`,
    `fuse_lora`) and `save_lora_weights` come from `CogVideoXLoraLoaderMixin`. For less VAE memory use
    ``pipe.vae.enable_tiling()`` / ``pipe.vae.enable_slicing()``; scenes are decoded one at a time.
    ``transformer=None`` builds a text-encoder-only pipeline (for ``encode_prompt``), as with CogVideoX.

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
        if transformer is not None:
            transformer = Mask2DiTTransformer3DModel.from_cogvideox(transformer)
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        # Sampling defaults a model folder carries (`generation_defaults.json`, keys as the arguments they stand
        # for): arguments left at None take them, then the transformer config's, then CogVideoX's 50 steps / 6.0.
        self.generation_defaults: Dict[str, Any] = {}
        # Record the transformer under its diffusers base class (same weights and keys): a saved folder stays a
        # CogVideoX checkpoint that this class, `CogVideoXPipeline` and `DiffusionPipeline(custom_pipeline=...)`
        # all load. diffusers cannot load a component recorded under an outside module's class name.
        if transformer is not None:
            self.register_to_config(transformer=("diffusers", "CogVideoXTransformer3DModel"))

    # ----------------------------------------------------------------------------------------------
    # Frames, prompts and pixels
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
        per_scene: bool = False,
    ) -> Tuple[Any, Any, List[int]]:
        """Encode each scene's prompt on its own (each distinct text once) and concatenate the scenes.

        Args:
            prompts: ``[sample][scene]`` strings.
            negative_prompts: same layout; used only with classifier-free guidance.
            per_scene: return the lists of per-scene embeddings ``(B * num_videos_per_prompt, L, D)`` instead.
            max_sequence_length: tokens per prompt (None: the transformer's ``max_text_seq_length``).

        Returns:
            ``prompt_embeds (B * num_videos_per_prompt, n * L, D)``, the negative ones of the same shape
            (None without guidance) and the text length of each scene (``[L] * n``).
        """
        if max_sequence_length is None:  # the length the transformer was trained with (226 for CogVideoX)
            max_sequence_length = int(getattr(getattr(self.transformer, "config", None), "max_text_seq_length", 226))
        self._warn_truncated(prompts, max_sequence_length)
        encoded: Dict[Tuple[str, ...], torch.Tensor] = {}

        def encode(texts: Tuple[str, ...]) -> torch.Tensor:  # one text-encoder run per distinct batch of texts
            if texts not in encoded:
                encoded[texts] = CogVideoXPipeline.encode_prompt(  # the stock rule: a list is a batch
                    self, list(texts), do_classifier_free_guidance=False, num_videos_per_prompt=num_videos_per_prompt,
                    max_sequence_length=max_sequence_length, device=device, dtype=dtype,
                )[0]
            return encoded[texts]

        scenes = range(len(prompts[0]))
        positive = [encode(tuple(sample[scene] for sample in prompts)) for scene in scenes]
        negative = None
        if do_classifier_free_guidance:
            negative = [encode(tuple(sample[scene] for sample in negative_prompts)) for scene in scenes]
        text_lengths = [embeds.shape[1] for embeds in positive]
        if per_scene:
            return positive, negative, text_lengths
        return torch.cat(positive, dim=1), None if negative is None else torch.cat(negative, dim=1), text_lengths

    def encode_prompt(
        self,
        prompt: ScenePrompts,
        negative_prompt: Optional[ScenePrompts] = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        max_sequence_length: int = 226,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Encode ``prompt`` in the layout ``__call__`` reads it, so ``pipe(prompt_embeds=pipe.encode_prompt(p)[0])``
        makes the video ``pipe(p)`` makes.

        Args:
            prompt: a string (one scene), a list with one prompt per scene (one video) or a list of such lists.
            negative_prompt: as in ``__call__``: a string for every scene, one per scene, or one list per sample.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``: for a string ``(num_videos_per_prompt, L, D)`` exactly as
            `CogVideoXPipeline.encode_prompt`; for scene lists ``(B * num_videos_per_prompt, n, L, D)``, the n scenes
            of each of the B videos. The negative ones have the same shape (None without guidance). Given
            ``prompt_embeds``, the stock method's rules apply.
        """
        if isinstance(prompt, str) or prompt_embeds is not None:
            return CogVideoXPipeline.encode_prompt(
                self, prompt, negative_prompt, do_classifier_free_guidance, num_videos_per_prompt, prompt_embeds,
                negative_prompt_embeds, max_sequence_length, device, dtype,
            )
        prompts = scene_prompt_lists(prompt, "prompt")
        negatives = negative_prompt_lists(negative_prompt, len(prompts), len(prompts[0]))
        positive, negative, _ = self.encode_scene_prompts(
            prompts, negatives, do_classifier_free_guidance, num_videos_per_prompt, max_sequence_length, device,
            dtype, per_scene=True,
        )
        return torch.stack(positive, dim=1), None if negative is None else torch.stack(negative, dim=1)

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
            scenes: one video per scene: a list of PIL images, an array ``(F, H, W, 3)`` or a tensor
                ``(F, 3, H, W)`` (uint8 in [0, 255] or floats in [0, 1], as `read_video` returns), or 5D
                batched versions of the last two. Each scene needs a frame count `is_valid_num_frames` accepts;
                all need the same batch size and, unless ``height`` and ``width`` resize them, the same size.
            generator: None takes the posterior mode (deterministic); a generator samples the posterior with it.

        Returns:
            Latents ``(B, F_latent, C, h, w)`` of all scenes concatenated, scaled like the pipeline's latents,
            and the pixel frame count of each scene.
        """
        videos, pixel_frames = scene_videos(scenes, self.video_processor, height, width, self.is_valid_num_frames)
        return encode_scene_videos(self, videos, generator), pixel_frames

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
        scenes = [[sample[s:e] for s, e in zip(pixel_bounds[:-1], pixel_bounds[1:])] for sample in video]
        return video, scenes

    # ----------------------------------------------------------------------------------------------
    # Describing a generation
    # ----------------------------------------------------------------------------------------------

    def _begin_sampling(self, sampling: SamplingOptions) -> SamplingOptions:
        """Check the options every generation shares, fill those left at None from `generation_defaults`, and
        reset the per-call state `CogVideoXPipeline` keeps (guidance scale, interrupt flag, current timestep)."""
        if self.transformer is None:
            raise ValueError(
                "This pipeline has no transformer (built with `transformer=None`): it can encode prompts "
                "(`encode_prompt`) but not generate. Load or pass a transformer to generate."
            )
        sampling = with_generation_defaults(sampling, self.generation_defaults)
        check_sampling(sampling, int(self.transformer.config.max_text_seq_length))
        callback = sampling.callback_on_step_end
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            sampling.callback_on_step_end_tensor_inputs = callback.tensor_inputs
        check_options(
            sampling.callback_on_step_end_tensor_inputs, self._callback_tensor_inputs, sampling.attention_kwargs
        )
        self._guidance_scale = sampling.guidance_scale
        self._attention_kwargs = sampling.attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        return sampling

    # ----------------------------------------------------------------------------------------------
    # The generation core
    # ----------------------------------------------------------------------------------------------

    def _generate(self, plan: GenerationPlan, sampling: SamplingOptions) -> torch.Tensor:
        """Run one plan: encode its prompts (unless embedded already), draw the new scenes' noise and denoise them
        with the context held clean.

        Returns:
            Latents ``(B * num_videos_per_prompt, F, C, h, w)`` of all the plan's scenes, context first, without the
            filler frames of temporal patches.
        """
        device = self._execution_device
        if plan.prompt_embeds is None:
            plan.prompt_embeds, plan.negative_prompt_embeds, plan.text_lengths = self.encode_scene_prompts(
                plan.prompts, plan.negative_prompts, sampling.do_classifier_free_guidance, plan.num_videos_per_prompt,
                sampling.max_sequence_length, device,
            )
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, sampling.num_inference_steps, "cpu" if XLA_AVAILABLE else device, sampling.timesteps
        )
        self._num_timesteps = len(timesteps)

        # The new scenes' noise is drawn as one tensor (so one scene draws what CogVideoX draws).
        latents = self.prepare_latents(
            plan.batch_size * plan.num_videos_per_prompt,
            self.transformer.config.in_channels,
            (sum(plan.new_frames) - 1) * self.vae_scale_factor_temporal + 1,
            plan.height,
            plan.width,
            plan.prompt_embeds.dtype,
            device,
            sampling.generator,
            plan.latents,
        )
        context = plan.context_latents
        if context is not None:
            context = context.to(device=device, dtype=plan.prompt_embeds.dtype)
        latents = self._denoise(plan, latents, context, timesteps, num_inference_steps, sampling)
        latents = drop_leading_frames(latents, plan.scene_frames[plan.num_context_scenes :], plan.new_frames)
        return latents if context is None else torch.cat([context, latents], dim=1)

    def _rotary_embeddings(self, plan: GenerationPlan, device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """3-D RoPE over all scenes' latent frames as one continuous sequence (RoPE transformers only)."""
        scale = self.vae_scale_factor_spatial
        return scene_rotary_emb(
            self.transformer.config, plan.height // scale, plan.width // scale, plan.denoised_frames, device
        )

    def _predict_noise(self, plan, latents, context, t, prompt_embeds, negative_prompt_embeds, image_rotary_emb):
        """The transformer's prediction for the new scenes ``(B', F_new, C, h, w)``; with ``negative_prompt_embeds``
        the batch is doubled (unconditional half first)."""
        model_latents = self.scheduler.scale_model_input(latents, t)
        text_embeds = prompt_embeds
        if context is not None:
            model_latents = torch.cat([context, model_latents], dim=1)
        if negative_prompt_embeds is not None:
            model_latents = torch.cat([model_latents] * 2)
            text_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
        if context is None:
            timestep = t.expand(model_latents.shape[0])
        else:
            # Context scenes are clean (timestep 0); the new scenes are at t (segment-level conditional mask).
            timestep = torch.zeros(model_latents.shape[0], len(plan.scene_frames), dtype=t.dtype, device=t.device)
            timestep[:, plan.num_context_scenes :] = t
        # diffusers' cache hooks (e.g. FasterCache) key on this context; older diffusers have none.
        cache_context = getattr(self.transformer, "cache_context", None)
        with cache_context("cond_uncond") if cache_context else contextlib.nullcontext():
            noise_pred = self.transformer(
                hidden_states=model_latents,
                encoder_hidden_states=text_embeds,
                timestep=timestep,
                image_rotary_emb=image_rotary_emb,
                attention_kwargs=self._attention_kwargs,
                return_dict=False,
                scene_frames=plan.denoised_frames,
                text_lengths=plan.text_lengths,
            )[0]
        return noise_pred[:, 0 if context is None else context.shape[1] :].float()

    def _denoise(self, plan, latents, context, timesteps, num_inference_steps, sampling) -> torch.Tensor:
        """The denoising loop over the new scenes' ``latents (B, F_new, C, h, w)``; ``context (B, F_ctx, C, h, w)``
        (or None) stays clean at timestep 0 and the scheduler steps only ``latents``.

        Adapted from the denoising loop of diffusers' ``CogVideoXPipeline.__call__`` (its step 8): the same
        guidance and dynamic-CFG formula (so one scene reproduces it), scheduler steps (with
        CogVideoXDPMScheduler's multistep state), callbacks, progress and XLA step; what differs is the context
        in front of the model input, per-scene timesteps and the scene layout passed to the transformer.
        """
        prompt_embeds, negative_prompt_embeds = plan.prompt_embeds, plan.negative_prompt_embeds
        do_classifier_free_guidance = negative_prompt_embeds is not None
        image_rotary_emb = self._rotary_embeddings(plan, latents.device)
        extra_step_kwargs = self.prepare_extra_step_kwargs(sampling.generator, sampling.eta)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        old_pred_original_sample = None  # CogVideoXDPMScheduler's multistep state
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            if plan.description:
                progress_bar.set_description(plan.description)
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = self._predict_noise(
                    plan, latents, context, t, prompt_embeds,
                    negative_prompt_embeds if do_classifier_free_guidance else None, image_rotary_emb,
                )
                if sampling.use_dynamic_cfg:
                    self._guidance_scale = 1 + sampling.guidance_scale * (
                        (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2
                    )
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                if not isinstance(self.scheduler, CogVideoXDPMScheduler):
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                else:
                    latents, old_pred_original_sample = self.scheduler.step(
                        noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
                        **extra_step_kwargs, return_dict=False,
                    )
                latents = latents.to(prompt_embeds.dtype)

                if sampling.callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: tensors[k] for k in sampling.callback_on_step_end_tensor_inputs}
                    callback_outputs = sampling.callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                if XLA_AVAILABLE:
                    import torch_xla.core.xla_model as xm

                    xm.mark_step()
        self._current_timestep = None
        return latents

    def _finish(self, latents: torch.Tensor, scene_frames: List[int], output_type: str, return_dict: bool):
        """Decode each scene on its own, offload the models, and wrap the result."""
        video, scenes = self.decode_scenes(latents, scene_frames, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video, scenes)
        return Mask2DiTPipelineOutput(frames=video, scene_frames=scenes, latents=latents)

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
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
        guidance_scale: Optional[float] = None,
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
            prompt: ``[scene_1, ..., scene_n]`` for one video, a list of such lists for a batch (same n); a string
                is one scene. The released checkpoint was trained with 3 scenes.
            negative_prompt: a string for every scene, one per scene, or a list of those per sample.
            height, width: pixels; default from the transformer config (480x720 for CogVideoX-5b / Mask²DiT).
            num_frames: pixel frames per scene (int for every scene, or a list); default the transformer's
                ``sample_frames`` (49). One scene takes any count `CogVideoXPipeline` takes; several scenes need
                counts `is_valid_num_frames` accepts (1, 9, ..., 49 for CogVideoX).
            prompt_embeds, negative_prompt_embeds: instead of prompts, per-scene embeddings ``(B, n, L, D)``, or
                ``(B, L, D)`` for one scene: what `encode_prompt` returns for the same ``prompt``. Without
                ``negative_prompt_embeds``, guidance encodes ``negative_prompt`` (default "").
            attention_kwargs: ``scene_mask`` ("v1", "v2", "v3", "full"), ``attention_backend`` and LoRA ``scale``.
            latents: initial noise ``(B * num_videos_per_prompt, F_latent, C, height / 8, width / 8)``.
            output_type: "pil", "np", "pt" or "latent".

        Returns:
            `Mask2DiTPipelineOutput` (``frames``: whole videos; ``scene_frames``: per sample, each scene;
            ``latents``: the final latents) or the tuple ``(frames, scene_frames)``.
        """
        # 1. Check the sampling options and every input (before any model runs); reset the per-call state
        sampling = self._begin_sampling(
            SamplingOptions(
                num_inference_steps, timesteps, guidance_scale, use_dynamic_cfg, eta, generator, attention_kwargs,
                callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, output_type,
            )
        )
        inputs = check_call_inputs(
            self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, num_frames,
            num_videos_per_prompt, latents, sampling.guidance_scale,
        )

        # 2. Describe the generation: n scenes, their frames, prompts (or embeddings), no context
        plan = call_plan(self, inputs)

        # 3. Encode the scene prompts, draw the noise, denoise all scenes together
        latents = self._generate(plan, sampling)

        # 4. Decode each scene on its own
        return self._finish(latents, plan.scene_frames, sampling.output_type, return_dict)

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
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
        guidance_scale: Optional[float] = None,
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
            context_latents: ``(B, F, C, h, w)``, e.g. the ``latents`` of an earlier call's output; the last
                ``len(context_prompts)`` scenes' worth of frames are used.
            context_frames: instead, one pixel video per context scene (the last ones are used): uint8 in
                [0, 255] (as `read_video` returns) or floats in [0, 1]; formats as in `encode_video_scenes`.
            num_new_scenes: how many scenes to generate (each new scene has one prompt).
            negative_prompt: a string, or one per scene of the window (context scenes first).
            num_frames: pixel frames per new scene (as in ``__call__``); default the transformer's ``sample_frames``.
            context_num_frames: pixel frames per context scene for ``context_latents``; default ``num_frames``.
            height, width: pixels; default the context's size.
            context_generator: samples the VAE posterior when encoding ``context_frames``; None uses its mode.
            Other arguments as in ``__call__``; callbacks and ``latents`` are the new scenes' latents.

        Returns:
            `Mask2DiTPipelineOutput` over the whole window: the context scenes, unchanged (in the pipeline's dtype),
            then the new scenes.
        """
        # 1. Check the sampling options and every input (before the VAE or any model runs); reset the per-call state
        sampling = self._begin_sampling(
            SamplingOptions(
                num_inference_steps, timesteps, guidance_scale, use_dynamic_cfg, eta, generator, attention_kwargs,
                callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, output_type,
            )
        )
        inputs = check_extend_inputs(
            self, prompt, context_prompts, context_latents, context_frames, num_new_scenes, negative_prompt,
            num_frames, context_num_frames, height, width, num_videos_per_prompt, latents, context_generator,
        )

        # 2. Describe the generation: the context scenes (clean latents, or pixels encoded), then the new scenes
        plan = extend_plan(self, inputs)

        # 3. Encode the window's prompts, denoise the new scenes with the context clean at timestep 0
        latents = self._generate(plan, sampling)

        # 4. Decode the window, each scene on its own
        return self._finish(latents, plan.scene_frames, sampling.output_type, return_dict)

    # ----------------------------------------------------------------------------------------------
    # Long videos
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_long(
        self,
        prompts: Union[List[str], List[List[str]]],
        scenes_per_window: int = DEFAULT_NUM_SCENES,
        negative_prompt: Optional[ScenePrompts] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[FrameCounts] = None,
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
        guidance_scale: Optional[float] = None,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
    ) -> Union[Mask2DiTPipelineOutput, Tuple]:
        """Generate N scenes: the first ``scenes_per_window`` together, then one at a time, each conditioned on
        the previous ``scenes_per_window - 1`` scenes' latents (no decode / re-encode between windows). Each
        prompt is encoded once, before the first window.

        Args:
            prompts: N scene prompts for one video, or a list of such lists for a batch.
            scenes_per_window: n, the scenes the model sees at once (3 for the released checkpoint).
            negative_prompt: a string for every scene, a list of N (one per scene) or one such list per sample.
            num_frames: pixel frames (as in ``__call__``): one int for every scene or a list of N.
            latents: initial noise of all N scenes ``(B * num_videos_per_prompt, F_latent, C, h, w)``, each scene's
                frames in order (CogVideoX 1.5: with its filler frames); each window takes its new scenes' part.
            callback_on_step_end: called at every step of every window with that window's new-scene latents.
            Other arguments as in ``__call__``.

        Returns:
            `Mask2DiTPipelineOutput` with all N scenes.
        """
        # 1. Check the sampling options and every input (before any model runs); reset the per-call state
        sampling = self._begin_sampling(
            SamplingOptions(
                num_inference_steps, timesteps, guidance_scale, use_dynamic_cfg, eta, generator, attention_kwargs,
                callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, output_type,
            )
        )
        check_scenes_per_window(scenes_per_window)
        inputs = check_call_inputs(
            self, prompts, negative_prompt, None, None, height, width, num_frames, num_videos_per_prompt, latents,
            sampling.guidance_scale, prompt_name="prompts",
        )

        # 2. Describe the whole story as one plan of N scenes
        story = call_plan(self, inputs)

        # 3. Encode every scene's prompt once: the text encoder runs here only
        positive, negative, story.text_lengths = self.encode_scene_prompts(
            story.prompts, story.negative_prompts, sampling.do_classifier_free_guidance, num_videos_per_prompt,
            sampling.max_sequence_length, self._execution_device, per_scene=True,
        )

        # 4. The first window together, then one scene at a time over the last `scenes_per_window - 1` scenes
        num_scenes = len(story.scene_frames)
        window = min(scenes_per_window, num_scenes)
        windows = [(0, window, 0)] + [
            (stop - scenes_per_window, stop, scenes_per_window - 1) for stop in range(window + 1, num_scenes + 1)
        ]
        scene_latents: List[torch.Tensor] = []
        for start, stop, num_context in windows:
            plan = window_plan(story, start, stop, num_context, scene_latents, positive, negative)
            window_latents = self._generate(plan, sampling)
            new_latents = window_latents[:, sum(plan.scene_frames[:num_context]) :]
            scene_latents.extend(torch.split(new_latents, plan.scene_frames[num_context:], dim=1))

        # 5. Decode every scene
        return self._finish(torch.cat(scene_latents, dim=1), story.scene_frames, sampling.output_type, return_dict)
