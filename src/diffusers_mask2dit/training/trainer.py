"""The Mask²DiT training loop on accelerate: LoRA or full fine-tuning, both stages, resumable checkpoints.

Layout of ``output_dir``::

    checkpoint-<step>/                  accelerate state (optimizer, scheduler, RNG) + trainable weights + progress
    validation/step-<step>/             mp4 and contact sheet per validation prompt
    logs/                               tensorboard
    pytorch_lora_weights.safetensors    (lora) diffusers LoRA with adapter metadata: `pipe.load_lora_weights(output_dir)`
    transformer/                        (full) the fine-tuned transformer, safetensors
    README.md                           model card

The run's jobs live in their own modules: :mod:`.setup` (accelerate, data loader, LoRA or full weights,
optimizer, schedule, DeepSpeed), :mod:`.checkpoints` (progress, list / resolve / save), :mod:`.outputs`
(final weights, card) and :mod:`.validation`; this module is the loop. Resuming restores weights,
optimizer, LR schedule, RNG and data position, so an interrupted run continues exactly as if it had not
stopped.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoints import TrainingProgress, list_checkpoints, resolve_resume_checkpoint, save_checkpoint  # noqa: F401
from .config import TrainingConfig
from .data import EpochShuffleSampler, MultiSceneDataset
from .loss import loss_summary, prepare_diffusion_batch, training_loss
from .outputs import save_final_weights
from .precompute import WEIGHT_DTYPES, SceneEncoder, load_encoders
from .setup import (  # noqa: F401  (apply_deepspeed_gradient_clipping, setup_finetuning: imported from here by users)
    apply_deepspeed_gradient_clipping,
    build_dataloader,
    build_lr_scheduler,
    build_optimizer,
    create_accelerator,
    hparams,
    load_transformer,
    register_checkpoint_hooks,
    setup_finetuning,
    unwrap,
)
from .validation import run_validation

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """What :func:`train` produced.

    Attributes:
        weights_path: ``output_dir`` for LoRA (``pipe.load_lora_weights``), ``output_dir/transformer`` for full.
        global_step: optimizer steps done.
        transformer: the trained transformer (unwrapped from accelerate; on the main process it holds the
            full weights except under ZeRO-3 / FSDP).
    """

    weights_path: str
    global_step: int
    transformer: Any


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the run stopped without saving the bad state."""


@dataclass
class _Run:
    """Everything a training run holds between steps."""

    config: TrainingConfig
    accelerator: Any
    transformer: Any
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    dataset: MultiSceneDataset
    sampler: EpochShuffleSampler
    encoder: Optional[SceneEncoder]
    noise_scheduler: Any
    weight_dtype: torch.dtype
    trainable: List[torch.nn.Parameter]
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    last_checkpoint: Optional[str] = None
    skipped_total: int = 0

    @property
    def global_batch(self) -> int:
        return self.config.train_batch_size * self.accelerator.num_processes

    def last_good(self) -> str:
        """The sentence of a stop message that names the checkpoint to resume from."""
        if self.last_checkpoint:
            return f"The last good checkpoint is {self.last_checkpoint}."
        return "No checkpoint was written yet."


# ------------------------------------------------------------------------------------------------
# Starting and resuming
# ------------------------------------------------------------------------------------------------


def _start(config: TrainingConfig) -> _Run:
    """Accelerate, data, models, optimizer and schedule, prepared; the random draws happen in a fixed order."""
    from accelerate.utils import DistributedType, set_seed
    from diffusers import CogVideoXDPMScheduler

    config.require_model()
    os.makedirs(config.output_dir, exist_ok=True)
    accelerator, report_to = create_accelerator(config)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(config.seed)  # global RNGs (LoRA dropout); sample randomness has its own seeds
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]

    dataset, sampler, dataloader = build_dataloader(config, accelerator.num_processes, accelerator.is_main_process)
    transformer = load_transformer(config)
    noise_scheduler = CogVideoXDPMScheduler.from_pretrained(config.pretrained_model_name_or_path, subfolder="scheduler")
    encoder = None if config.cache_dir else load_encoders(config, accelerator.device, weight_dtype)
    trainable = setup_finetuning(transformer, config, weight_dtype)  # LoRA init draws from the global RNG
    transformer.to(accelerator.device)
    optimizer = build_optimizer(trainable, config)
    lr_scheduler = build_lr_scheduler(optimizer, config, accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        apply_deepspeed_gradient_clipping(accelerator.state.deepspeed_plugin.deepspeed_config, config.max_grad_norm)
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader, lr_scheduler)
    register_checkpoint_hooks(accelerator, transformer, config)
    if accelerator.is_main_process and report_to != "none":
        accelerator.init_trackers("mask2dit", config=hparams(config))
    return _Run(
        config=config, accelerator=accelerator, transformer=transformer, optimizer=optimizer, lr_scheduler=lr_scheduler,
        dataloader=dataloader, dataset=dataset, sampler=sampler, encoder=encoder, noise_scheduler=noise_scheduler,
        weight_dtype=weight_dtype, trainable=trainable,
    )


def _resume(run: _Run) -> None:
    """Restore the state of the checkpoint ``resume_from_checkpoint`` names, if any, and check it fits this launch."""
    config = run.config
    resume_path = resolve_resume_checkpoint(config)
    if resume_path:
        run.accelerator.load_state(resume_path)
        run.progress = TrainingProgress.load(resume_path)
        logger.info(f"Resumed from {resume_path} at step {run.progress.global_step}")
    run.last_checkpoint = resume_path
    if run.progress.samples_in_epoch % run.global_batch:
        raise ValueError(
            f"The checkpoint stopped {run.progress.samples_in_epoch} samples into an epoch, which is not a whole number of "
            f"global batches of {run.global_batch}; resume with the same `train_batch_size` x number of processes."
        )
    logger.info(
        f"{len(run.dataset)} samples, {len(run.dataloader)} batches per process per epoch, global batch {run.global_batch} x "
        f"{config.gradient_accumulation_steps} accumulation, {config.max_train_steps} steps, finetune={config.finetune}, "
        f"stage={config.stage}, trainable parameters {sum(p.numel() for p in run.trainable):,}"
    )


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------


def _model_inputs(batch: Dict[str, Any], encoder: Optional[SceneEncoder], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
    """``(latent_mean, latent_std (B, F, C, h, w), prompt_embeds (B, n*L, D), latent frames per scene)``."""
    if "pixels" in batch:
        means, stds = zip(*(encoder.encode_video(scene.to(device)) for scene in batch["pixels"]))
        embeds = [encoder.encode_prompts(captions) for captions in batch["captions"]]
    else:
        means, stds, embeds = batch["latent_mean"], batch["latent_std"], batch["prompt_embeds"]
    scene_frames = [m.shape[1] for m in means]
    cat = lambda tensors: torch.cat([t.to(device) for t in tensors], dim=1)  # noqa: E731
    return cat(means), cat(stds), cat(embeds), scene_frames


def _report_skipped(run: _Run, batch: Dict[str, Any]) -> None:
    if batch["skipped"]:
        run.skipped_total += len(batch["skipped"])
        logger.warning(
            f"Skipped {len(batch['skipped'])} sample(s) that could not be loaded, each replaced by the next "
            f"sample ({run.skipped_total} so far on process {run.accelerator.process_index}): {batch['skipped'][0]}"
        )


def _clip_gradients(run: _Run) -> Optional[torch.Tensor]:
    """Clip at ``max_grad_norm`` when the accumulated gradients are complete; a non-finite norm stops the run."""
    from accelerate.utils import DistributedType

    accelerator = run.accelerator
    if not (accelerator.sync_gradients and run.config.max_grad_norm > 0):
        return None
    # All of the prepared model's parameters: FSDP only clips when given exactly those.
    grad_norm = accelerator.clip_grad_norm_(run.transformer.parameters(), run.config.max_grad_norm)
    # DeepSpeed and fp16 loss scaling handle overflowing gradients themselves (they skip the step).
    checks_grad_norm = accelerator.distributed_type != DistributedType.DEEPSPEED and accelerator.scaler is None
    if checks_grad_norm and grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)).all():
        raise NonFiniteLossError(
            f"The gradient norm became {float(grad_norm)} at step {run.progress.global_step + 1}; training "
            f"stopped before applying it. {run.last_good()}"
        )
    return grad_norm


def _training_step(run: _Run, batch: Dict[str, Any]) -> Tuple[float, Optional[torch.Tensor], Any]:
    """Forward, loss check, backward, clipping and (at the end of an accumulation) the update.

    Returns ``(mean loss over processes, gradient norm or None, the diffusion batch)``.
    """
    accelerator, config = run.accelerator, run.config
    with accelerator.accumulate(run.transformer):
        latent_mean, latent_std, prompt_embeds, scene_frames = _model_inputs(batch, run.encoder, accelerator.device)
        diffusion = prepare_diffusion_batch(
            latent_mean, latent_std, scene_frames, batch["sample_seeds"], run.noise_scheduler, config.effective_cond_prob
        )
        loss = training_loss(run.transformer, diffusion, prompt_embeds, config.mask_variant, dtype=run.weight_dtype)
        gathered = accelerator.gather(loss.detach().reshape(1))
        if not torch.isfinite(gathered).all():
            raise NonFiniteLossError(
                f"The loss became {gathered.tolist()} at step {run.progress.global_step + 1} (epoch {run.progress.epoch}); "
                f"training stopped without saving. {run.last_good()} Resume from it with a lower learning rate, or check the data."
            )
        accelerator.backward(loss)
        grad_norm = _clip_gradients(run)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return float(gathered.mean()), grad_norm, diffusion


def _finish_step(run: _Run, step_losses: List[float], grad_norm: Optional[torch.Tensor], diffusion: Any,
                 step_time: float, progress_bar: Any) -> None:
    """After an optimizer step: count it, log it, and checkpoint or validate when due."""
    config, progress = run.config, run.progress
    progress.global_step += 1
    if progress.samples_in_epoch >= len(run.dataloader) * run.global_batch:
        progress.epoch += 1
        progress.samples_in_epoch = 0
    logs = {"loss": sum(step_losses) / len(step_losses), "lr": run.lr_scheduler.get_last_lr()[0]}
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    logs.update(loss_summary(diffusion))
    logs["step_time"] = step_time
    progress_bar.update(1)
    progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    run.accelerator.log(logs, step=progress.global_step)

    if config.checkpointing_steps and progress.global_step % config.checkpointing_steps == 0:
        run.last_checkpoint = save_checkpoint(run.accelerator, config.output_dir, progress, config.checkpoints_total_limit)
    if config.validation_prompts and config.validation_steps and progress.global_step % config.validation_steps == 0:
        run_validation(run.accelerator, run.transformer, run.encoder, config, progress.global_step, run.weight_dtype)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _train_epochs(run: _Run, progress_bar: Any) -> None:
    """Steps until ``max_train_steps``, epoch after epoch, starting where ``run.progress`` says."""
    config, progress = run.config, run.progress
    step_losses: List[float] = []
    step_started = time.perf_counter()
    while progress.global_step < config.max_train_steps:
        run.sampler.start_epoch(progress.epoch)
        run.dataset.start_epoch(progress.epoch)
        skip_batches = progress.samples_in_epoch // run.global_batch
        epoch_loader = run.accelerator.skip_first_batches(run.dataloader, skip_batches) if skip_batches else run.dataloader
        for batch in epoch_loader:
            _report_skipped(run, batch)
            loss, grad_norm, diffusion = _training_step(run, batch)
            step_losses.append(loss)
            progress.samples_in_epoch += run.global_batch
            if not run.accelerator.sync_gradients:
                continue
            _finish_step(run, step_losses, grad_norm, diffusion, time.perf_counter() - step_started, progress_bar)
            step_losses, step_started = [], time.perf_counter()
            if progress.global_step >= config.max_train_steps:
                break
        if progress.samples_in_epoch and progress.global_step < config.max_train_steps:
            progress.epoch += 1  # the loader ran out without a step at its end (it syncs there, so rarely)
            progress.samples_in_epoch = 0


def train(config: TrainingConfig) -> TrainingResult:
    """Run training as configured; returns where the final weights are (see :func:`save_final_weights`).

    Raises:
        NonFiniteLossError: the loss or gradient norm became NaN/inf; the last checkpoint is left untouched.
    """
    from tqdm.auto import tqdm

    run = _start(config)
    _resume(run)
    accelerator = run.accelerator
    progress_bar = tqdm(
        total=config.max_train_steps, initial=run.progress.global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    run.transformer.train()
    try:
        _train_epochs(run, progress_bar)
    finally:
        progress_bar.close()

    accelerator.wait_for_everyone()
    result = save_final_weights(accelerator, run.transformer, config, run.weight_dtype)
    if config.validation_prompts and (not config.validation_steps or config.max_train_steps % config.validation_steps):
        run_validation(accelerator, run.transformer, run.encoder, config, run.progress.global_step, run.weight_dtype)
    accelerator.end_training()
    logger.info(f"Training finished at step {run.progress.global_step}; weights in {result}")
    return TrainingResult(weights_path=result, global_step=run.progress.global_step, transformer=unwrap(accelerator, run.transformer))
