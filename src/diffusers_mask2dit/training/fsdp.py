"""FSDP2 training: PyTorch's ``fully_shard`` through accelerate's FSDP plugin (``fsdp_version: 2``).

accelerate does the sharding (one unit per ``CogVideoXBlock`` plus the root), the mixed-precision policy,
sharded checkpoints (``torch.distributed.checkpoint``, one file per process) and gathering the full
weights at the end; this module only

- turns that same code path on for CPU processes (gloo), where accelerate enables FSDP only on GPUs and
  other accelerators: the tests and CPU clusters run exactly what GPUs run;
- refuses settings that would break the run's guarantees, with an error naming the option:
  FSDP1 with LoRA (one dtype per unit, but LoRA keeps frozen 16-bit weights beside fp32 adapters),
  a non-sharded checkpoint type (``FULL_STATE_DICT`` pickles the whole model with ``torch.save``), and
  two kinds of activation checkpointing at once;
- gives the local shard of a parameter, for checks that look at every weight on every process.

The training config's ``gradient_checkpointing`` is the one way to checkpoint activations (diffusers'
per-block checkpointing, which runs inside the FSDP units); keep ``fsdp_activation_checkpointing: false``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import TrainingConfig

FSDP_CONFIG_EXAMPLE = "examples/accelerate_configs/fsdp2.yaml"


def fsdp_requested() -> bool:
    """Whether this process was launched for FSDP (``accelerate launch`` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Any) -> None:
    """Put accelerate's FSDP2 code path in force for a multi-process CPU run launched for FSDP.

    accelerate reads the FSDP options from the ``FSDP_*`` variables of the launch but keeps a CPU run in
    plain data parallelism (``MULTI_CPU``). The run becomes ``FSDP`` here, before anything is prepared,
    exactly as accelerate sets it up on GPUs: the plugin in the state, and the distributed type in both
    the accelerator's and the process' shared state (accelerate copies the latter over the former).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate builds it on GPUs
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"`fsdp_version` is {plugin.fsdp_version}; FSDP on CPU (gloo) runs only FSDP2: set `fsdp_version: 2` "
            f"(see {FSDP_CONFIG_EXAMPLE})."
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


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


def local_shard(parameter: torch.Tensor) -> torch.Tensor:
    """The values of ``parameter`` this process holds: FSDP2's local shard of a DTensor, DeepSpeed ZeRO-3's
    partition, or the parameter itself (replicated)."""
    parameter = getattr(parameter, "ds_tensor", parameter)
    to_local = getattr(parameter, "to_local", None)  # torch.distributed.tensor.DTensor
    return to_local() if callable(to_local) else parameter
