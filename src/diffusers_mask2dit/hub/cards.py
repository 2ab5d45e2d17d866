"""Model cards: find the templates in ``hub_cards/``, fill their placeholders, check the YAML front matter.

Template syntax (deliberately tiny):

- ``{{name}}`` is replaced by a value; every placeholder must get one (an unfilled one is an error);
- ``{{#section}} ... {{/section}}`` keeps its content when ``section`` is on, drops it otherwise (no nesting).

The cards' Python snippets are executed by ``tests/test_docs_snippets.py`` against tiny local models.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

CARD_FILES = {
    "mask2dit": "mask2dit-cogvideox-5b.md",  # the authors' checkpoint, converted (CogVideoX-5b base)
    "lora": "lora-template.md",  # LoRA adapters and full fine-tunes made with `mask2dit train`
    "finetune": "lora-template.md",
    "stock": "lora-template.md",  # unmodified CogVideoX weights published with the Mask²DiT pipeline
    "scratch": "scratch-template.md",  # a model trained from scratch (e.g. the Shapes model): no base model
}
# Kinds of weights a card describes (the template's sections follow from them).
CARD_KINDS = ("lora", "full", "stock", "scratch")
TEMPLATE_SECTIONS = ("hub", "local", "lora", "full", "finetune", "stock")

# Training options that are safe and useful to publish (never local paths).
TRAINING_KEYS = (
    "stage", "finetune", "num_scenes", "frames_per_scene", "height", "width", "mask_variant", "cond_prob",
    "lora_rank", "lora_alpha", "lora_target_modules", "learning_rate", "lr_scheduler", "max_train_steps",
    "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "max_grad_norm", "seed",
)

# Licences of base models we know. The CogVideoX-5b transformer is under THUDM's "CogVideoX LICENSE"
# (not an open-source licence); CogVideoX-2b is Apache-2.0.
COGVIDEOX_LICENSE = ("other", "cogvideox-license", "https://huggingface.co/THUDM/CogVideoX-5b/blob/main/LICENSE")
KNOWN_LICENSES: Dict[str, Tuple[str, Optional[str], Optional[str]]] = {
    "thudm/cogvideox-5b": COGVIDEOX_LICENSE,
    "qth/mask2dit": COGVIDEOX_LICENSE,
    "thudm/cogvideox-2b": ("apache-2.0", None, None),
}
LICENSE_SHORTCUTS = {"cogvideox": COGVIDEOX_LICENSE}

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SECTION = re.compile(r"\{\{#([A-Za-z_]+)\}\}\n?(.*?)\{\{/\1\}\}\n?", re.DOTALL)


class CardError(ValueError):
    """A card template could not be found or filled, or its front matter is invalid."""


def card_dirs() -> List[Path]:
    """Where card templates are looked up: package data first (wheels), then the source checkout's ``hub_cards/``."""
    package = Path(__file__).resolve().parent.parent
    return [package / "hub_assets" / "cards", package.parent.parent / "hub_cards"]


def find_card(name_or_path: str) -> Path:
    """A card template by name (``"mask2dit"``, ``"lora"``, ``"finetune"``) or by path to a ``.md`` file."""
    path = Path(name_or_path)
    if path.suffix == ".md" and path.is_file():
        return path
    filename = CARD_FILES.get(name_or_path)
    if filename is None:
        raise CardError(f"Unknown card {name_or_path!r}: use one of {sorted(CARD_FILES)} or a path to a .md file.")
    for folder in card_dirs():
        if (folder / filename).is_file():
            return folder / filename
    raise CardError(
        f"The card template {filename} was not found in {[str(d) for d in card_dirs()]}. In a source checkout it is "
        "in hub_cards/; an installed wheel must ship it as package data (diffusers_mask2dit/hub_assets/cards/)."
    )


def _open_sections(template: str, keep: Any) -> str:
    """``template`` with every section replaced by ``keep(match)``, outer sections first (sections of other
    names may nest; a section never nests in one of its own name)."""
    text = template
    while _SECTION.search(text):
        text = _SECTION.sub(keep, text)
    return text


def placeholders(template: str) -> List[str]:
    """The placeholder names a template uses (sections excluded), sorted."""
    return sorted(set(_PLACEHOLDER.findall(_open_sections(template, lambda m: m.group(2)))))


def render(template: str, values: Mapping[str, Any], sections: Optional[Mapping[str, bool]] = None) -> str:
    """Fill ``template``; raises :class:`CardError` for a placeholder without a value or an unknown section."""
    sections = dict(sections or {})

    def keep(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in sections:
            raise CardError(f"The template has a section `{{{{#{name}}}}}` but no on/off value was given for it.")
        return match.group(2) if sections[name] else ""

    text = _open_sections(template, keep)
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in values})
    if missing:
        raise CardError(f"No value for the card placeholder(s) {missing}.")
    text = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
    if "{{" in text:
        raise CardError("The card still holds `{{` after filling: a malformed placeholder or section.")
    return text


def front_matter(card: str) -> Dict[str, Any]:
    """Parse and check the YAML front matter the Hub reads (library, task, licence, tags; base model if any)."""
    import yaml

    if not card.startswith("---\n"):
        raise CardError("A model card must start with YAML front matter (`---`).")
    end = card.find("\n---\n", 4)
    if end < 0:
        raise CardError("The card's YAML front matter is not closed by `---`.")
    try:
        data = yaml.safe_load(card[4:end]) or {}
    except yaml.YAMLError as error:
        raise CardError(f"The card's front matter is not valid YAML: {error}") from None
    # No `base_model` is required: a model trained from scratch (the Shapes model) has none; the fine-tune and LoRA
    # templates ask for it themselves.
    for key in ("library_name", "pipeline_tag", "license", "tags"):
        if not data.get(key):
            raise CardError(f"The card's front matter has no `{key}`.")
    if data["library_name"] != "diffusers" or data["pipeline_tag"] != "text-to-video":
        raise CardError("The card must declare `library_name: diffusers` and `pipeline_tag: text-to-video`.")
    if data["license"] == "other" and not (data.get("license_name") and data.get("license_link")):
        raise CardError("`license: other` needs `license_name` and `license_link` naming the actual licence.")
    return data


def license_fields(base_model: str, license: Optional[str] = None, license_name: Optional[str] = None,
                   license_link: Optional[str] = None) -> Tuple[str, Optional[str], Optional[str]]:
    """``(license, license_name, license_link)``: given explicitly, by shortcut (``"cogvideox"``), or known for
    the base model. An unknown base without an explicit licence is an error: a card must not guess it."""
    if license:
        if license in LICENSE_SHORTCUTS:
            return LICENSE_SHORTCUTS[license]
        if license == "other" and not (license_name and license_link):
            raise CardError("`--license other` needs `--license-name` and `--license-link`.")
        return license, license_name, license_link
    known = KNOWN_LICENSES.get(base_model.lower())
    if known is None:
        raise CardError(
            f"The licence of the base model {base_model!r} is not known to this tool; pass `--license` (e.g. "
            "`cogvideox` for CogVideoX-5b derivatives, `apache-2.0` for CogVideoX-2b ones, or `other` with "
            "`--license-name` and `--license-link`)."
        )
    return known


def license_yaml(fields: Tuple[str, Optional[str], Optional[str]]) -> str:
    license, name, link = fields
    lines = [f"license: {license}"]
    if name:
        lines.append(f"license_name: {name}")
    if link:
        lines.append(f"license_link: {link}")
    return "\n".join(lines)


def license_sentence(fields: Tuple[str, Optional[str], Optional[str]]) -> str:
    license, name, link = fields
    if fields == COGVIDEOX_LICENSE:
        return (
            f"The weights derive from the CogVideoX-5b transformer and are subject to THUDM's "
            f"[CogVideoX LICENSE]({link}) (not an open-source licence: read its terms, e.g. on commercial use, "
            "before using them). `pipeline.py` is Apache-2.0 code from diffusers-mask2dit."
        )
    if license == "other":
        return f"The weights are subject to the [{name}]({link}) licence. `pipeline.py` is Apache-2.0."
    return f"Licence of the weights: `{license}`" + (f" ([text]({link}))" if link else "") + ". `pipeline.py` is Apache-2.0."


# --------------------------------------------------------------------------------------------------
# Training details
# --------------------------------------------------------------------------------------------------


def publishable_training(options: Mapping[str, Any]) -> Dict[str, Any]:
    """The options of :data:`TRAINING_KEYS` that have a value, in that order (never local paths)."""
    return {key: options[key] for key in TRAINING_KEYS if options.get(key) not in (None, "", [])}


def _training_rows(training: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """``(setting, value)`` rows of the summary table, for the options that were recorded."""
    rows: List[Tuple[str, str]] = []
    get = training.get
    if "stage" in training:
        stage = f"`{training['stage']}`"
        if training["stage"] == "sft" and "cond_prob" in training:
            stage += f" (n consecutive shots, conditional samples with p={training['cond_prob']})"
        elif training["stage"] == "pretrain":
            stage += " (n unrelated clips per sample)"
        rows.append(("stage", stage))
    if "num_scenes" in training:
        rows.append(("scenes per sample", str(training["num_scenes"])))
    if "frames_per_scene" in training:
        rows.append(("frames per scene", str(training["frames_per_scene"])))
    if "height" in training and "width" in training:
        rows.append(("resolution", f"{training['height']}x{training['width']}"))
    if "mask_variant" in training:
        rows.append(("attention mask", str(training["mask_variant"])))
    if "learning_rate" in training:
        rows.append(("learning rate", f"{training['learning_rate']}" + (f" ({get('lr_scheduler')})" if "lr_scheduler" in training else "")))
    if "max_train_steps" in training:
        rows.append(("steps", str(training["max_train_steps"])))
    if "train_batch_size" in training:
        rows.append(("batch", f"{training['train_batch_size']} per device x {get('gradient_accumulation_steps', 1)} accumulation"))
    if "mixed_precision" in training:
        rows.append(("mixed precision", str(training["mixed_precision"])))
    if "lora_rank" in training:
        rank_alpha = "LoRA rank / alpha" if "lora_alpha" in training else "LoRA rank"
        rows.append((rank_alpha, f"{training['lora_rank']}" + (f" / {training['lora_alpha']}" if "lora_alpha" in training else "")))
    if "lora_target_modules" in training:
        rows.append(("LoRA targets", ", ".join(training["lora_target_modules"])))
    return rows


def training_details(training: Mapping[str, Any]) -> str:
    """The card's training section: a summary table, then every recorded option exactly as recorded."""
    if not training:
        return "- Not recorded with the weights."
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _training_rows(training)]
    lines += ["", "<details><summary>Options as recorded</summary>", ""]
    lines += [f"- `{key}`: {value if isinstance(value, str) else json.dumps(value)}" for key, value in training.items()]
    lines += ["", "</details>"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------


def is_local_path(value: str) -> bool:
    """Whether ``value`` names a local folder rather than a Hub id."""
    return os.path.exists(value) or value.startswith(("/", ".", "~")) or "\\" in value


def _base_values(base_model: str, kind: str, license_fields_: Optional[Tuple[str, Optional[str], Optional[str]]]) -> Dict[str, str]:
    """Placeholders that name the base model: front matter, link, name, licence."""
    hub_id = not is_local_path(base_model)
    relation = {"lora": "adapter", "full": "finetune"}.get(kind)
    yaml_lines = [f"base_model: {base_model}"] if hub_id else []
    if hub_id and relation:
        yaml_lines.append(f"base_model_relation: {relation}")
    if license_fields_ is not None:
        yaml_lines.append(license_yaml(license_fields_))
        sentence = license_sentence(license_fields_)
    else:
        sentence = (
            "Not recorded here: the weights follow the licence of the base model. `mask2dit hub build` asks for it "
            "(`--license`) before anything is published."
        )
    return {
        "base_model": base_model,
        "base_model_yaml": "\n".join(yaml_lines),
        "base_link": f"[{base_model}](https://huggingface.co/{base_model})" if hub_id else f"`{base_model}`",
        "license_sentence": sentence,
    }


def model_card(
    card: str,
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    kind: str = "lora",
    mask_variant: str = "v2",
    mask_variant_known: bool = True,
    training: Optional[Mapping[str, Any]] = None,
    license: Optional[str] = None,
    license_name: Optional[str] = None,
    license_link: Optional[str] = None,
    title: Optional[str] = None,
    weights_path: Optional[str] = None,
    about: str = "",
) -> str:
    """Render a model card: the one writer of cards, for ``mask2dit hub build`` and for the trainer.

    Args:
        card: ``"mask2dit"`` (the converted release), ``"lora"``/``"finetune"``/``"stock"`` (the template for
            LoRAs, fine-tunes and unmodified CogVideoX folders) or a path to a template.
        repo_id: the Hub repository the folder goes to (used in the snippets). None renders the card of a
            local training output instead (``weights_path`` must be given): its snippets load from local
            folders, and the base model may be a local folder (its licence is then not stated).
        base_model: Hub id (or, for a local card, folder) of the model that was fine-tuned.
        kind: ``"lora"``, ``"full"`` or ``"stock"``: which sections of the template to keep.
        mask_variant: the attention mask the weights were trained with.
        mask_variant_known: False when ``mask_variant`` is only the default (the card then says so).
        training: publishable training options (see :data:`TRAINING_KEYS`).
        weights_path: local cards only: the folder that holds the trained weights.
        about: ``scratch`` cards: Markdown on what the model is and how it measured (e.g. its results table).

    Raises:
        CardError: a missing or local ``base_model`` on a Hub card, an unknown licence, an unfilled template.
    """
    import diffusers

    from .. import __version__

    if kind not in CARD_KINDS:
        raise CardError(f"`kind` must be one of {list(CARD_KINDS)}, got {kind!r}.")
    local = repo_id is None
    if local and not weights_path:
        raise CardError("A card without `repo_id` describes a local training output: pass `weights_path`.")
    template = find_card(card).read_text(encoding="utf-8")
    values: Dict[str, Any] = {
        "repo_id": repo_id or "", "weights_path": weights_path or "", "package_version": __version__,
        "diffusers_version": diffusers.__version__, "mask_variant": mask_variant,
        "mask_variant_note": "" if mask_variant_known else " (assumed: the package default, not recorded with the weights)",
    }
    sections = {"hub": not local, "local": local, "lora": kind == "lora", "full": kind != "lora",
                "finetune": kind == "full", "stock": kind == "stock"}
    if {"base_model", "base_model_yaml"} & set(placeholders(template)):
        if not base_model:
            raise CardError(
                "The card needs --base-model: the Hub id of the model these weights were trained from "
                "(e.g. THUDM/CogVideoX-5b); for a model trained from scratch pass --card scratch."
            )
        if not local and is_local_path(base_model):
            raise CardError(f"--base-model must be a Hub id (owner/name), not a local path: {base_model!r}.")
        fields = None
        if not (local and is_local_path(base_model)):
            try:
                fields = license_fields(base_model, license, license_name, license_link)
            except CardError:
                if not local:
                    raise
        values.update(_base_values(base_model, kind, fields))
        default_title = {"lora": "Mask²DiT LoRA", "full": "Mask²DiT fine-tuned transformer"}.get(kind, "Mask²DiT")
        details = training_details(training or {})
        if kind == "stock":
            details = "- None: these are the base model's weights as it was released; diffusers-mask2dit did not train them."
        values.update(title=title or (default_title if local else repo_id.split("/")[-1]), training_details=details)
    if kind == "scratch":
        if base_model:
            raise CardError(f"--card scratch describes a model trained from scratch: it has no --base-model ({base_model!r}).")
        values.update(_scratch_values(repo_id, license, license_name, license_link, title, training, about))
    text = _drop_empty_front_matter_lines(render(template, values, sections))
    if not local:
        front_matter(text)
    return text


def _scratch_values(repo_id: Optional[str], license: Optional[str], license_name: Optional[str],
                    license_link: Optional[str], title: Optional[str], training: Optional[Mapping[str, Any]],
                    about: str) -> Dict[str, str]:
    """Placeholders of the card of a model trained from scratch: its own licence (never guessed), no base model."""
    if not repo_id:
        raise CardError("The card of a model trained from scratch is written for the Hub: pass --repo-id.")
    if not license:
        raise CardError(
            "A model trained from scratch has no base model to take a licence from: pass --license (e.g. apache-2.0, "
            "or other with --license-name and --license-link)."
        )
    fields = license_fields("", license, license_name, license_link)
    return {
        "license_yaml": license_yaml(fields), "license_sentence": license_sentence(fields),
        "title": title or repo_id.split("/")[-1], "training_details": training_details(training or {}),
        "about": about.strip() or "How it measured is not recorded in this card (`mask2dit hub build --about FILE.md`).",
    }


def _drop_empty_front_matter_lines(card: str) -> str:
    """Remove the blank lines that empty placeholders (e.g. no Hub base model) leave in the front matter."""
    end = card.find("\n---\n", 4)
    if not card.startswith("---\n") or end < 0:
        return card
    head = "\n".join(line for line in card[:end].split("\n") if line.strip())
    return head + card[end:]
