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

from ..parallel import CollectiveTimeoutError  # one error for the trainer and parallel inference
from .checkpoints import (  # noqa: F401  (list_checkpoints, DiskFullError: imported from here by users)
    DiskFullError,
    TrainingProgress,
    check_resumable_by,
    check_writable,
    list_checkpoints,
    load_training_state,
    resolve_resume_checkpoint,
    retire_newer_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from .config import TrainingConfig
from .data import EpochShuffleSampler, MultiSceneDataset
from .engines import local_shard, whole_frozen_models
from .loss import drop_captions, loss_summary, prepare_diffusion_batch, training_loss
from .outputs import save_final_weights
from .precompute import WEIGHT_DTYPES, SceneEncoder, load_encoders, load_null_prompt
from .setup import (  # noqa: F401  (apply_deepspeed_gradient_clipping, setup_finetuning: imported from here by users)
    apply_deepspeed_gradient_clipping,
    apply_learning_rate,
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
    """The loss, the gradient norm or the weights became NaN or infinite; the run stopped before the bad
    update was applied (loss, gradient norm) or saved (weights)."""


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
    null_embeds: Optional[torch.Tensor] = None  # the empty prompt's embedding (L, D), with caption dropout
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    # A checkpoint counts as good once a step from its weights gave a finite loss and gradient norm; the newest
    # one (saved, or resumed from) is "unconfirmed" until then (its weights may be the ones that diverge).
    last_checkpoint: Optional[str] = None
    unconfirmed_checkpoint: Optional[str] = None
    resumed: bool = False
    skipped_total: int = 0

    @property
    def global_batch(self) -> int:
        return self.config.train_batch_size * self.accelerator.num_processes

    def confirm_checkpoint(self) -> None:
        if self.unconfirmed_checkpoint:
            self.last_checkpoint, self.unconfirmed_checkpoint = self.unconfirmed_checkpoint, None

    def good_checkpoint(self, trust_unconfirmed: bool = True) -> Optional[str]:
        return (self.unconfirmed_checkpoint if trust_unconfirmed else None) or self.last_checkpoint

    def last_good(self, trust_unconfirmed: bool = True) -> str:
        """The sentence of a stop message that names the checkpoint to resume from."""
        path = self.good_checkpoint(trust_unconfirmed)
        if path:
            return f"The last good checkpoint is {path}."
        if self.resumed:
            return f"No checkpoint in {self.config.output_dir} has finite weights and a finite probe step."
        return "No checkpoint was written yet."

    def advice(self, trust_unconfirmed: bool = True) -> str:
        start = "Resume from it" if self.good_checkpoint(trust_unconfirmed) else "Start again"
        return f"{start} with a lower `learning_rate` (it is used on resume), or check the data."


# ------------------------------------------------------------------------------------------------
# Starting and resuming
# ------------------------------------------------------------------------------------------------


def _start(config: TrainingConfig) -> _Run:
    """Accelerate, data, models, optimizer and schedule, prepared; the random draws happen in a fixed order."""
    from accelerate.utils import DistributedType, set_seed
    from diffusers import CogVideoXDPMScheduler

    config.require_model()
    check_writable(config.output_dir)  # before any work: an unwritable folder would lose the whole run
    accelerator, report_to = create_accelerator(config)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(config.seed)  # global RNGs (LoRA dropout); sample randomness has its own seeds
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]

    dataset, sampler, dataloader = build_dataloader(config, accelerator.num_processes, accelerator.is_main_process)
    try:
        with whole_frozen_models(accelerator):
            transformer = load_transformer(config)
            noise_scheduler = CogVideoXDPMScheduler.from_pretrained(config.pretrained_model_name_or_path, subfolder="scheduler")
            encoder = None if config.cache_dir else load_encoders(config, accelerator.device, weight_dtype)
    except OSError as error:  # a folder without the CogVideoX components, or a Hub id that cannot be fetched
        raise ValueError(
            f"`pretrained_model_name_or_path` {config.pretrained_model_name_or_path!r}"
            + (f" / `transformer_path` {config.transformer_path!r}" if config.transformer_path else "")
            + f" could not be loaded: {str(error).strip().splitlines()[0]}"
        ) from None
    null_embeds = None
    if config.caption_dropout > 0:
        null_embeds = load_null_prompt(config.cache_dir) if config.cache_dir else encoder.encode_prompts([""])[0]
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
        weight_dtype=weight_dtype, trainable=trainable, null_embeds=null_embeds,
    )


def _choose_checkpoint(run: _Run) -> Optional[str]:
    """The checkpoint to resume from, verified on the main process (the others follow its choice)."""
    accelerator = run.accelerator
    choice: List[Optional[str]] = [None, None]  # path, error
    if accelerator.is_main_process:
        try:
            choice[0] = resolve_resume_checkpoint(run.config)
        except ValueError as error:
            choice[1] = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(choice)
    if choice[1]:
        raise ValueError(choice[1])
    return choice[0]


def _resume(run: _Run) -> None:
    """Restore the checkpoint ``resume_from_checkpoint`` names, if any, put the configured learning rate in
    force, and rename aside the checkpoints of an abandoned run (newer than the starting step)."""
    config, accelerator = run.config, run.accelerator
    resume_path = _choose_checkpoint(run)
    if resume_path:
        check_resumable_by(resume_path, config)
        load_training_state(accelerator, resume_path)
        run.progress = TrainingProgress.load(resume_path)
        logger.info(f"Resumed from {resume_path} at step {run.progress.global_step}")
        saved_lr = apply_learning_rate(run.lr_scheduler, config.effective_learning_rate)
        current = run.lr_scheduler.get_last_lr()[0]
        if saved_lr != config.effective_learning_rate:
            logger.info(
                f"Learning rate in force: {config.effective_learning_rate} (this run's `learning_rate`; the checkpoint "
                f"was trained with {saved_lr}); {current} at step {run.progress.global_step} of the {config.lr_scheduler} schedule."
            )
        else:
            logger.info(f"Learning rate in force: {config.effective_learning_rate}, as in the checkpoint; {current} now.")
    run.unconfirmed_checkpoint, run.resumed = resume_path, bool(resume_path)  # confirmed by the first finite step
    if accelerator.is_main_process:
        retire_newer_checkpoints(config.output_dir, run.progress.global_step)
    accelerator.wait_for_everyone()
    if run.progress.samples_in_epoch % run.global_batch:
        raise ValueError(
            f"The checkpoint stopped {run.progress.samples_in_epoch} samples into an epoch, which is not a whole number of "
            f"global batches of {run.global_batch}; resume with the same `train_batch_size` x number of processes."
        )
    logger.info(
        f"{len(run.dataset)} samples, {len(run.dataloader)} batches per process per epoch, global batch {run.global_batch} x "
        f"{config.gradient_accumulation_steps} accumulation, {config.max_train_steps} steps, finetune={config.finetune}, "
        f"stage={config.stage}, trainable parameters {sum(getattr(p, 'ds_numel', p.numel()) for p in run.trainable):,}"
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


def _clip_gradients(run: _Run) -> Tuple[Optional[torch.Tensor], bool]:
    """Clip at ``max_grad_norm`` once the accumulated gradients are complete. Returns ``(norm or None, whether a
    non-finite norm must stop the run)``. With clipping off the norm is still measured (clipping at infinity
    changes nothing)."""
    from accelerate.utils import DistributedType

    accelerator, max_norm = run.accelerator, run.config.max_grad_norm
    if not accelerator.sync_gradients:
        return None, False
    # DeepSpeed and fp16 loss scaling handle overflowing gradients themselves (they skip the step).
    self_checked = accelerator.distributed_type == DistributedType.DEEPSPEED or accelerator.scaler is not None
    if self_checked and max_norm <= 0:
        return None, False
    # All of the prepared model's parameters: FSDP only clips when given exactly those.
    grad_norm = accelerator.clip_grad_norm_(run.transformer.parameters(), max_norm if max_norm > 0 else float("inf"))
    return grad_norm, not self_checked


def _is_finite(value: Any) -> bool:
    return value is None or bool(torch.isfinite(torch.as_tensor(value)).all())


def _check_weights_finite(run: _Run, what: str) -> None:
    """Stop before ``what`` (a save) when a trainable weight is NaN or infinite on any process."""
    tensors = [local_shard(p).detach() for p in run.transformer.parameters() if p.requires_grad]
    finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())
    flags = run.accelerator.gather(torch.tensor([1.0 if finite else 0.0], device=run.accelerator.device))
    if float(flags.min()) < 1.0:
        raise NonFiniteLossError(
            f"The weights are not finite after step {run.progress.global_step} (the updates diverged); {what} was not "
            f"saved. {run.last_good()} {run.advice()}"
        )


def _non_finite_sources(batch: Dict[str, Any]) -> List[str]:
    """``"sample <index> scene <k> (<file>): <tensors>"`` for every scene of the batch with a NaN or infinite value."""
    found: Dict[Tuple[int, int], List[str]] = {}
    for key in ("latent_mean", "latent_std", "prompt_embeds", "pixels"):
        for scene, tensor in enumerate(batch.get(key, [])):
            for row in range(tensor.shape[0]):
                if not bool(torch.isfinite(tensor[row]).all()):
                    found.setdefault((row, scene), []).append(key)
    return [
        f"sample {int(batch['indices'][row])} scene {scene + 1} ({batch['sources'][row][scene]}): {', '.join(keys)}"
        for (row, scene), keys in sorted(found.items())
    ]


def _stop_on_non_finite(run: _Run, what: str, batch: Dict[str, Any], inputs: Tuple[torch.Tensor, ...], probe: Any) -> None:
    """Raise for a NaN/inf loss or gradient norm, saying whether the data (naming the samples and files) or the
    weights caused it. Diverged weights set aside every checkpoint holding them (see `_set_aside_diverged`)."""
    accelerator, step = run.accelerator, run.progress.global_step + 1
    finite_inputs = all(bool(torch.isfinite(t).all()) for t in inputs)
    flags = accelerator.gather(torch.tensor([1.0 if finite_inputs else 0.0], device=accelerator.device))
    if float(flags.min()) < 1.0:
        where = "on another process"
        if not finite_inputs:  # the loaded tensors name their files; else encoding or the empty prompt made it
            where = "; ".join(_non_finite_sources(batch)) or "after encoding, in the batch of " + "; ".join(
                f"sample {int(index)} ({', '.join(files)})" for index, files in zip(batch["indices"], batch["sources"]))
        cause = f"some latents or prompt embeddings of the batch are not finite (damaged data: {where})"
        good, advice = run.last_good(True), "Remove or re-create those samples (`mask2dit precompute` for cache files), then resume from it."
    else:
        cause = "the inputs are finite, so the weights diverged" + _set_aside_diverged(run, probe)
        good, advice = run.last_good(False), run.advice(False)
    raise NonFiniteLossError(
        f"{what} at step {step} (epoch {run.progress.epoch}): {cause}; training stopped without saving or applying it. "
        f"{good} {advice}"
    )


def _set_aside_diverged(run: _Run, probe: Any) -> str:
    """Rename the unconfirmed checkpoint (it holds the weights that just diverged) to ``.diverged``; when no
    checkpoint of this run is confirmed and it resumed, load the older checkpoints newest first until one passes
    ``probe()`` (a finite loss and gradient norm), renaming those that fail. Returns the clause that says so."""
    accelerator, renamed = run.accelerator, []
    suspects = [run.unconfirmed_checkpoint] if run.unconfirmed_checkpoint else []
    run.unconfirmed_checkpoint = None
    if run.last_checkpoint is None and run.resumed:
        for _, path in reversed(list_checkpoints(run.config.output_dir)):
            if path in suspects or verify_checkpoint(path):
                continue
            try:
                check_resumable_by(path, run.config)
                load_training_state(accelerator, path)
            except ValueError as error:  # another run's checkpoint, or a refused file: not a candidate
                logger.warning(f"Not probing {path}: {error}")
                continue
            if probe():
                run.last_checkpoint = path
                break
            suspects.append(path)
    accelerator.wait_for_everyone()
    for path in suspects:
        if accelerator.is_main_process and os.path.isdir(path):
            os.rename(path, path + ".diverged")
        renamed.append(f"; {path} {'holds those weights' if not renamed else 'also fails a probe step'} and was renamed to {path}.diverged")
    return "".join(renamed)


def _probe_step(run: _Run, diffusion: Any, prompt_embeds: torch.Tensor) -> bool:
    """Whether the current weights give a finite loss and gradient norm on this batch, on every process (no update)."""
    accelerator = run.accelerator
    run.optimizer.zero_grad(set_to_none=True)
    loss = training_loss(run.transformer, diffusion, prompt_embeds, run.config.mask_variant, dtype=run.weight_dtype)
    finite = _is_finite(loss.detach())
    if finite:
        accelerator.backward(loss)
        finite = _is_finite(accelerator.clip_grad_norm_(run.transformer.parameters(), float("inf")))
    run.optimizer.zero_grad(set_to_none=True)
    flags = accelerator.gather(torch.tensor([1.0 if finite else 0.0], device=accelerator.device))
    return float(flags.min()) == 1.0


def _apply_update(run: _Run) -> None:
    """The optimizer and LR-schedule step; an update too large for the weights' dtype stops the run."""
    try:
        run.optimizer.step()
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        raise NonFiniteLossError(
            f"The update of step {run.progress.global_step + 1} overflows the weights' dtype ({error}); the learning "
            f"rate {run.lr_scheduler.get_last_lr()[0]} is far too large. {run.last_good()} {run.advice()}"
        ) from None
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _training_step(run: _Run, batch: Dict[str, Any]) -> Tuple[float, Optional[torch.Tensor], Any]:
    """Forward, loss check, backward, gradient check and clipping, and (at the end of an accumulation) the
    update: nothing non-finite is ever applied.

    Returns ``(mean loss over processes, gradient norm or None, the diffusion batch)``.
    """
    accelerator, config = run.accelerator, run.config
    with accelerator.accumulate(run.transformer):
        latent_mean, latent_std, prompt_embeds, scene_frames = _model_inputs(batch, run.encoder, accelerator.device)
        if run.null_embeds is not None:
            prompt_embeds = drop_captions(prompt_embeds, batch["sample_seeds"], run.null_embeds, config.caption_dropout)
        diffusion = prepare_diffusion_batch(
            latent_mean, latent_std, scene_frames, batch["sample_seeds"], run.noise_scheduler, config.effective_cond_prob
        )
        loss = training_loss(run.transformer, diffusion, prompt_embeds, config.mask_variant, dtype=run.weight_dtype)
        gathered = accelerator.gather(loss.detach().reshape(1))
        inputs = (latent_mean, latent_std, prompt_embeds)
        probe = lambda: _probe_step(run, diffusion, prompt_embeds)  # noqa: E731
        if not torch.isfinite(gathered).all():
            _stop_on_non_finite(run, f"The loss became {gathered.tolist()}", batch, inputs, probe)
        accelerator.backward(loss)
        grad_norm, checked = _clip_gradients(run)
        if checked and not _is_finite(grad_norm):
            _stop_on_non_finite(run, f"The gradient norm became {float(grad_norm)}", batch, inputs, probe)
        if accelerator.sync_gradients:
            run.confirm_checkpoint()  # a whole step from the newest checkpoint's weights was finite
        _apply_update(run)
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
        _check_weights_finite(run, f"checkpoint-{progress.global_step}")  # never save or name non-finite weights
        run.confirm_checkpoint()
        run.unconfirmed_checkpoint = save_checkpoint(run.accelerator, config.output_dir, progress, config.checkpoints_total_limit)
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


def _is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out or lost a peer (gloo raises; NCCL's watchdog aborts)."""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", ())
    text = str(error)
    return (bool(backend_error) and isinstance(error, backend_error)) or any(
        marker in text for marker in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer")
    )


def _train_and_save(run: _Run, progress_bar: Any) -> str:
    """The epochs, then the final weights; a collective that times out becomes a `CollectiveTimeoutError`."""
    accelerator, config = run.accelerator, run.config
    try:
        try:
            _train_epochs(run, progress_bar)
        finally:
            progress_bar.close()
        accelerator.wait_for_everyone()
        _check_weights_finite(run, "the final weights")
        return save_final_weights(accelerator, run.transformer, config, run.weight_dtype)
    except NonFiniteLossError:
        raise
    except RuntimeError as error:
        if accelerator.num_processes == 1 or not _is_collective_failure(error):
            raise
        raise CollectiveTimeoutError(
            f"Process {accelerator.process_index} waited longer than `collective_timeout` ({config.collective_timeout} s) "
            f"for the other processes at step {run.progress.global_step + 1}, or one of them died "
            f"({str(error).strip().splitlines()[0][:200]}). {run.last_good()} Stop every process of the run, then "
            "resume with `resume_from_checkpoint: latest`."
        ) from error


def train(config: TrainingConfig) -> TrainingResult:
    """Run training as configured; returns where the final weights are (see :func:`save_final_weights`).

    Raises:
        ValueError: a bad option, model, data or output folder (before the first step), or a damaged checkpoint.
        NonFiniteLossError: the loss, gradient norm or weights became NaN/inf; no bad state was saved.
        DiskFullError: a save ran out of space; what was saved before is intact.
        CollectiveTimeoutError: a process of a multi-process run hung or died.
    """
    from tqdm.auto import tqdm

    run = _start(config)
    _resume(run)
    accelerator = run.accelerator
    progress_bar = tqdm(
        total=config.max_train_steps, initial=run.progress.global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    run.transformer.train()
    result = _train_and_save(run, progress_bar)
    if config.validation_prompts and (not config.validation_steps or config.max_train_steps % config.validation_steps):
        run_validation(accelerator, run.transformer, run.encoder, config, run.progress.global_step, run.weight_dtype)
    accelerator.end_training()
    logger.info(f"Training finished at step {run.progress.global_step}; weights in {result}")
    return TrainingResult(weights_path=result, global_step=run.progress.global_step, transformer=unwrap(accelerator, run.transformer))
