"""The Mask²DiT training loop on accelerate: LoRA or full fine-tuning, both stages, resumable checkpoints.

Layout of ``output_dir``::

    checkpoint-<step>/                  accelerate state (optimizer, scheduler, RNG) + trainable weights + progress
    validation/step-<step>/             mp4 and contact sheet per validation prompt
    logs/                               tensorboard
    pytorch_lora_weights.safetensors    (lora) diffusers LoRA with adapter metadata: `pipe.load_lora_weights(output_dir)`
    transformer/                        (full) the fine-tuned transformer, safetensors
    README.md                           model card

Checkpoints are written to a hidden temporary folder and renamed when complete, so a crash never leaves a
half-written ``checkpoint-<step>``; resuming restores weights, optimizer, LR schedule, RNG and data position,
so an interrupted run continues exactly as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from .config import TrainingConfig
from .data import EpochShuffleSampler, MultiSceneDataset, VideoSource, collate_scenes, load_training_records
from .loss import drop_captions, loss_summary, prepare_diffusion_batch, training_loss
from .precompute import WEIGHT_DTYPES, SceneEncoder, load_encoders, load_null_prompt, open_cache

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PROGRESS_NAME = "training_progress.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_FOLDER = "transformer"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


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
class TrainingProgress:
    """Where a run is: optimizer steps done and how far into the current epoch's sample order.

    ``samples_in_epoch`` counts samples of the global batch order already used in ``epoch``, which stays
    meaningful when a run is resumed with another number of processes of the same global batch.
    """

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, PROGRESS_NAME), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(self), handle, indent=1)

    @classmethod
    def load(cls, folder: str) -> "TrainingProgress":
        path = os.path.join(folder, PROGRESS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"`resume_from_checkpoint` {folder} is not a Mask²DiT training checkpoint (no {PROGRESS_NAME}).")
        with open(path, encoding="utf-8") as handle:
            return cls(**json.load(handle))


# ------------------------------------------------------------------------------------------------
# Checkpoint folders
# ------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, PROGRESS_NAME)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_resume_checkpoint(config: TrainingConfig) -> Optional[str]:
    """The checkpoint folder to resume from: None (fresh start), the latest in ``output_dir``, or a given path."""
    choice = config.resume_from_checkpoint
    if not choice:
        return None
    if choice == "latest":
        checkpoints = list_checkpoints(config.output_dir)
        if not checkpoints:
            logger.info(f"No checkpoint in {config.output_dir}; starting a new run.")
            return None
        return checkpoints[-1][1]
    path = choice if os.path.isdir(choice) else os.path.join(config.output_dir, choice)
    if not os.path.isfile(os.path.join(path, PROGRESS_NAME)):
        raise ValueError(
            f"`resume_from_checkpoint` must be \"latest\" or a checkpoint folder; {choice!r} is not a complete checkpoint."
        )
    return path


def save_checkpoint(accelerator: Any, output_dir: str, progress: TrainingProgress, total_limit: Optional[int]) -> str:
    """Save the full training state to ``output_dir/checkpoint-<step>`` atomically; keep the newest ``total_limit``.

    Every process must call this (optimizer and RNG states are per process; DeepSpeed shards them).
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{progress.global_step}")
    staging = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{progress.global_step}")
    if accelerator.is_main_process:
        for name in os.listdir(output_dir):  # leftovers of saves that a crash interrupted
            if name.startswith(f".tmp-{CHECKPOINT_PREFIX}"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress.save(staging)  # written last: its presence marks a complete checkpoint
        _replace_folder(staging, final)  # the same step may have been saved before (e.g. by a resumed run)
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(path, ignore_errors=True)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------
# Models
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


def _unwrap(accelerator: Any, model: Any) -> Any:
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)  # torch.compile


def _register_checkpoint_hooks(accelerator: Any, transformer: Any, config: TrainingConfig) -> None:
    """LoRA checkpoints hold only the adapters (in diffusers format) instead of the whole frozen transformer."""
    if config.finetune != "lora":
        return  # accelerate saves and loads the full weights itself (safetensors)
    from diffusers import CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    target_type = type(_unwrap(accelerator, transformer))

    def save_hook(models: List[Any], weights: List[Any], output_dir: str) -> None:
        if not weights:  # DeepSpeed / FSDP save the model state themselves
            return
        for index in reversed(range(len(models))):
            model = _unwrap(accelerator, models[index])
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
            model = _unwrap(accelerator, models[index])
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


# ------------------------------------------------------------------------------------------------
# Final outputs
# ------------------------------------------------------------------------------------------------


def _replace_folder(staging: str, final: str) -> None:
    """Move a complete ``staging`` folder to ``final``; an existing ``final`` is swapped out, then dropped."""
    if os.path.exists(final):
        retired = final + ".old"
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final, retired)
        os.rename(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, final)


def save_final_weights(accelerator: Any, transformer: Any, config: TrainingConfig, weight_dtype: torch.dtype) -> str:
    """Write the trained weights (LoRA in diffusers format, or a transformer folder) and the model card.

    Every process must call this (ZeRO-3 and FSDP gather the weights collectively). Returns the path that
    loads them: ``output_dir`` for LoRA (``pipe.load_lora_weights``), ``output_dir/transformer`` for full.
    """
    state_dict = accelerator.get_state_dict(transformer)  # gathers sharded weights onto the main process
    model = _unwrap(accelerator, transformer)
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
        _replace_folder(staging, result)
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


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def run_validation(
    accelerator: Any, transformer: Any, encoder: Optional[SceneEncoder], config: TrainingConfig, step: int, weight_dtype: torch.dtype
) -> List[str]:
    """Render ``config.validation_prompts`` with the current weights; returns the written mp4 paths (main process)."""
    from accelerate.utils import DistributedType

    if not config.validation_prompts:
        return []
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3
    )
    if sharded:
        logger.warning("Validation is skipped under ZeRO-3 / FSDP: the weights are sharded across processes.")
        return []
    written: List[str] = []
    if accelerator.is_main_process:
        from .. import Mask2DiTPipeline
        from ..video_io import contact_sheet, write_video

        import diffusers

        model = _unwrap(accelerator, transformer)
        # Sample with the scheduler the model folder ships (what users of the result will use).
        scheduler_config = diffusers.CogVideoXDDIMScheduler.load_config(config.pretrained_model_name_or_path, subfolder="scheduler")
        scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), diffusers.CogVideoXDDIMScheduler)
        # Training from a cache keeps no VAE or T5 in memory: load them for the duration of validation only.
        encoders = encoder or load_encoders(config, accelerator.device, weight_dtype)
        pipe = Mask2DiTPipeline(
            tokenizer=encoders.tokenizer,
            text_encoder=encoders.text_encoder,
            vae=encoders.vae,
            transformer=model,
            scheduler=scheduler_class.from_config(scheduler_config),
        )
        pipe.set_progress_bar_config(disable=True)
        was_training = model.training
        model.eval()
        folder = os.path.join(config.output_dir, "validation", f"step-{step:06d}")
        os.makedirs(folder, exist_ok=True)
        images = {}
        try:
            for index, prompt in enumerate(config.validation_prompts):
                generator = torch.Generator(device="cpu").manual_seed(config.seed + index)
                with torch.no_grad(), accelerator.autocast():
                    output = pipe(
                        prompt=list(prompt),
                        height=config.height,
                        width=config.width,
                        num_frames=config.scene_frames,
                        num_inference_steps=config.validation_num_inference_steps,
                        guidance_scale=config.validation_guidance_scale,
                        generator=generator,
                        output_type="np",
                        attention_kwargs={"scene_mask": config.mask_variant},
                    )
                video_path = write_video(output.frames[0], os.path.join(folder, f"prompt-{index}.mp4"), fps=config.validation_fps)
                sheet_path = contact_sheet(output.scene_frames[0], os.path.join(folder, f"prompt-{index}.png"))
                written.append(video_path)
                import numpy as np
                from PIL import Image

                images[f"validation/prompt-{index}"] = np.asarray(Image.open(sheet_path))[None]
        finally:
            model.train(was_training)
            del pipe, encoders
        if config.report_to == "tensorboard":
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images(images, step=step, dataformats="NHWC")
        logger.info(f"Validation videos of step {step} written to {folder}")
    accelerator.wait_for_everyone()
    return written


# ------------------------------------------------------------------------------------------------
# The run
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


def _hparams(config: TrainingConfig) -> Dict[str, Any]:
    """Config values tensorboard accepts as hyper-parameters (numbers and strings)."""
    values = {}
    for key, value in config.to_dict().items():
        values[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return values


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


def train(config: TrainingConfig) -> TrainingResult:
    """Run training as configured; returns where the final weights are (see :func:`save_final_weights`).

    Raises:
        NonFiniteLossError: the loss or gradient norm became NaN/inf; the last checkpoint is left untouched.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers import CogVideoXDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    config.require_model()
    os.makedirs(config.output_dir, exist_ok=True)
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
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # accelerate falls back to independent single-process runs on CPU-only machines unless told to use CPU.
        raise ValueError(
            f"Launched as {launched} processes but accelerate runs {accelerator.num_processes}; on a machine without "
            "GPUs set ACCELERATE_USE_CPU=true for multi-process (gloo) training."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(config.seed)  # global RNGs (LoRA dropout); sample randomness has its own seeds
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]

    # Data
    dataset, sampler, dataloader = build_dataloader(config, accelerator.num_processes, accelerator.is_main_process)

    # Models
    transformer = load_transformer(config)
    noise_scheduler = CogVideoXDPMScheduler.from_pretrained(config.pretrained_model_name_or_path, subfolder="scheduler")
    encoder = None
    if not config.cache_dir:
        encoder = load_encoders(config, accelerator.device, weight_dtype)
    null_embeds = None
    if config.caption_dropout > 0:
        null_embeds = load_null_prompt(config.cache_dir) if config.cache_dir else encoder.encode_prompts([""])[0]
    trainable = setup_finetuning(transformer, config, weight_dtype)
    transformer.to(accelerator.device)
    optimizer = build_optimizer(trainable, config)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        apply_deepspeed_gradient_clipping(accelerator.state.deepspeed_plugin.deepspeed_config, config.max_grad_norm)
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader, lr_scheduler)
    _register_checkpoint_hooks(accelerator, transformer, config)
    if accelerator.is_main_process and report_to != "none":
        accelerator.init_trackers("mask2dit", config=_hparams(config))

    # Resume
    progress = TrainingProgress()
    resume_path = resolve_resume_checkpoint(config)
    if resume_path:
        accelerator.load_state(resume_path)
        progress = TrainingProgress.load(resume_path)
        logger.info(f"Resumed from {resume_path} at step {progress.global_step}")
    last_checkpoint = resume_path

    global_batch = config.train_batch_size * accelerator.num_processes
    if progress.samples_in_epoch % global_batch:
        raise ValueError(
            f"The checkpoint stopped {progress.samples_in_epoch} samples into an epoch, which is not a whole number of "
            f"global batches of {global_batch}; resume with the same `train_batch_size` x number of processes."
        )
    logger.info(
        f"{len(dataset)} samples, {len(dataloader)} batches per process per epoch, global batch {global_batch} x "
        f"{config.gradient_accumulation_steps} accumulation, {config.max_train_steps} steps, finetune={config.finetune}, "
        f"stage={config.stage}, trainable parameters {sum(p.numel() for p in trainable):,}"
    )
    progress_bar = tqdm(
        total=config.max_train_steps, initial=progress.global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    transformer.train()
    # DeepSpeed and fp16 loss scaling handle overflowing gradients themselves (they skip the step).
    checks_grad_norm = accelerator.distributed_type != DistributedType.DEEPSPEED and accelerator.scaler is None
    skipped_total = 0
    step_losses: List[float] = []
    step_started = time.perf_counter()
    try:
        while progress.global_step < config.max_train_steps:
            sampler.start_epoch(progress.epoch)
            dataset.start_epoch(progress.epoch)
            skip_batches = progress.samples_in_epoch // global_batch
            epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
            for batch in epoch_loader:
                if batch["skipped"]:
                    skipped_total += len(batch["skipped"])
                    logger.warning(
                        f"Skipped {len(batch['skipped'])} sample(s) that could not be loaded, each replaced by the next "
                        f"sample ({skipped_total} so far on process {accelerator.process_index}): {batch['skipped'][0]}"
                    )
                with accelerator.accumulate(transformer):
                    latent_mean, latent_std, prompt_embeds, scene_frames = _model_inputs(batch, encoder, accelerator.device)
                    if null_embeds is not None:
                        prompt_embeds = drop_captions(prompt_embeds, batch["sample_seeds"], null_embeds, config.caption_dropout)
                    diffusion = prepare_diffusion_batch(
                        latent_mean, latent_std, scene_frames, batch["sample_seeds"], noise_scheduler, config.effective_cond_prob
                    )
                    loss = training_loss(transformer, diffusion, prompt_embeds, config.mask_variant, dtype=weight_dtype)
                    gathered = accelerator.gather(loss.detach().reshape(1))
                    if not torch.isfinite(gathered).all():
                        raise NonFiniteLossError(
                            f"The loss became {gathered.tolist()} at step {progress.global_step + 1} (epoch {progress.epoch}); "
                            "training stopped without saving. "
                            + (f"The last good checkpoint is {last_checkpoint}." if last_checkpoint else "No checkpoint was written yet.")
                            + " Resume from it with a lower learning rate, or check the data."
                        )
                    step_losses.append(float(gathered.mean()))
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        # All of the prepared model's parameters: FSDP only clips when given exactly those.
                        grad_norm = accelerator.clip_grad_norm_(transformer.parameters(), config.max_grad_norm)
                        if (
                            checks_grad_norm
                            and grad_norm is not None
                            and not torch.isfinite(torch.as_tensor(grad_norm)).all()
                        ):
                            raise NonFiniteLossError(
                                f"The gradient norm became {float(grad_norm)} at step {progress.global_step + 1}; training "
                                "stopped before applying it. "
                                + (f"The last good checkpoint is {last_checkpoint}." if last_checkpoint else "No checkpoint was written yet.")
                            )
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                progress.samples_in_epoch += global_batch
                if not accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                if progress.samples_in_epoch >= len(dataloader) * global_batch:
                    progress.epoch += 1
                    progress.samples_in_epoch = 0
                logs = {"loss": sum(step_losses) / len(step_losses), "lr": lr_scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                logs.update(loss_summary(diffusion))
                logs["step_time"] = time.perf_counter() - step_started
                step_losses, step_started = [], time.perf_counter()
                progress_bar.update(1)
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=progress.global_step)

                if config.checkpointing_steps and progress.global_step % config.checkpointing_steps == 0:
                    last_checkpoint = save_checkpoint(accelerator, config.output_dir, progress, config.checkpoints_total_limit)
                if config.validation_prompts and config.validation_steps and progress.global_step % config.validation_steps == 0:
                    run_validation(accelerator, transformer, encoder, config, progress.global_step, weight_dtype)
                if progress.global_step >= config.max_train_steps:
                    break
            if progress.samples_in_epoch and progress.global_step < config.max_train_steps:
                progress.epoch += 1  # the loader ran out without a step at its end (it syncs there, so rarely)
                progress.samples_in_epoch = 0
    finally:
        progress_bar.close()

    accelerator.wait_for_everyone()
    result = save_final_weights(accelerator, transformer, config, weight_dtype)
    if config.validation_prompts and (not config.validation_steps or config.max_train_steps % config.validation_steps):
        run_validation(accelerator, transformer, encoder, config, progress.global_step, weight_dtype)
    accelerator.end_training()
    logger.info(f"Training finished at step {progress.global_step}; weights in {result}")
    return TrainingResult(weights_path=result, global_step=progress.global_step, transformer=_unwrap(accelerator, transformer))
