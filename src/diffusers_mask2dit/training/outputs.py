"""What a finished run leaves in ``output_dir``: the trained weights, the run's options and the model card.

- LoRA: ``pytorch_lora_weights.safetensors`` in diffusers format (``pipe.load_lora_weights(output_dir)``);
- full: ``transformer/``, the fine-tuned transformer as safetensors in the training precision;
- ``training_config.json`` (the run's options, which ``mask2dit hub build`` reads) and ``README.md``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, Optional

import torch

from .checkpoints import as_disk_full, replace_folder
from .config import TrainingConfig
from .setup import LORA_WEIGHT_NAME, TRANSFORMER_FOLDER, unwrap

logger = logging.getLogger(__name__)


def save_final_weights(accelerator: Any, transformer: Any, config: TrainingConfig, weight_dtype: torch.dtype) -> str:
    """Write the trained weights (LoRA in diffusers format, or a transformer folder) and the model card.

    Every process must call this (ZeRO-3 and FSDP gather the weights collectively). Returns the path that
    loads them: ``output_dir`` for LoRA (``pipe.load_lora_weights``), ``output_dir/transformer`` for full.
    """
    state_dict = accelerator.get_state_dict(transformer)  # gathers sharded weights onto the main process
    model = unwrap(accelerator, transformer)
    output_dir = config.output_dir
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return output_dir if config.finetune == "lora" else os.path.join(output_dir, TRANSFORMER_FOLDER)
    staging = os.path.join(output_dir, ".tmp-final")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        result = _write_weights(model, state_dict, config, staging, weight_dtype)
    except BaseException as error:
        full = as_disk_full(error, output_dir, "the final weights")
        shutil.rmtree(staging, ignore_errors=True)  # gives a full disk its space back
        if full is not None:
            raise full from None
        raise
    write_model_card(config, output_dir)
    write_training_config(config, output_dir)
    accelerator.wait_for_everyone()
    return result


def _write_weights(model: Any, state_dict: Dict[str, torch.Tensor], config: TrainingConfig, staging: str,
                   weight_dtype: torch.dtype) -> str:
    """Write the weights through ``staging`` and move them into ``output_dir``; returns the path that loads them."""
    output_dir = config.output_dir
    if config.finetune == "lora":
        from diffusers import CogVideoXPipeline
        from peft.utils import get_peft_model_state_dict

        lora_layers = get_peft_model_state_dict(model, state_dict=state_dict)
        CogVideoXPipeline.save_lora_weights(
            staging,
            transformer_lora_layers=lora_layers,
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        )
        os.replace(os.path.join(staging, LORA_WEIGHT_NAME), os.path.join(output_dir, LORA_WEIGHT_NAME))
        shutil.rmtree(staging, ignore_errors=True)
        return output_dir
    from huggingface_hub import save_torch_state_dict

    # Save in the training precision of the forward pass (bf16 for the released CogVideoX-5b layout).
    state_dict = {k: v.detach().to(device="cpu", dtype=weight_dtype) for k, v in state_dict.items()}
    model.save_config(staging)
    save_torch_state_dict(state_dict, staging, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
    result = os.path.join(output_dir, TRANSFORMER_FOLDER)
    replace_folder(staging, result)
    return result


def write_training_config(config: TrainingConfig, output_dir: str) -> str:
    """``training_config.json`` beside the weights: the run's options, which `mask2dit hub build` reads to fill
    the Hub card's training details (it keeps only publishable keys, never local paths)."""
    path = os.path.join(output_dir, "training_config.json")
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=2, default=str)
    os.replace(staging, path)
    return path


def write_model_card(config: TrainingConfig, output_dir: str) -> Optional[str]:
    """``README.md``: the card of :func:`diffusers_mask2dit.hub.cards.model_card` for a local training output
    (how to load the result, the run's settings); ``mask2dit hub build`` writes the card for the Hub."""
    from ..hub import cards

    training = dict(config.to_dict(), learning_rate=config.effective_learning_rate)
    try:
        text = cards.model_card(
            "lora" if config.finetune == "lora" else "finetune",
            base_model=config.pretrained_model_name_or_path,
            kind="lora" if config.finetune == "lora" else "full",
            mask_variant=config.mask_variant,
            training=cards.publishable_training(training),
            weights_path=output_dir,
        )
    except cards.CardError as error:  # the weights are saved already: a missing template must not fail the run
        logger.warning(f"The model card was not written: {error}")
        return None
    path = os.path.join(output_dir, "README.md")
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(staging, path)
    return path
