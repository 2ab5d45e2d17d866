"""Tiny offline stand-ins for what the Hub tools consume: the authors' release layout and a trainer LoRA.

Used by the tests and the docs-snippet runner; built from :mod:`diffusers_mask2dit.tiny` in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

# A made-up class name standing in for the authors' own transformer class in their config.
FAKE_AUTHORS_CLASS = "AuthorsMask2DiTTransformer3DModel"


def save_fake_official_layout(
    path: os.PathLike | str,
    attn_msk_version: Optional[int] = 2,
    transformer_format: str = "bin",
    shard: bool = True,
    transformer_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write a tiny fake of the authors' released layout (METHOD.md, "The released checkpoint").

    ``transformer/ vae/ text_encoder/ tokenizer/ scheduler/``, no ``model_index.json``; the transformer
    config names :data:`FAKE_AUTHORS_CLASS` and carries ``attn_msk_version`` (omitted when None); its
    weights are ``transformer_format`` ("bin" or "safetensors"), sharded when ``shard``, in ``transformer_dtype``.
    """
    from ..tiny import build_tiny_components

    path = Path(path)
    components = build_tiny_components("5b", seed=seed)
    transformer = components["transformer"].to(transformer_dtype)
    transformer.save_pretrained(
        path / "transformer",
        safe_serialization=transformer_format == "safetensors",
        max_shard_size="40KB" if shard else "10GB",
    )
    config_path = path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = FAKE_AUTHORS_CLASS
    if attn_msk_version is not None:
        config["attn_msk_version"] = attn_msk_version
    config_path.write_text(json.dumps(config, indent=2))
    components["vae"].save_pretrained(path / "vae")
    components["text_encoder"].save_pretrained(path / "text_encoder")
    components["tokenizer"].save_pretrained(path / "tokenizer")
    components["scheduler"].save_pretrained(path / "scheduler")
    return path


def save_tiny_lora(path: os.PathLike | str, rank: int = 4, seed: int = 0, style: str = "5b") -> Path:
    """Write a diffusers-format LoRA (``pytorch_lora_weights.safetensors``) for the tiny ``style`` transformer.

    The adapter's weights are random (B not zero), so loading it changes the output.
    """
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from ..tiny import build_tiny_components

    transformer = build_tiny_components(style, seed=seed)["transformer"]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    CogVideoXPipeline.save_lora_weights(str(path), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return Path(path)
