"""Validation during training: render the configured multi-scene prompts with the current weights."""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

import torch

from .config import TrainingConfig
from .precompute import SceneEncoder, load_encoders
from .setup import unwrap

logger = logging.getLogger(__name__)


def run_validation(
    accelerator: Any, transformer: Any, encoder: Optional[SceneEncoder], config: TrainingConfig, step: int, weight_dtype: torch.dtype
) -> List[str]:
    """Render ``config.validation_prompts`` with the current weights; returns the written mp4 paths (main process)."""
    from accelerate.utils import DistributedType

    if not config.validation_prompts:
        return []
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3
    )
    if sharded:
        logger.warning("Validation is skipped under ZeRO-3 / FSDP: the weights are sharded across processes.")
        return []
    written: List[str] = []
    if accelerator.is_main_process:
        from ..video_io import contact_sheet, write_video

        model = unwrap(accelerator, transformer)
        # Training from a cache keeps no VAE or T5 in memory: load them for the duration of validation only.
        encoders = encoder or load_encoders(config, accelerator.device, weight_dtype)
        pipe = _validation_pipeline(config, encoders, model)
        was_training = model.training
        model.eval()
        folder = os.path.join(config.output_dir, "validation", f"step-{step:06d}")
        os.makedirs(folder, exist_ok=True)
        images = {}
        try:
            for index, prompt in enumerate(config.validation_prompts):
                generator = torch.Generator(device="cpu").manual_seed(config.seed + index)
                with torch.no_grad(), accelerator.autocast():
                    output = pipe(
                        prompt=list(prompt),
                        height=config.height,
                        width=config.width,
                        num_frames=config.scene_frames,
                        num_inference_steps=config.validation_num_inference_steps,
                        guidance_scale=config.validation_guidance_scale,
                        generator=generator,
                        output_type="np",
                        attention_kwargs={"scene_mask": config.mask_variant},
                    )
                video_path = write_video(output.frames[0], os.path.join(folder, f"prompt-{index}.mp4"), fps=config.validation_fps)
                sheet_path = contact_sheet(output.scene_frames[0], os.path.join(folder, f"prompt-{index}.png"))
                written.append(video_path)
                import numpy as np
                from PIL import Image

                images[f"validation/prompt-{index}"] = np.asarray(Image.open(sheet_path))[None]
        finally:
            model.train(was_training)
            del pipe, encoders
        if config.report_to == "tensorboard":
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images(images, step=step, dataformats="NHWC")
        logger.info(f"Validation videos of step {step} written to {folder}")
    accelerator.wait_for_everyone()
    return written


def _validation_pipeline(config: TrainingConfig, encoders: SceneEncoder, model: Any):
    """A pipeline of the model being trained, with the scheduler its folder ships (what users of the result will
    use); progress bars off."""
    import diffusers

    from .. import Mask2DiTPipeline

    scheduler_config = diffusers.CogVideoXDDIMScheduler.load_config(config.pretrained_model_name_or_path, subfolder="scheduler")
    scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), diffusers.CogVideoXDDIMScheduler)
    pipe = Mask2DiTPipeline(
        tokenizer=encoders.tokenizer,
        text_encoder=encoders.text_encoder,
        vae=encoders.vae,
        transformer=model,
        scheduler=scheduler_class.from_config(scheduler_config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
