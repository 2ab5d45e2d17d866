"""All training options in one dataclass, read from a config file (YAML, JSON or TOML) and command-line flags.

Precedence: dataclass defaults < ``--config`` file < flags given on the command line. The same options drive
``mask2dit train``, ``mask2dit precompute`` and ``examples/train_mask2dit_lora.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..layout import check_mask_variant

STAGES = ("pretrain", "sft")
FINETUNE_MODES = ("lora", "full")
MIXED_PRECISION = ("no", "bf16", "fp16")
REPORT_TO = ("tensorboard", "none")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
# CogVideoX attention projections, the targets diffusers' CogVideoX LoRA training uses.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Learning rates used when `learning_rate` is not set: the paper's 1e-5 for full fine-tuning; LoRA needs more.
DEFAULT_LEARNING_RATE = {"lora": 1e-4, "full": 1e-5}
# Frames per scene must be 8N+1 (CogVideoX: 4x temporal compression with an odd first frame; 1.5 pairs frames).
FRAME_MULTIPLE = 8
# Pixel sizes must be multiples of 16: 8x VAE downsampling, then 2x2 patches.
PIXEL_MULTIPLE = 16
# Multi-scene prompts on the command line: scenes of one prompt separated by this character.
SCENE_SEPARATOR = "|"
# `collective_timeout` ceiling (30 days): the process group stores it as a timedelta, which overflows far beyond.
MAX_COLLECTIVE_TIMEOUT = 30 * 24 * 3600

# Options whose accepted words YAML reads as booleans when unquoted (`mixed_precision: no`).
_YAML_BOOLEAN_WORDS = {"mixed_precision": {False: "no", True: "yes"}}

_BOOL_TRUE = ("1", "true", "yes", "on", "y", "t")
_BOOL_FALSE = ("0", "false", "no", "off", "n", "f")


def parse_bool(value: Any, name: str = "value") -> bool:
    """``True``/``False`` from a bool or a string such as "true", "False", "1", "no" (never Python's truthiness)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _BOOL_TRUE:
            return True
        if key in _BOOL_FALSE:
            return False
    raise ValueError(f"`{name}` must be a boolean (true/false, yes/no, 1/0), got {value!r}.")


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: list(default) if isinstance(default, list) else dict(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainingConfig:
    """Options of a Mask²DiT training run (both stages, LoRA or full fine-tuning) and of ``precompute``."""

    # ---- model
    pretrained_model_name_or_path: str = _opt("", "CogVideoX(-5b/-2b/-1.5) or Mask²DiT model: a Hub id (e.g. THUDM/CogVideoX-5b) or a local folder with transformer/, vae/, text_encoder/, tokenizer/, scheduler/.")
    transformer_path: Optional[str] = _opt(None, "Start from this transformer (a local folder or Hub id) instead of <pretrained>/transformer (e.g. a stage-1 full fine-tune).")
    mask_variant: str = _opt("v2", "Attention mask: v1, v2, v3 or full.")

    # ---- data
    stage: str = _opt("sft", "pretrain: n unrelated clips per sample, no conditional samples; sft: n consecutive shots, conditional samples.")
    data_file: Optional[str] = _opt(None, "Authors' pretraining CSV, SFT JSON, or JSONL (one clip per line for pretrain, {\"scenes\": [...]} for sft).")
    video_root: Optional[str] = _opt(None, "Folder that relative video paths start from (default: the data file's folder).")
    cache_dir: Optional[str] = _opt(None, "Folder of the `mask2dit precompute` cache; when set, training reads it instead of decoding videos.")
    num_scenes: int = _opt(3, "Scenes (segments) per training sample.")
    frames_per_scene: List[int] = _opt([49], "Pixel frames per scene, 8N+1: one value for all scenes or one per scene.")
    height: int = _opt(480, "Training height in pixels (multiple of 16).")
    width: int = _opt(720, "Training width in pixels (multiple of 16).")
    cond_prob: float = _opt(0.5, "sft: probability that a sample is conditional (first n-1 scenes clean at timestep 0, loss on the last).")
    caption_dropout: float = _opt(0.0, "Probability that all of a sample's prompts are replaced by the empty prompt (trains the unconditional model classifier-free guidance needs).")
    dataloader_num_workers: int = _opt(0, "DataLoader worker processes.")
    cache_dtype: str = _opt("bfloat16", "precompute: dtype of cached latents and prompt embeddings (float32, bfloat16, float16).")

    # ---- fine-tuning
    finetune: str = _opt("lora", "lora (peft adapters on the transformer) or full (all transformer weights).")
    lora_rank: int = _opt(128, "LoRA rank.")
    lora_alpha: float = _opt(128.0, "LoRA alpha (the update is scaled by alpha / rank).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA input.")
    lora_target_modules: List[str] = _opt(list(DEFAULT_LORA_TARGETS), "Module names that get LoRA adapters.")

    # ---- optimisation
    learning_rate: Optional[float] = _opt(None, "Peak learning rate (default 1e-4 for lora, 1e-5 for full as in the paper).")
    lr_scheduler: str = _opt("constant", f"Learning-rate schedule: {', '.join(LR_SCHEDULERS)}.")
    lr_warmup_steps: int = _opt(0, "Linear warmup steps (optimizer steps).")
    lr_num_cycles: int = _opt(1, "Cycles of cosine_with_restarts.")
    lr_power: float = _opt(1.0, "Power of the polynomial schedule.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.95, "AdamW beta2.")
    adam_weight_decay: float = _opt(1e-4, "AdamW weight decay.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _opt(False, "Use bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU).")
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    train_batch_size: int = _opt(1, "Samples per device per micro-batch.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    max_train_steps: int = _opt(10000, "Optimizer steps to train for.")
    mixed_precision: str = _opt("bf16", "no, bf16 or fp16.")
    gradient_checkpointing: bool = _opt(True, "Recompute transformer blocks in the backward pass to save memory.")
    allow_tf32: bool = _opt(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    seed: int = _opt(0, "Seed of data order, frame windows, timesteps, noise and conditional choices.")

    # ---- checkpoints and outputs
    output_dir: str = _opt("mask2dit-output", "Where checkpoints, logs, validation videos and the final weights go.")
    checkpointing_steps: int = _opt(500, "Save a resumable checkpoint every this many optimizer steps (0: only at the end).")
    checkpoints_total_limit: Optional[int] = _opt(3, "Keep at most this many checkpoints (oldest removed first; none: keep all).")
    resume_from_checkpoint: Optional[str] = _opt(None, "\"latest\" or a checkpoint folder to resume from.")
    collective_timeout: int = _opt(1800, f"Seconds a process waits for the others in a collective operation before the run stops with an error (a hung or dead process); at most {MAX_COLLECTIVE_TIMEOUT} (30 days).")

    # ---- validation
    validation_prompts: List[List[str]] = _opt([], f"Multi-scene prompts to render; on the command line scenes are separated by '{SCENE_SEPARATOR}'.")
    validation_steps: int = _opt(500, "Render the validation prompts every this many optimizer steps.")
    validation_num_inference_steps: int = _opt(50, "Sampling steps of validation videos.")
    validation_guidance_scale: float = _opt(6.0, "Classifier-free guidance of validation videos.")
    validation_fps: int = _opt(8, "Frame rate of validation mp4 files.")

    # ---- logging
    report_to: str = _opt("tensorboard", "tensorboard (when installed) or none.")
    logging_dir: str = _opt("logs", "Tracker folder, relative to output_dir.")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Normalise values and raise a ValueError naming the first bad option."""
        for item in dataclasses.fields(self):  # NaN passes every `<` / `>` check below, so refuse it first
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{item.name}` must be a finite number, got {value!r}.")
        _choice(self.stage, STAGES, "stage")
        _choice(self.finetune, FINETUNE_MODES, "finetune")
        _choice(self.mixed_precision, MIXED_PRECISION, "mixed_precision")
        _choice(self.report_to, REPORT_TO, "report_to")
        _choice(self.cache_dtype, CACHE_DTYPES, "cache_dtype")
        _choice(self.lr_scheduler, LR_SCHEDULERS, "lr_scheduler")
        self.mask_variant = check_mask_variant(self.mask_variant, "mask_variant")
        if self.num_scenes < 1:
            raise ValueError(f"`num_scenes` must be at least 1, got {self.num_scenes}.")
        if self.stage == "sft" and self.num_scenes < 2 and self.cond_prob > 0:
            raise ValueError("`cond_prob` > 0 needs `num_scenes` >= 2: a conditional sample has context scenes.")
        frames = list(self.frames_per_scene)
        if len(frames) not in (1, self.num_scenes):
            raise ValueError(
                f"`frames_per_scene` must be one value or one per scene ({self.num_scenes}), got {frames}."
            )
        for value in frames:
            if value < 1 or (value - 1) % FRAME_MULTIPLE:
                raise ValueError(f"`frames_per_scene` values must be 8N+1 (9, 17, 25, 33, 41, 49, ...), got {frames}.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < PIXEL_MULTIPLE or value % PIXEL_MULTIPLE:
                raise ValueError(f"`{name}` must be a positive multiple of {PIXEL_MULTIPLE}, got {value}.")
        if not 0.0 <= self.cond_prob <= 1.0:
            raise ValueError(f"`cond_prob` must be in [0, 1], got {self.cond_prob}.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"`caption_dropout` must be in [0, 1], got {self.caption_dropout}.")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lora_rank", "collective_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be 0 or more, got {getattr(self, name)}.")
        if self.collective_timeout > MAX_COLLECTIVE_TIMEOUT:
            raise ValueError(f"`collective_timeout` must be at most {MAX_COLLECTIVE_TIMEOUT} seconds (30 days), got {self.collective_timeout}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"`checkpoints_total_limit` must be at least 1 or none, got {self.checkpoints_total_limit}.")
        if self.max_grad_norm < 0:
            raise ValueError(f"`max_grad_norm` must be 0 (off) or positive, got {self.max_grad_norm}.")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be positive, got {self.lora_alpha}.")
        if not self.lora_target_modules:
            raise ValueError("`lora_target_modules` must name at least one module.")
        for index, prompt in enumerate(self.validation_prompts):
            if len(prompt) != self.num_scenes:
                raise ValueError(
                    f"`validation_prompts[{index}]` has {len(prompt)} scenes but `num_scenes` is {self.num_scenes}; "
                    f"separate scene prompts with '{SCENE_SEPARATOR}'."
                )

    # ------------------------------------------------------------------------------------------

    @property
    def scene_frames(self) -> List[int]:
        """Pixel frames of each of the ``num_scenes`` scenes."""
        frames = list(self.frames_per_scene)
        return frames * self.num_scenes if len(frames) == 1 else frames

    @property
    def effective_cond_prob(self) -> float:
        """Probability of a conditional sample: 0 in pretraining, ``cond_prob`` in SFT."""
        return self.cond_prob if self.stage == "sft" else 0.0

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.finetune]

    def require_model(self) -> None:
        """Check that a model is named: a local folder that exists, or a Hub id (loaded as diffusers does)."""
        from ..paths import check_model_reference

        if not self.pretrained_model_name_or_path:
            raise ValueError(
                "`pretrained_model_name_or_path` is required: a CogVideoX or Mask²DiT model, as a Hub id (e.g. "
                "THUDM/CogVideoX-5b) or a local folder."
            )
        check_model_reference(self.pretrained_model_name_or_path, "pretrained_model_name_or_path")
        if self.transformer_path:
            check_model_reference(self.transformer_path, "transformer_path")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "TrainingConfig":
        """Build from a mapping, converting strings and checking names; unknown keys raise a ValueError."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                raise ValueError(f"Unknown option `{key}` in {source}.{hint}")
            kwargs[key] = _coerce(value, hints[key], key)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str, overrides: Optional[Mapping[str, Any]] = None) -> "TrainingConfig":
        """Read a ``.yaml``/``.yml``, ``.json`` or ``.toml`` file; ``overrides`` win over the file."""
        values = dict(load_config_file(path))
        values.update(overrides or {})
        return cls.from_dict(values, source=path)


def _choice(value: str, accepted: Sequence[str], name: str) -> None:
    if value not in accepted:
        raise ValueError(f"`{name}` must be one of {list(accepted)}, got {value!r}.")


def load_config_file(path: str) -> Dict[str, Any]:
    """The mapping stored in a YAML, JSON or TOML config file."""
    if not os.path.isfile(path):
        raise ValueError(f"`--config` file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"`--config` file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}).") from None
    if extension not in (".yaml", ".yml", ".json", ".toml"):
        raise ValueError(f"`--config` must be a .yaml, .yml, .json or .toml file, got {path!r}.")
    values = _parse_config_text(raw.decode("utf-8-sig"), extension, path)  # "-sig": a byte-order mark is no error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"`--config` file {path} must hold a mapping of option names to values.")
    return values


def _parse_config_text(text: str, extension: str, path: str) -> Any:
    """The value a config file's text holds; a syntax error is a ValueError naming the file, line and column."""
    if extension == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"`--config` file {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}.") from None
    if extension == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:  # its message ends with "(at line L, column C)"
            raise ValueError(f"`--config` file {path} is not valid TOML: {error}.") from None
    try:
        import yaml
    except ImportError:
        raise ValueError("Reading a YAML config needs PyYAML (`pip install pyyaml`); or use a .json or .toml file.") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        hint = " (YAML does not allow tabs for indentation; use spaces)" if "'\\t'" in problem else ""
        raise ValueError(f"`--config` file {path} is not valid YAML: {problem}{where}{hint}.") from None


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` (from a file or the command line) converted to the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
        return _coerce(value, annotation, name)
    if origin in (list, List):
        (item_type,) = args
        if item_type is not str and typing.get_origin(item_type) in (list, List):
            # validation prompts: each a list of scene prompts, or one string with scenes separated by '|'
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_scene_prompts(item, name) for item in items]
        if isinstance(value, str):
            value = [value] if item_type is str else value.replace(",", " ").split()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list, got {value!r}.")
        return [_coerce(item, item_type, name) for item in value]
    if annotation is bool:
        return parse_bool(value, name)
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"`{name}` must be a number, got {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
        if not math.isfinite(number):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        return number
    if annotation is str:
        if isinstance(value, bool) and name in _YAML_BOOLEAN_WORDS:
            return _YAML_BOOLEAN_WORDS[name][value]  # YAML 1.1 reads an unquoted `no` as false
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"`{name}` must be a string, got {value!r}.")
        return str(value)
    return value


def _scene_prompts(item: Any, name: str) -> List[str]:
    if isinstance(item, str):
        scenes = [part.strip() for part in item.split(SCENE_SEPARATOR)]
    elif isinstance(item, (list, tuple)) and all(isinstance(part, str) for part in item):
        scenes = [part.strip() for part in item]
    else:
        raise ValueError(f"`{name}` entries must be a list of scene prompts or one string with '{SCENE_SEPARATOR}' between scenes, got {item!r}.")
    if not scenes or any(not scene for scene in scenes):
        raise ValueError(f"`{name}` entry {item!r} has an empty scene prompt.")
    return scenes


# ------------------------------------------------------------------------------------------------
# Command-line flags generated from the dataclass, so every option has exactly one definition.
# ------------------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Optional[Mapping[str, Any]] = None) -> None:
    """Add ``--config`` and one ``--<option>`` flag per `TrainingConfig` field to ``parser`` (``--cond-prob``, with
    ``--cond_prob`` as an alias).

    Flags not given on the command line are left out of the parsed namespace (``argparse.SUPPRESS``), so
    a config file's values are only overridden by flags the user actually typed. ``defaults`` replaces
    dataclass defaults for this entry point (e.g. ``finetune="lora"`` in the LoRA example script).
    """
    parser.add_argument("--config", default=None, help="YAML, JSON or TOML file of options; flags override it.")
    hints = typing.get_type_hints(TrainingConfig)
    group = parser.add_argument_group("training options")
    for item in dataclasses.fields(TrainingConfig):
        annotation = hints[item.name]
        origin = typing.get_origin(annotation)
        base = annotation
        if origin is typing.Union:
            base = next(a for a in typing.get_args(annotation) if a is not type(None))
        kwargs: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": item.metadata.get("help", "")}
        if typing.get_origin(base) in (list, List):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "VALUE"
        elif base is bool:
            kwargs["metavar"] = "{true,false}"
        else:
            kwargs["metavar"] = item.name.upper()
        # Dashed flags as every other command has them; the underscore spelling stays an alias.
        flags = [f"--{item.name.replace('_', '-')}"] + ([f"--{item.name}"] if "_" in item.name else [])
        group.add_argument(*flags, dest=item.name, **kwargs)
    parser.set_defaults(_config_defaults=dict(defaults or {}))


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """`TrainingConfig` from a namespace parsed with :func:`add_config_arguments`."""
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    values: Dict[str, Any] = dict(getattr(args, "_config_defaults", {}) or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    values.update({key: value for key, value in vars(args).items() if key in names})
    return TrainingConfig.from_dict(values, source=getattr(args, "config", None) or "command line")
