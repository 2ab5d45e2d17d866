"""``mask2dit hub build``: a folder ready to upload to the Hugging Face Hub.

What goes in, by kind (detected from the ``--model`` folder, or forced with ``--kind``):

- ``pipeline``: a diffusers folder with ``model_index.json`` (saved by `Mask2DiTPipeline`, a CogVideoX
  folder, a full fine-tune saved as a pipeline, or the output of ``mask2dit convert-official``);
- ``official``: the authors' released layout (component folders, no ``model_index.json``): converted
  and verified on the way (see :mod:`.convert`);
- ``transformer``: a transformer folder alone (``config.json`` + weights, e.g. a full fine-tune from the
  trainer); the other components come from ``--base`` (a diffusers folder);
- ``lora``: a LoRA folder with ``pytorch_lora_weights.safetensors`` (diffusers format, from the trainer).

What comes out:

- pipeline kinds: ``model_index.json`` naming stock classes (``CogVideoXPipeline``,
  ``CogVideoXTransformer3DModel``: the folder loads without this package, and `Mask2DiTPipeline`
  converts the transformer in place), the component folders, the transformer config with the stock
  class name and ``attn_mask_variant``;
- lora kind: ``pytorch_lora_weights.safetensors``;
- always: ``pipeline.py`` (the package bundled into one file, see :mod:`.bundle`) so that
  ``DiffusionPipeline.from_pretrained(base, custom_pipeline=<repo>, trust_remote_code=True)`` works with
  diffusers + transformers + torch only, and ``README.md`` (the model card).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..layout import DEFAULT_MASK_VARIANT, check_mask_variant
from . import cards
from .bundle import bundle_pipeline
from .convert import (
    COMPONENTS,
    REPORT_NAME,
    STOCK_PIPELINE_CLASS,
    STOCK_TRANSFORMER,
    ConversionError,
    _copy_file,
    convert_official,
    normalise_transformer_config,
)

KINDS = ("auto", "pipeline", "official", "transformer", "lora")
CARD_CHOICES = ("auto", "mask2dit", "finetune", "lora")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PIPELINE_FILE = "pipeline.py"
CARD_FILE = "README.md"
_BUNDLE_HEADER = '"""Mask²DiT custom pipeline for diffusers'

# Training options that are safe and useful to publish (never local paths).
TRAINING_KEYS = (
    "stage", "finetune", "num_scenes", "frames_per_scene", "height", "width", "mask_variant", "cond_prob",
    "lora_rank", "lora_alpha", "lora_target_modules", "learning_rate", "lr_scheduler", "max_train_steps",
    "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "max_grad_norm", "seed",
)
TRAINING_FILES = ("training_config.json", "training_config.yaml", "training_config.yml", "mask2dit_training.json")


class BuildError(ValueError):
    """The input folder cannot be built into a Hub folder (the message says why and what to pass)."""


@dataclass
class BuildResult:
    out: Path
    kind: str
    card: str
    repo_id: str
    bundled_modules: List[str]
    files: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    conversion: Optional[Dict[str, Any]] = None

    def summary(self) -> str:
        lines = [
            f"Built a Hub folder for {self.repo_id} in {self.out} ({self.kind}; card: {self.card}).",
            f"  pipeline.py bundles: {', '.join(self.bundled_modules)}",
            f"  {len(self.files)} files: " + ", ".join(self.files[:8]) + (" ..." if len(self.files) > 8 else ""),
        ]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"Next: mask2dit hub push --folder {self.out} --repo {self.repo_id} --dry-run")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Detecting the input
# --------------------------------------------------------------------------------------------------


def _has_transformer_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*"))


def detect_kind(model: Path) -> str:
    """``pipeline``, ``official``, ``transformer`` or ``lora`` for the folder ``model``."""
    if (model / "model_index.json").is_file():
        return "pipeline"
    if (model / LORA_WEIGHTS).is_file():
        return "lora"
    if all((model / name).is_dir() for name in COMPONENTS):
        return "official"
    if _has_transformer_weights(model) or _has_transformer_weights(model / "transformer"):
        return "transformer"
    raise BuildError(
        f"Cannot tell what {model} holds: expected model_index.json (a diffusers pipeline), {LORA_WEIGHTS} (a LoRA), "
        f"the folders {list(COMPONENTS)} (the authors' release) or a transformer folder (config.json + weights)."
    )


def read_training_config(model: Path, path: Optional[os.PathLike | str] = None) -> Dict[str, Any]:
    """The publishable training options recorded beside the weights (``training_config.json``/``.yaml``), if any."""
    candidates = [Path(path)] if path else [model / name for name in TRAINING_FILES]
    for candidate in candidates:
        if not candidate.is_file():
            if path:
                raise BuildError(f"--training-config {candidate} does not exist.")
            continue
        text = candidate.read_text(encoding="utf-8")
        if candidate.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise BuildError(f"{candidate} must hold a mapping of training options.")
        return {key: data[key] for key in TRAINING_KEYS if data.get(key) not in (None, "", [])}
    return {}


def _training_details(training: Mapping[str, Any]) -> str:
    if not training:
        return "- Not recorded with the weights."
    return "\n".join(f"- `{key}`: {json.dumps(value) if not isinstance(value, str) else value}" for key, value in training.items())


# --------------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------------


def _is_previous_build(out: Path) -> bool:
    pipeline = out / PIPELINE_FILE
    if not pipeline.is_file():
        return False
    with open(pipeline, encoding="utf-8") as handle:
        return handle.read(len(_BUNDLE_HEADER)) == _BUNDLE_HEADER


def _prepare_out(model: Path, out: Path, overwrite: bool) -> None:
    if out == model or model in out.parents or out in model.parents:
        raise BuildError(f"--out {out} must not be --model {model}, inside it, or contain it.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise BuildError(f"--out {out} exists and is not empty; pass --overwrite to replace an earlier build.")
        if not _is_previous_build(out):
            raise BuildError(
                f"--overwrite refuses to delete {out}: it is not an earlier output of `mask2dit hub build` "
                "(no generated pipeline.py). Remove it yourself or choose another folder."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _copy_tree(src: Path, dst: Path, link: bool) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_dir():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(path, target, link)


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BuildError(f"Cannot read {path}: {error}") from None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _normalised_index(index: Mapping[str, Any], source: Path) -> Dict[str, Any]:
    """``model_index.json`` with the stock pipeline class and stock component classes."""
    out: Dict[str, Any] = {}
    for key, value in index.items():
        if key.startswith("_"):
            out[key] = value
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            out[key] = value
            continue
        library, class_name = value
        if library is None:
            out[key] = list(value)
            continue
        if key == "transformer":
            out[key] = list(STOCK_TRANSFORMER)
        elif library in ("diffusers", "transformers"):
            out[key] = [library, class_name]
        else:
            raise BuildError(
                f"{source}/model_index.json: component `{key}` is [{library!r}, {class_name!r}], a class outside "
                "diffusers/transformers that a Hub user could not load."
            )
    out["_class_name"] = STOCK_PIPELINE_CLASS
    return out


def _components(index: Mapping[str, Any]) -> List[str]:
    return [
        key for key, value in index.items()
        if not key.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None
    ]


def _copy_pipeline(model: Path, out: Path, link: bool, transformer_from: Optional[Path] = None) -> Dict[str, Any]:
    """Copy a diffusers pipeline folder's components, normalising model_index.json and the transformer config."""
    index = _read_json(model / "model_index.json")
    components = _components(index)
    if "transformer" not in components:
        raise BuildError(f"{model}/model_index.json has no transformer component.")
    for name in components:
        src = transformer_from if (name == "transformer" and transformer_from is not None) else model / name
        if not src.is_dir():
            raise BuildError(f"{model}/model_index.json lists `{name}` but {src} is not a folder.")
        _copy_tree(src, out / name, link)
    _write_json(out / "model_index.json", _normalised_index(index, model))
    config_path = out / "transformer" / "config.json"
    config, notes = normalise_transformer_config(_read_json(config_path))
    config_path.unlink()  # may be a hard link to the source: never write through it
    _write_json(config_path, config)
    return notes


def _check_transformer_fits(out: Path) -> None:
    """The fine-tuned transformer must fit the base's text encoder and VAE."""
    transformer = _read_json(out / "transformer" / "config.json")
    problems = []
    text_config = out / "text_encoder" / "config.json"
    if text_config.is_file():
        d_model = _read_json(text_config).get("d_model")
        if d_model is not None and transformer.get("text_embed_dim") not in (None, d_model):
            problems.append(f"text_embed_dim {transformer.get('text_embed_dim')} != text encoder d_model {d_model}")
    vae_config = out / "vae" / "config.json"
    if vae_config.is_file():
        latent = _read_json(vae_config).get("latent_channels")
        if latent is not None and transformer.get("in_channels") not in (None, latent):
            problems.append(f"in_channels {transformer.get('in_channels')} != VAE latent_channels {latent}")
    if problems:
        raise BuildError("The transformer does not fit the base model's components: " + "; ".join(problems) + ".")


def _check_lora_file(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if not keys:
        raise BuildError(f"{path} holds no tensors.")
    foreign = [k for k in keys if not k.startswith("transformer.")]
    if foreign:
        raise BuildError(
            f"{path} is not a diffusers-format CogVideoX LoRA: keys must start with 'transformer.', e.g. not {foreign[0]!r}."
        )
    return len(keys)


# --------------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------------


def model_card(
    card: str,
    *,
    repo_id: str,
    base_model: Optional[str] = None,
    kind: str = "lora",
    mask_variant: str = "v2",
    mask_variant_known: bool = True,
    training: Optional[Mapping[str, Any]] = None,
    license: Optional[str] = None,
    license_name: Optional[str] = None,
    license_link: Optional[str] = None,
    title: Optional[str] = None,
) -> str:
    """Render a model card. ``card``: ``"mask2dit"`` (the converted release), ``"lora"``/``"finetune"`` (the
    template for the trainer's outputs) or a path to a template. The trainer can call this directly.

    Args:
        repo_id: the Hub repository the folder goes to (used in the snippets).
        base_model: Hub id of the model that was fine-tuned (templates only; decides the licence when known).
        kind: ``"lora"`` or ``"full"`` (which sections of the template to keep).
        mask_variant: the attention mask the weights were trained with.
        mask_variant_known: False when ``mask_variant`` is only the default (the card then says so).
        training: publishable training options (see :data:`TRAINING_KEYS`).
    """
    import diffusers

    from .. import __version__

    template_path = cards.find_card(card)
    template = template_path.read_text(encoding="utf-8")
    values: Dict[str, Any] = {
        "repo_id": repo_id,
        "package_version": __version__,
        "diffusers_version": diffusers.__version__,
        "mask_variant": mask_variant,
        "mask_variant_note": "" if mask_variant_known else " (assumed: the package default, not recorded with the weights)",
    }
    sections = {"lora": kind == "lora", "full": kind != "lora"}
    if {"base_model", "license_yaml"} & set(cards.placeholders(template)):
        if not base_model:
            raise BuildError(
                "The card needs --base-model: the Hub id of the model these weights were trained from "
                "(e.g. THUDM/CogVideoX-5b)."
            )
        if os.path.exists(base_model) or base_model.startswith(("/", ".", "~")):
            raise BuildError(f"--base-model must be a Hub id (owner/name), not a local path: {base_model!r}.")
        fields = cards.license_fields(base_model, license, license_name, license_link)
        values.update(
            base_model=base_model,
            base_model_relation="adapter" if kind == "lora" else "finetune",
            license_yaml=cards.license_yaml(fields),
            license_sentence=cards.license_sentence(fields),
            title=title or repo_id.split("/")[-1],
            training_details=_training_details(training or {}),
        )
    text = cards.render(template, values, sections)
    cards.front_matter(text)
    return text


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def build_hub_folder(
    model: os.PathLike | str,
    out: os.PathLike | str,
    *,
    kind: str = "auto",
    repo_id: Optional[str] = None,
    base: Optional[os.PathLike | str] = None,
    base_model: Optional[str] = None,
    card: str = "auto",
    license: Optional[str] = None,
    license_name: Optional[str] = None,
    license_link: Optional[str] = None,
    title: Optional[str] = None,
    training_config: Optional[os.PathLike | str] = None,
    mask_variant: Optional[str] = None,
    overwrite: bool = False,
    link: bool = False,
    verify: str = "load",
) -> BuildResult:
    """Write a Hub-ready folder to ``out`` from ``model`` (see the module doc for the kinds).

    Args:
        repo_id: the target repository; the card's snippets use it (default ``your-name/<out folder name>``).
        base: for ``kind="transformer"``, the diffusers folder that provides the other components.
        base_model: Hub id of the model that was fine-tuned (cards of fine-tunes and LoRAs).
        card: ``"auto"`` (``mask2dit`` for the converted release, else the template), a card name or a path.
        mask_variant: for a LoRA, the scene mask it was trained with (default: from the training config, else
            the package default, which the card then marks as assumed). Pipelines take it from their config.
        link: hard-link weight files instead of copying them when possible.
        verify: for ``kind="official"``, how to verify the conversion (``load``, ``files``, ``none``).
    """
    model, out = Path(model).resolve(), Path(out).resolve()
    if not model.is_dir():
        raise BuildError(f"--model {model} is not a folder.")
    if kind not in KINDS:
        raise BuildError(f"--kind must be one of {list(KINDS)}, got {kind!r}.")
    kind = detect_kind(model) if kind == "auto" else kind
    if card not in CARD_CHOICES and not str(card).endswith(".md"):
        raise BuildError(f"--card must be one of {list(CARD_CHOICES)} or a path to a .md template, got {card!r}.")
    notes: List[str] = []
    if not repo_id:
        repo_id = f"your-name/{out.name}"
        notes.append(f"no --repo-id given: the card's snippets use {repo_id!r}; rebuild with --repo-id before pushing.")
    training = read_training_config(model, training_config)

    # 1. Everything that can fail on the arguments is checked before the output folder is touched.
    transformer_dir: Optional[Path] = None
    base_dir: Optional[Path] = None
    if kind in ("official", "pipeline"):
        config_path = model / "transformer" / "config.json"
    elif kind == "transformer":
        if base is None:
            raise BuildError(
                "A transformer folder alone needs --base: a diffusers folder (with model_index.json) that provides the "
                "tokenizer, text encoder, VAE and scheduler (run `mask2dit convert-official` first for the authors' layout)."
            )
        base_dir = Path(base).resolve()
        if not (base_dir / "model_index.json").is_file():
            raise BuildError(f"--base {base_dir} has no model_index.json (convert the authors' layout with convert-official).")
        transformer_dir = model / "transformer" if _has_transformer_weights(model / "transformer") else model
        config_path = transformer_dir / "config.json"
    elif kind == "lora":
        if not (model / LORA_WEIGHTS).is_file():
            raise BuildError(f"{model} has no {LORA_WEIGHTS} (the diffusers LoRA format the trainer writes).")
        lora_tensors = _check_lora_file(model / LORA_WEIGHTS)
        config_path = None
    else:  # pragma: no cover - guarded above
        raise BuildError(f"Unknown kind {kind!r}.")
    if config_path is not None and mask_variant is not None:
        raise BuildError("--mask-variant is for LoRA folders; a transformer's mask is read from its config.json.")
    if config_path is not None:
        if not config_path.is_file():
            raise BuildError(f"{config_path} is missing.")
        try:
            config_notes = normalise_transformer_config(_read_json(config_path))[1]
        except (ConversionError, ValueError) as error:
            raise BuildError(f"{config_path}: {error}") from None
        mask_variant = config_notes["attn_mask_variant"] if "not in the source" not in config_notes["mask_variant_from"] else None
    elif mask_variant is not None:
        mask_variant = check_mask_variant(mask_variant, "--mask-variant")
    else:
        mask_variant = training.get("mask_variant")
    mask_variant_known = mask_variant is not None
    mask_variant = check_mask_variant(mask_variant or DEFAULT_MASK_VARIANT, "mask_variant")
    card_kind = "lora" if kind == "lora" else "full"
    is_release = kind == "official" or (kind == "pipeline" and (model / REPORT_NAME).is_file())
    if card == "auto":
        card = "mask2dit" if is_release else ("lora" if card_kind == "lora" else "finetune")
    try:
        text = model_card(
            card,
            repo_id=repo_id,
            base_model=base_model,
            kind=card_kind,
            mask_variant=mask_variant,
            mask_variant_known=mask_variant_known,
            training=training,
            license=license,
            license_name=license_name,
            license_link=license_link,
            title=title,
        )
    except cards.CardError as error:
        raise BuildError(str(error)) from None
    bundle = bundle_pipeline()

    # 2. Write the folder.
    _prepare_out(model, out, overwrite)
    conversion: Optional[Dict[str, Any]] = None
    try:
        if kind == "official":
            report = convert_official(model, out, verify=verify, link=link)
            conversion = report.to_dict()
            notes.append(report.summary())
        elif kind == "pipeline":
            _copy_pipeline(model, out, link)
            if (model / REPORT_NAME).is_file():
                _copy_file(model / REPORT_NAME, out / REPORT_NAME, link=False)
                conversion = _read_json(model / REPORT_NAME)
        elif kind == "transformer":
            _copy_pipeline(base_dir, out, link, transformer_from=transformer_dir)
            _check_transformer_fits(out)
        else:
            _copy_file(model / LORA_WEIGHTS, out / LORA_WEIGHTS, link)
            notes.append(f"LoRA: {lora_tensors} tensors.")
    except (ConversionError, BuildError) as error:
        shutil.rmtree(out, ignore_errors=True)
        raise BuildError(str(error)) from None
    (out / CARD_FILE).write_text(text, encoding="utf-8")
    bundle.write(out / PIPELINE_FILE)

    if base_model and base_model.lower() == "qth/mask2dit" and card_kind == "lora":
        notes.append(
            "base model qth/Mask2DiT: its Hub repo has the authors' layout without model_index.json, which "
            "DiffusionPipeline.from_pretrained cannot load; point --base-model at a converted copy if you publish one."
        )
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return BuildResult(
        out=out, kind=kind, card=str(card), repo_id=repo_id, bundled_modules=bundle.modules, files=files,
        notes=notes, conversion=conversion,
    )
