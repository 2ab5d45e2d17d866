"""FSDP2 training: PyTorch's ``fully_shard`` through accelerate's FSDP plugin (``fsdp_version: 2``).

accelerate does the sharding (one unit per ``CogVideoXBlock`` plus the root), the mixed-precision policy,
sharded checkpoints (``torch.distributed.checkpoint``, one file per process) and gathering the full
weights at the end (:mod:`.engines` turns the same path on for CPU processes). This module refuses
settings that would break the run's guarantees, with an error naming the option: FSDP1 with LoRA (one
dtype per unit, but LoRA keeps frozen 16-bit weights beside fp32 adapters), a non-sharded checkpoint type
(``FULL_STATE_DICT`` pickles the whole model with ``torch.save``), and two kinds of activation
checkpointing at once.

The training config's ``gradient_checkpointing`` is the one way to checkpoint activations (diffusers'
per-block checkpointing, which runs inside the FSDP units); keep ``fsdp_activation_checkpointing: false``.
"""

from __future__ import annotations

from typing import Any

from .config import TrainingConfig
from .engines import FSDP_CONFIG_EXAMPLE


def check_fsdp_options(accelerator: Any, config: TrainingConfig) -> None:
    """Refuse FSDP settings that would lose exact resume, safe checkpoints or LoRA; nothing to do without FSDP."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import StateDictType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if config.finetune == "lora" and plugin.fsdp_version != 2:
        raise ValueError(
            "`finetune: lora` under FSDP needs `fsdp_version: 2`: FSDP1 shards one dtype per unit, while LoRA keeps "
            f"frozen weights beside fp32 adapters (see {FSDP_CONFIG_EXAMPLE})."
        )
    if plugin.state_dict_type != StateDictType.SHARDED_STATE_DICT:
        raise ValueError(
            f"`fsdp_state_dict_type` is {plugin.state_dict_type.name}; Mask²DiT checkpoints need SHARDED_STATE_DICT "
            "(each process writes its shard with torch.distributed.checkpoint; the full model is gathered only for "
            "the final weights, as safetensors)."
        )
    if plugin.activation_checkpointing and config.gradient_checkpointing:
        raise ValueError(
            "Both `gradient_checkpointing` (training config) and `fsdp_activation_checkpointing` (accelerate config) "
            "are on; they recompute the same blocks. Keep `gradient_checkpointing` and set "
            "`fsdp_activation_checkpointing: false`."
        )
