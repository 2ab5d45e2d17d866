"""Setting up a training run: accelerate, the data loader, the transformer (LoRA or full), optimizer, LR
schedule, DeepSpeed clipping and the hooks that make LoRA checkpoints hold only the adapters."""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from typing import Any, Dict, List, Tuple

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME  # diffusers' file name

from .config import TrainingConfig
from .data import EpochShuffleSampler, MultiSceneDataset, VideoSource, collate_scenes, load_training_records
from .engines import check_zero3_options, enable_engine_on_cpu
from .fsdp import check_fsdp_options
from .precompute import open_cache

logger = logging.getLogger(__name__)

TRANSFORMER_FOLDER = "transformer"


# ------------------------------------------------------------------------------------------------
# accelerate
# ------------------------------------------------------------------------------------------------


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


def hparams(config: TrainingConfig) -> Dict[str, Any]:
    """Config values tensorboard accepts as hyper-parameters (numbers and strings)."""
    values = {}
    for key, value in config.to_dict().items():
        values[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return values


def create_accelerator(config: TrainingConfig) -> Tuple[Any, str]:
    """The `Accelerator` of the run and the tracker actually used (``"none"`` when tensorboard is missing)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    report_to = config.report_to
    if report_to == "tensorboard" and not _tensorboard_available():
        logger.warning("`report_to` is tensorboard but tensorboard is not installed; logging to the console only.")
        report_to = "none"
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
        ),
        # A hung or dead process ends the run after this long instead of blocking the others for good.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout))],
    )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "`mixed_precision` fp16 needs a GPU (on a CPU there is no fp16 loss scaling and fp16 kernels are missing); "
            "use bf16 or no on this machine."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # accelerate falls back to independent single-process runs on CPU-only machines unless told to use CPU.
        raise ValueError(
            f"Launched as {launched} processes but accelerate runs {accelerator.num_processes}; on a machine without "
            "GPUs set ACCELERATE_USE_CPU=true for multi-process (gloo) training."
        )
    enable_engine_on_cpu(accelerator)  # accelerate itself turns FSDP / DeepSpeed on only on GPUs
    check_fsdp_options(accelerator, config)
    check_zero3_options(accelerator, config)
    return accelerator, report_to


def unwrap(accelerator: Any, model: Any) -> Any:
    """The bare model under accelerate's wrappers and ``torch.compile``."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)  # torch.compile


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def build_dataloader(
    config: TrainingConfig, num_processes: int, is_main_process: bool = True
) -> Tuple[MultiSceneDataset, EpochShuffleSampler, torch.utils.data.DataLoader]:
    """The dataset (cached latents when ``cache_dir`` is set, decoded videos otherwise), its sampler and loader."""
    if config.cache_dir:
        records, source = open_cache(config)
    else:
        if not config.data_file:
            raise ValueError("Either `data_file` (videos) or `cache_dir` (a `mask2dit precompute` cache) is required.")
        records = load_training_records(
            config.data_file, config.stage, config.num_scenes, config.scene_frames, config.video_root, warn=is_main_process
        )
        source = VideoSource(config.height, config.width, config.stage)
    dataset = MultiSceneDataset(records, source, config.stage, config.num_scenes, config.scene_frames, config.seed)
    global_batch = config.train_batch_size * num_processes
    if len(dataset) < global_batch:
        raise ValueError(
            f"The dataset has {len(dataset)} samples, fewer than one global batch of {global_batch} "
            f"(`train_batch_size` {config.train_batch_size} x {num_processes} processes)."
        )
    sampler = EpochShuffleSampler(len(dataset), config.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        collate_fn=collate_scenes,
        num_workers=config.dataloader_num_workers,
        drop_last=True,  # every step sees a full batch, whatever the number of processes
        # The loader's own generator seeds workers, so building iterators never draws from the global RNG.
        generator=torch.Generator().manual_seed(config.seed),
    )
    return dataset, sampler, dataloader


# ------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ------------------------------------------------------------------------------------------------


def load_transformer(config: TrainingConfig) -> Any:
    """The transformer to fine-tune as a `Mask2DiTTransformer3DModel` with ``config.mask_variant``."""
    from .. import Mask2DiTTransformer3DModel

    if config.transformer_path:
        transformer = Mask2DiTTransformer3DModel.from_pretrained(config.transformer_path)
    else:
        transformer = Mask2DiTTransformer3DModel.from_pretrained(config.pretrained_model_name_or_path, subfolder=TRANSFORMER_FOLDER)
    return Mask2DiTTransformer3DModel.from_cogvideox(transformer, mask_variant=config.mask_variant)


def lora_config(config: TrainingConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights=True,
        target_modules=list(config.lora_target_modules),
    )


def setup_finetuning(transformer: Any, config: TrainingConfig, weight_dtype: torch.dtype) -> List[torch.nn.Parameter]:
    """Make the LoRA adapters (frozen base in ``weight_dtype``, adapters fp32) or all weights trainable; returns them."""
    if config.finetune == "lora":
        transformer.requires_grad_(False)
        if transformer.dtype != weight_dtype:
            transformer.to(dtype=weight_dtype)
        try:
            transformer.add_adapter(lora_config(config))
        except ValueError as error:
            raise ValueError(f"`lora_target_modules` {config.lora_target_modules}: {error}") from error
        for parameter in transformer.parameters():
            if parameter.requires_grad:  # adapters train in fp32 whatever the frozen weights' dtype
                parameter.data = parameter.data.float()
    else:
        transformer.requires_grad_(True)
        if transformer.dtype != torch.float32:
            transformer.to(dtype=torch.float32)  # fp32 master weights; accelerate autocasts the forward
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return [p for p in transformer.parameters() if p.requires_grad]


def build_optimizer(parameters: List[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=config.effective_learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("`use_8bit_adam` needs bitsandbytes (`pip install bitsandbytes`); it is not installed.") from None
        return bnb.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, num_processes: int) -> Any:
    """diffusers' LR schedule of ``config``, counted in optimizer steps of the whole run."""
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def apply_learning_rate(lr_scheduler: Any, learning_rate: float) -> float:
    """Put ``learning_rate`` in force as the schedule's peak after a checkpoint restored another one.

    A restored LR schedule brings back the peak it was built with (its ``base_lrs``) and the optimizer the
    rate of its last step, so a new ``learning_rate`` on resume would be ignored. The peak is set and the
    current rate recomputed from the schedule at its restored position. Returns the peak the checkpoint had;
    nothing changes when it equals ``learning_rate``.
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper around diffusers' LambdaLR
    saved = float(scheduler.base_lrs[0])
    if saved == learning_rate:
        return saved
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return saved


def apply_deepspeed_gradient_clipping(ds_config: Dict[str, Any], max_grad_norm: float) -> None:
    """Make DeepSpeed clip at ``max_grad_norm``: it clips inside its own step and ignores any other clipping.

    An ``"auto"`` or absent value is set to ``max_grad_norm`` (accelerate would otherwise fill in 1.0); an
    explicit different value is an error rather than a silently different run.
    """
    current = ds_config.get("gradient_clipping", "auto")
    if current in (None, "auto"):
        ds_config["gradient_clipping"] = float(max_grad_norm)
    elif float(current) != float(max_grad_norm):
        raise ValueError(
            f"`max_grad_norm` is {max_grad_norm} but the DeepSpeed config sets gradient_clipping={current}; "
            "set one of them to match (or gradient_clipping: auto)."
        )


# ------------------------------------------------------------------------------------------------
# LoRA checkpoints
# ------------------------------------------------------------------------------------------------


def register_checkpoint_hooks(accelerator: Any, transformer: Any, config: TrainingConfig) -> None:
    """LoRA checkpoints hold only the adapters (in diffusers format) instead of the whole frozen transformer."""
    if config.finetune != "lora":
        return  # accelerate saves and loads the full weights itself (safetensors)
    from diffusers import CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    target_type = type(unwrap(accelerator, transformer))

    def save_hook(models: List[Any], weights: List[Any], output_dir: str) -> None:
        if not weights:  # DeepSpeed / FSDP save the model state themselves
            return
        for index in reversed(range(len(models))):
            model = unwrap(accelerator, models[index])
            if isinstance(model, target_type):
                if accelerator.is_main_process:
                    CogVideoXPipeline.save_lora_weights(
                        output_dir,
                        transformer_lora_layers=get_peft_model_state_dict(model),
                        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
                    )
                weights.pop(index)

    def load_hook(models: List[Any], input_dir: str) -> None:
        for index in reversed(range(len(models))):
            model = unwrap(accelerator, models[index])
            if isinstance(model, target_type):
                state_dict = CogVideoXPipeline.lora_state_dict(input_dir, weight_name=LORA_WEIGHT_NAME)
                state_dict = {k[len("transformer.") :]: v for k, v in state_dict.items() if k.startswith("transformer.")}
                result = set_peft_model_state_dict(model, state_dict, adapter_name="default")
                unexpected = getattr(result, "unexpected_keys", None)
                if unexpected:
                    raise ValueError(f"The checkpoint's LoRA weights do not fit this model; unexpected keys: {unexpected[:5]}")
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.data = parameter.data.float()
                models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
