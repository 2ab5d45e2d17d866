"""Model cards: find the templates in ``hub_cards/``, fill their placeholders, check the YAML front matter.

Template syntax (deliberately tiny):

- ``{{name}}`` is replaced by a value; every placeholder must get one (an unfilled one is an error);
- ``{{#section}} ... {{/section}}`` keeps its content when ``section`` is on, drops it otherwise (no nesting).

The cards' Python snippets are executed by ``tests/test_docs_snippets.py`` against tiny local models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

CARD_FILES = {
    "mask2dit": "mask2dit-cogvideox-5b.md",  # the authors' checkpoint, converted (CogVideoX-5b base)
    "lora": "lora-template.md",  # LoRA adapters and full fine-tunes made with `mask2dit train`
    "finetune": "lora-template.md",
}
TEMPLATE_SECTIONS = ("lora", "full")

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


def placeholders(template: str) -> List[str]:
    """The placeholder names a template uses (sections excluded), sorted."""
    return sorted(set(_PLACEHOLDER.findall(_SECTION.sub(lambda m: m.group(2), template))))


def render(template: str, values: Mapping[str, Any], sections: Optional[Mapping[str, bool]] = None) -> str:
    """Fill ``template``; raises :class:`CardError` for a placeholder without a value or an unknown section."""
    sections = dict(sections or {})

    def keep(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in sections:
            raise CardError(f"The template has a section `{{{{#{name}}}}}` but no on/off value was given for it.")
        return match.group(2) if sections[name] else ""

    text = _SECTION.sub(keep, template)
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in values})
    if missing:
        raise CardError(f"No value for the card placeholder(s) {missing}.")
    text = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
    if "{{" in text:
        raise CardError("The card still holds `{{` after filling: a malformed placeholder or section.")
    return text


def front_matter(card: str) -> Dict[str, Any]:
    """Parse and check the YAML front matter the Hub reads (library, task, base model, licence, tags)."""
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
    for key in ("library_name", "pipeline_tag", "base_model", "license", "tags"):
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
