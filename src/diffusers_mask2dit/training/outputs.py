"""What a finished run leaves in ``output_dir``: the trained weights, the run's options and the model card.

- LoRA: ``pytorch_lora_weights.safetensors`` in diffusers format (``pipe.load_lora_weights(output_dir)``);
- full: ``transformer/``, the fine-tuned transformer as safetensors in the training precision;
- ``training_config.json`` (the run's options, which ``mask2dit hub build`` reads) and ``README.md``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from .checkpoints import replace_folder
from .config import TrainingConfig
from .setup import LORA_WEIGHT_NAME, TRANSFORMER_FOLDER, unwrap


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
        result = output_dir
    else:
        from huggingface_hub import save_torch_state_dict

        # Save in the training precision of the forward pass (bf16 for the released CogVideoX-5b layout).
        state_dict = {k: v.detach().to(device="cpu", dtype=weight_dtype) for k, v in state_dict.items()}
        model.save_config(staging)
        save_torch_state_dict(state_dict, staging, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
        result = os.path.join(output_dir, TRANSFORMER_FOLDER)
        replace_folder(staging, result)
    write_model_card(config, output_dir)
    write_training_config(config, output_dir)
    accelerator.wait_for_everyone()
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


def write_model_card(config: TrainingConfig, output_dir: str) -> str:
    """A README.md describing the run and how to load the result."""
    base = config.transformer_path or config.pretrained_model_name_or_path
    lines = [
        "---",
        "library_name: diffusers",
        # The Hub's base_model field takes a Hub id; a local folder is named in the text instead.
        *([f"base_model: {config.pretrained_model_name_or_path}"] if not os.path.exists(config.pretrained_model_name_or_path) else []),
        "tags:",
        "- text-to-video",
        "- diffusers",
        "- cogvideox",
        "- mask2dit",
        f"- {'lora' if config.finetune == 'lora' else 'full-fine-tune'}",
        "---",
        "",
        f"# Mask²DiT {'LoRA' if config.finetune == 'lora' else 'fine-tuned transformer'}",
        "",
        f"Trained with `diffusers-mask2dit` from `{base}` for {config.max_train_steps} steps, stage `{config.stage}` "
        f"({'n unrelated clips per sample' if config.stage == 'pretrain' else f'n consecutive shots, conditional samples with p={config.cond_prob}'}).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| scenes per sample | {config.num_scenes} |",
        f"| frames per scene | {config.scene_frames} |",
        f"| resolution | {config.height}x{config.width} |",
        f"| attention mask | {config.mask_variant} |",
        f"| learning rate | {config.effective_learning_rate} ({config.lr_scheduler}, {config.lr_warmup_steps} warmup steps) |",
        f"| batch | {config.train_batch_size} per device x {config.gradient_accumulation_steps} accumulation |",
        f"| mixed precision | {config.mixed_precision} |",
    ]
    if config.finetune == "lora":
        lines += [
            f"| LoRA rank / alpha | {config.lora_rank} / {config.lora_alpha} |",
            f"| LoRA targets | {', '.join(config.lora_target_modules)} |",
            "",
            "## Use",
            "",
            "```python",
            "import torch",
            "from diffusers_mask2dit import Mask2DiTPipeline",
            "",
            f'pipe = Mask2DiTPipeline.from_pretrained("{config.pretrained_model_name_or_path}", torch_dtype=torch.bfloat16)',
            f'pipe.load_lora_weights("{output_dir}")',
        ]
    else:
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "import torch",
            "from diffusers_mask2dit import Mask2DiTPipeline, Mask2DiTTransformer3DModel",
            "",
            f'transformer = Mask2DiTTransformer3DModel.from_pretrained("{output_dir}", subfolder="transformer", torch_dtype=torch.bfloat16)',
            f'pipe = Mask2DiTPipeline.from_pretrained("{config.pretrained_model_name_or_path}", transformer=transformer, torch_dtype=torch.bfloat16)',
        ]
    lines += [
        'pipe.to("cuda")',
        f"video = pipe(prompt=[{', '.join(repr(f'scene {i + 1} prompt') for i in range(config.num_scenes))}]).frames[0]",
        "```",
        "",
    ]
    path = os.path.join(output_dir, "README.md")
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    os.replace(staging, path)
    return path
