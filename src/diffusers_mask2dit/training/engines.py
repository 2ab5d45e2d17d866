"""The sharding engines (FSDP2, DeepSpeed ZeRO) on CPU processes, exactly as accelerate runs them on GPUs.

accelerate reads an engine's options from the variables ``accelerate launch`` sets (``ACCELERATE_USE_FSDP``
and ``FSDP_*``, ``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_*``) but turns an engine on only
for GPUs and other accelerators: a CPU run (gloo) stays plain data parallel (``MULTI_CPU``). Here the run
becomes ``FSDP`` or ``DEEPSPEED`` before anything is prepared, with the plugin accelerate itself builds from
those variables, so that the tests and CPU clusters run the same code path as GPUs: sharding, sharded
checkpoints, gathering the final weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch

FSDP_CONFIG_EXAMPLE = "examples/accelerate_configs/fsdp2.yaml"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _set_distributed_type(accelerator: Any, distributed_type: Any) -> None:
    """Both copies: accelerate copies the process state's type over the accelerator state's on every access."""
    from accelerate.state import PartialState

    accelerator.state.distributed_type = distributed_type
    PartialState._shared_state["distributed_type"] = distributed_type


def enable_engine_on_cpu(accelerator: Any) -> None:
    """Put accelerate's FSDP2 or DeepSpeed code path in force for a multi-process CPU run launched for it."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if _flag("ACCELERATE_USE_FSDP"):
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if not hasattr(plugin, "fsdp_version"):
            import accelerate

            raise ValueError(f"FSDP2 needs accelerate 1.6 or newer; accelerate {accelerate.__version__} is installed.")
        if plugin.fsdp_version != 2:
            raise ValueError(
                f"`fsdp_version` is {plugin.fsdp_version}; FSDP on CPU (gloo) runs only FSDP2: set `fsdp_version: 2` "
                f"(see {FSDP_CONFIG_EXAMPLE})."
            )
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        _set_distributed_type(accelerator, DistributedType.FSDP)
    elif _flag("ACCELERATE_USE_DEEPSPEED"):
        from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

        if not is_deepspeed_available():
            raise ValueError("The run was launched for DeepSpeed, which is not installed: `pip install deepspeed`.")
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(accelerator.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        accelerator.state.deepspeed_plugins = plugin
        _set_distributed_type(accelerator, DistributedType.DEEPSPEED)


def local_shard(parameter: torch.Tensor) -> torch.Tensor:
    """The values of ``parameter`` this process holds: FSDP2's local shard of a DTensor, DeepSpeed ZeRO-3's
    partition, or the parameter itself (replicated)."""
    parameter = getattr(parameter, "ds_tensor", parameter)
    to_local = getattr(parameter, "to_local", None)  # torch.distributed.tensor.DTensor
    return to_local() if callable(to_local) else parameter
