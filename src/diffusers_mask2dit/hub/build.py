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
from typing import Any, Dict, List, Mapping, Optional, Tuple

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME  # diffusers' file name

from ..layout import DEFAULT_MASK_VARIANT, check_mask_variant
from ..paths import UnsafePathError, check_inside, files_under
from ..release_loading import GENERATION_DEFAULTS_FILE
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
    publishable_report,
)

KINDS = ("auto", "pipeline", "official", "transformer", "lora")
CARD_CHOICES = ("auto", "mask2dit", "finetune", "lora", "stock", "scratch")
PIPELINE_FILE = "pipeline.py"
CARD_FILE = "README.md"
_BUNDLE_HEADER = '"""Mask²DiT custom pipeline for diffusers'

# What a model folder may say about itself beside model_index.json, copied into the Hub folder as is: the prompt
# vocabulary of a closed-vocabulary model ({"template": "a {colour} ...", "slots": {"colour": [...], ...},
# "examples": [...]}, read by the Space app) and generation defaults (issue 21 makes folders carry them).
VOCABULARY_FILE = "prompt_vocabulary.json"
DEFAULTS_FILES = (GENERATION_DEFAULTS_FILE,)  # the sampling defaults a folder carries (release_loading)
FOLDER_EXTRAS = (VOCABULARY_FILE,) + DEFAULTS_FILES

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
    if (model / LORA_WEIGHT_NAME).is_file():
        return "lora"
    if all((model / name).is_dir() for name in COMPONENTS):
        return "official"
    if _has_transformer_weights(model) or _has_transformer_weights(model / "transformer"):
        return "transformer"
    raise BuildError(
        f"Cannot tell what {model} holds: expected model_index.json (a diffusers pipeline), {LORA_WEIGHT_NAME} (a LoRA), "
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
        if not path:  # found beside the weights: its values reach the card, so it must be the folder's own
            try:
                check_inside(candidate, model, "--model file")
            except UnsafePathError as error:
                raise BuildError(str(error)) from None
        text = candidate.read_text(encoding="utf-8")
        if candidate.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise BuildError(f"{candidate} must hold a mapping of training options.")
        return cards.publishable_training(data)
    return {}


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


def _copy_tree(src: Path, dst: Path, link: bool, root: Path) -> None:
    """Copy the files below ``src`` to ``dst``; a link that leads out of ``root`` is refused, naming it."""
    for path in files_under(src, f"{src.name}/ file", root=root):
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


def strip_load_paths(folder: os.PathLike | str) -> List[str]:
    """Drop ``_name_or_path`` from ``model_index.json`` and every ``<component>/config.json`` under ``folder``.

    diffusers and transformers save there the folder a model was loaded from: on a publisher's machine a local path,
    which must never reach the Hub (and loading does not read it). Returns the rewritten files, relative."""
    folder = Path(folder)
    rewritten = []
    for path in [folder / "model_index.json"] + sorted(folder.glob("*/config.json")):
        if not path.is_file():
            continue
        data = _read_json(path)
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            path.unlink()  # may be a hard link to the source: never write through it
            _write_json(path, data)
            rewritten.append(path.relative_to(folder).as_posix())
    return rewritten


def _components(index: Mapping[str, Any]) -> List[str]:
    return [
        key for key, value in index.items()
        if not key.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None
    ]


def _copy_pipeline(model: Path, out: Path, link: bool, transformer_from: Optional[Path] = None) -> Dict[str, Any]:
    """Copy a diffusers pipeline folder's components, normalising model_index.json and the transformer config."""
    index = _read_json(check_inside(model / "model_index.json", model, "--model file"))  # its values are published
    components = _components(index)
    if "transformer" not in components:
        raise BuildError(f"{model}/model_index.json has no transformer component.")
    for name in components:
        own = name == "transformer" and transformer_from is not None
        src = transformer_from if own else model / name
        if not src.is_dir():
            raise BuildError(f"{model}/model_index.json lists `{name}` but {src} is not a folder.")
        _copy_tree(src, out / name, link, root=src if own else model)
    _write_json(out / "model_index.json", _normalised_index(index, model))
    for name in FOLDER_EXTRAS:
        if (model / name).is_file():
            _copy_file(check_inside(model / name, model, "--model file"), out / name, False)
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
# Build
# --------------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """What the input folder holds, checked before anything is written."""

    kind: str
    mask_variant: str
    mask_variant_known: bool
    stock: bool = False  # a pipeline folder with unmodified CogVideoX weights (no scene mask recorded)
    transformer_dir: Optional[Path] = None
    base_dir: Optional[Path] = None
    lora_tensors: int = 0


def _transformer_source(model: Path, kind: str, base: Optional[os.PathLike | str]) -> Tuple[Optional[Path], Optional[Path]]:
    """``(transformer folder, base folder)`` of a ``transformer`` input; ``(None, None)`` for other kinds."""
    if kind != "transformer":
        return None, None
    if base is None:
        raise BuildError(
            "A transformer folder alone needs --base: a diffusers folder (with model_index.json) that provides the "
            "tokenizer, text encoder, VAE and scheduler (run `mask2dit convert-official` first for the authors' layout)."
        )
    base_dir = Path(base).resolve()
    if not (base_dir / "model_index.json").is_file():
        raise BuildError(f"--base {base_dir} has no model_index.json (convert the authors' layout with convert-official).")
    return (model / "transformer" if _has_transformer_weights(model / "transformer") else model), base_dir


def _check_inputs(model: Path, kind: str, base: Optional[os.PathLike | str], mask_variant: Optional[str],
                  training: Mapping[str, Any]) -> _Inputs:
    """Check the input folder of ``kind`` and find the scene mask its weights use."""
    transformer_dir, base_dir = _transformer_source(model, kind, base)
    lora_tensors, config_path = 0, None
    if kind in ("official", "pipeline"):
        config_path = model / "transformer" / "config.json"
    elif kind == "transformer":
        config_path = transformer_dir / "config.json"
    elif not (model / LORA_WEIGHT_NAME).is_file():
        raise BuildError(f"{model} has no {LORA_WEIGHT_NAME} (the diffusers LoRA format the trainer writes).")
    else:
        lora_tensors = _check_lora_file(check_inside(model / LORA_WEIGHT_NAME, model, "--model file"))
    if config_path is not None and mask_variant is not None:
        raise BuildError("--mask-variant is for LoRA folders; a transformer's mask is read from its config.json.")
    stock = False
    if config_path is not None:
        if not config_path.is_file():
            raise BuildError(f"{config_path} is missing.")
        try:
            config_notes = normalise_transformer_config(_read_json(config_path))[1]
        except (ConversionError, ValueError) as error:
            raise BuildError(f"{config_path}: {error}") from None
        recorded = "not in the source" not in config_notes["mask_variant_from"]
        mask_variant = config_notes["attn_mask_variant"] if recorded else None
        stock = kind == "pipeline" and not recorded and not training and not (model / REPORT_NAME).is_file()
    elif mask_variant is not None:
        mask_variant = check_mask_variant(mask_variant, "--mask-variant")
    else:
        mask_variant = training.get("mask_variant")
    return _Inputs(
        kind=kind, mask_variant=check_mask_variant(mask_variant or DEFAULT_MASK_VARIANT, "mask_variant"),
        mask_variant_known=mask_variant is not None, stock=stock, transformer_dir=transformer_dir, base_dir=base_dir,
        lora_tensors=lora_tensors,
    )


def _choose_card(card: str, inputs: _Inputs, model: Path) -> Tuple[str, str]:
    """``(card name or template path, card kind)`` for the input."""
    if card not in CARD_CHOICES and not str(card).endswith(".md"):
        raise BuildError(f"--card must be one of {list(CARD_CHOICES)} or a path to a .md template, got {card!r}.")
    if inputs.kind == "lora":
        card_kind = "lora"
    elif card == "stock" or (card == "auto" and inputs.stock):
        card_kind = "stock"
    elif card == "scratch":
        card_kind = "scratch"
    else:
        card_kind = "full"
    if card == "auto":
        is_release = inputs.kind == "official" or (inputs.kind == "pipeline" and (model / REPORT_NAME).is_file())
        card = "mask2dit" if is_release else {"lora": "lora", "full": "finetune", "stock": "stock"}[card_kind]
    return card, card_kind


def _write_weights(model: Path, out: Path, inputs: _Inputs, link: bool, verify: str, notes: List[str]) -> Optional[Dict[str, Any]]:
    """Copy or convert the weights into ``out``; returns the conversion report, if any."""
    if inputs.kind == "official":
        report = convert_official(model, out, verify=verify, link=link)
        notes.append(report.summary())
        return publishable_report(report.to_dict())
    if inputs.kind == "pipeline":
        _copy_pipeline(model, out, link)
        if (model / REPORT_NAME).is_file():
            conversion = publishable_report(_read_json(check_inside(model / REPORT_NAME, model, "--model file")))
            _write_json(out / REPORT_NAME, conversion)  # rewritten: never carry local paths to the Hub
            return conversion
    elif inputs.kind == "transformer":
        _copy_pipeline(inputs.base_dir, out, link, transformer_from=inputs.transformer_dir)
        _check_transformer_fits(out)
    else:
        _copy_file(check_inside(model / LORA_WEIGHT_NAME, model, "--model file"), out / LORA_WEIGHT_NAME, link)
        notes.append(f"LoRA: {inputs.lora_tensors} tensors.")
    return None


def _read_about(about: Optional[os.PathLike | str]) -> str:
    if about is None:
        return ""
    path = Path(about)
    if not path.is_file():
        raise BuildError(f"--about {path} is not a file (expected Markdown on the model and its measured results).")
    return path.read_text(encoding="utf-8")


def check_repo_id(repo_id: str, flag: str = "--repo-id") -> str:
    """``repo_id`` when it is a Hub id ``owner/name`` (the check ``mask2dit hub push`` makes)."""
    from .push import REPO_ID_PATTERN

    if not REPO_ID_PATTERN.match(repo_id or ""):
        raise BuildError(f"{flag} must be a Hub id `owner/name` (letters, digits, '-', '_', '.'), got {repo_id!r}.")
    return repo_id


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
    about: Optional[os.PathLike | str] = None,
) -> BuildResult:
    """Write a Hub-ready folder to ``out`` from ``model`` (see the module doc for the kinds).

    Args:
        repo_id: the target repository; the card's snippets use it (default ``your-name/<out folder name>``).
        base: for ``kind="transformer"``, the diffusers folder that provides the other components.
        base_model: Hub id of the model that was fine-tuned (cards of fine-tunes and LoRAs).
        card: ``"auto"`` (``mask2dit`` for the converted release, ``stock`` for a folder of unmodified
            CogVideoX weights, else the template for fine-tunes and LoRAs), a card name or a path.
        mask_variant: for a LoRA, the scene mask it was trained with (default: from the training config, else
            the package default, which the card then marks as assumed). Pipelines take it from their config.
        link: hard-link weight files instead of copying them when possible.
        verify: for ``kind="official"``, how to verify the conversion (``load``, ``files``, ``none``).
        about: ``--card scratch``: a Markdown file on what the model is and how it measured, put into the card.
    """
    model, out = Path(model).resolve(), Path(out).resolve()
    if not model.is_dir():
        raise BuildError(f"--model {model} is not a folder.")
    if kind not in KINDS:
        raise BuildError(f"--kind must be one of {list(KINDS)}, got {kind!r}.")
    notes: List[str] = []
    if repo_id:
        check_repo_id(repo_id)
    else:
        repo_id = f"your-name/{out.name}"
        notes.append(f"no --repo-id given: the card's snippets use {repo_id!r}; rebuild with --repo-id before pushing.")

    # 1. Everything that can fail on the arguments is checked before the output folder is touched.
    training = read_training_config(model, training_config)
    try:
        inputs = _check_inputs(model, detect_kind(model) if kind == "auto" else kind, base, mask_variant, training)
    except UnsafePathError as error:
        raise BuildError(str(error)) from None
    card, card_kind = _choose_card(card, inputs, model)
    if about is not None and card_kind != "scratch":
        raise BuildError("--about is for --card scratch (a model trained from scratch); other cards describe their base model.")
    if card == "stock" and inputs.stock:
        notes.append("card: stock (no scene mask or training options recorded: unmodified CogVideoX weights); "
                     "pass --card finetune for a fine-tune made with other tools.")
    try:
        text = cards.model_card(
            card, repo_id=repo_id, base_model=base_model, kind=card_kind, mask_variant=inputs.mask_variant,
            mask_variant_known=inputs.mask_variant_known, training=training, license=license,
            license_name=license_name, license_link=license_link, title=title, about=_read_about(about),
        )
    except cards.CardError as error:
        raise BuildError(str(error)) from None
    bundle = bundle_pipeline()

    # 2. Write the folder.
    _prepare_out(model, out, overwrite)
    try:
        conversion = _write_weights(model, out, inputs, link, verify, notes)
        strip_load_paths(out)
    except (ConversionError, BuildError, UnsafePathError) as error:
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
        out=out, kind=inputs.kind, card=str(card), repo_id=repo_id, bundled_modules=bundle.modules, files=files,
        notes=notes, conversion=conversion,
    )
