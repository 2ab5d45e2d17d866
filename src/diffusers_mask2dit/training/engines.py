"""The sharding engines (FSDP2, DeepSpeed ZeRO) on CPU processes, exactly as accelerate runs them on GPUs.

accelerate reads an engine's options from the variables ``accelerate launch`` sets (``ACCELERATE_USE_FSDP``
and ``FSDP_*``, ``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_*``) but turns an engine on only
for GPUs and other accelerators: a CPU run (gloo) stays plain data parallel (``MULTI_CPU``). Here the run
becomes ``FSDP`` or ``DEEPSPEED`` before anything is prepared, with the plugin accelerate itself builds from
those variables, so that the tests and CPU clusters run the same code path as GPUs: sharding, sharded
checkpoints, gathering the final weights.

Also here, for every device: loading the frozen models whole under ZeRO-3, refusing ZeRO-3 where it would
hang, and the local shard of a parameter (for checks that look at every weight on every process).
FSDP's own option checks are in :mod:`.fsdp`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .config import TrainingConfig

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


def check_zero3_options(accelerator: Any, config: TrainingConfig) -> None:
    """Refuse ZeRO-3 with conditional samples, which would hang the run.

    ZeRO-3 gathers each module's weights with a collective when the module runs, so every process must run
    the same modules the same number of times. A conditional SFT sample (clean context scenes at timestep 0)
    takes the per-scene modulation path and an unconditional one the stock path, and which one a process
    draws differs between processes: the processes would wait for each other for good. FSDP2 gathers whole
    blocks and ZeRO-2 keeps whole weights, so neither depends on the path.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3 or config.effective_cond_prob == 0:
        return
    raise ValueError(
        f"DeepSpeed ZeRO-3 cannot train SFT with `cond_prob` {config.cond_prob}: conditional and unconditional samples "
        "run different modules, and ZeRO-3 gathers weights per module with collectives, so the processes would hang. "
        f"Use FSDP2 ({FSDP_CONFIG_EXAMPLE}) or ZeRO-2, or `cond_prob: 0`."
    )


@contextmanager
def whole_frozen_models(accelerator: Any) -> Iterator[None]:
    """Load models whole under DeepSpeed ZeRO-3: while its config is active, transformers partitions every
    model it loads (``zero.Init``), whatever ``zero3_init_flag`` says, and the frozen VAE and T5, which are
    never prepared, would stay partitioned (empty weights)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # the transformer's engine is set up with it


def local_shard(parameter: torch.Tensor) -> torch.Tensor:
    """The values of ``parameter`` this process holds: FSDP2's local shard of a DTensor, DeepSpeed ZeRO-3's
    partition, or the parameter itself (replicated)."""
    parameter = getattr(parameter, "ds_tensor", parameter)
    to_local = getattr(parameter, "to_local", None)  # torch.distributed.tensor.DTensor
    return to_local() if callable(to_local) else parameter
