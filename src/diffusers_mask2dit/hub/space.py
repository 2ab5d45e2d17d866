"""``mask2dit hub space``: a Hugging Face Space folder (a Gradio app) for a Mask²DiT model.

The folder holds:

- ``app.py``: :mod:`.space_app` copied verbatim. It needs gradio, torch, diffusers, transformers, imageio and
  Pillow, not this package: it loads the model folder's bundled ``pipeline.py`` as a diffusers custom pipeline;
- ``space.json``: the app's settings, read from the model folder (scene mask, prompt vocabulary, generation
  defaults when the folder carries them) and from the command line;
- ``requirements.txt`` and ``README.md`` with the Space front matter (``sdk: gradio``, ``models:``,
  ``suggested_hardware``);
- ``model/`` when the model is bundled into the Space (small models such as the Shapes model; the default for a
  local folder without ``--model-repo-id``): a Hub folder built by :func:`..build.build_hub_folder`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .build import DEFAULTS_FILES, VOCABULARY_FILE, check_repo_id
from .space_app import CONFIG_FILE, DEFAULT_CONFIG, MASK_VARIANTS

APP_SOURCE = Path(__file__).with_name("space_app.py")
DEFAULT_KEYS = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames", "mask_variant", "fps")
BUNDLED_MODEL = "model"
SMALL_MODEL_BYTES = 2 * 1024**3  # transformer weights below this run on a free CPU Space
REQUIREMENTS = ("torch", "diffusers>=0.32", "transformers>=4.44", "accelerate", "sentencepiece", "imageio",
                "imageio-ffmpeg", "Pillow", "numpy")
HARDWARE = ("cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "a10g-small", "a10g-large", "a100-large",
            "zero-a10g")
EXAMPLE_PROMPTS = [
    "A woman with short black hair spreads a picnic blanket by a quiet river.",
    "A man in a straw hat arrives with a basket of fruit and smiles.",
    "The two share snacks and laugh as the sun shines on the river.",
    "At dusk they pack up and walk home along the river path.",
]


class SpaceError(ValueError):
    """The Space cannot be built from these arguments (the message says why and what to pass)."""


@dataclass
class SpaceResult:
    out: Path
    config: Dict[str, Any]
    hardware: str
    files: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        model = self.config["model"] + (" (bundled in the Space)" if self.config["model"] == BUNDLED_MODEL else "")
        lines = [f"Wrote a Gradio Space for {model} in {self.out} (suggested hardware: {self.hardware}).",
                 f"  files: {', '.join(self.files[:8])}" + (" ..." if len(self.files) > 8 else "")]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"Run it here: cd {self.out} && python app.py   (http://127.0.0.1:7860)")
        return "\n".join(lines)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SpaceError(f"{path} is not readable JSON: {error}") from None


def read_vocabulary(folder: Path) -> Optional[Dict[str, Any]]:
    """The folder's prompt vocabulary (:data:`VOCABULARY_FILE`), checked; None when it has none."""
    path = folder / VOCABULARY_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    slots = data.get("slots") if isinstance(data, dict) else None
    if not isinstance(data.get("template"), str) or not isinstance(slots, dict) or not all(
        isinstance(words, list) and words and all(isinstance(w, str) for w in words) for words in slots.values()
    ):
        raise SpaceError(f"{path} must hold {{'template': str, 'slots': {{slot: [words]}}, 'examples': [prompts]}}.")
    return data


def read_generation_defaults(folder: Path) -> Dict[str, Any]:
    """Sampling defaults the model folder carries (:data:`DEFAULTS_FILES`), else ``{}`` (the pipeline's apply)."""
    for name in DEFAULTS_FILES:
        if (folder / name).is_file():
            data = _read_json(folder / name)
            return {key: data[key] for key in DEFAULT_KEYS if isinstance(data, dict) and data.get(key) is not None}
    return {}


def _transformer_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors"))


def folder_settings(folder: Path) -> Dict[str, Any]:
    """``space.json`` values read from a local model folder: mask, defaults, vocabulary and examples."""
    settings: Dict[str, Any] = {}
    config_path = folder / "transformer" / "config.json"
    if config_path.is_file():
        variant = _read_json(config_path).get("attn_mask_variant")
        if variant in MASK_VARIANTS:
            settings["mask_variant"] = variant
    settings.update(read_generation_defaults(folder))
    vocabulary = read_vocabulary(folder)
    if vocabulary:
        settings["vocabulary"] = {"template": vocabulary["template"], "slots": vocabulary["slots"]}
        settings["examples"] = list(vocabulary.get("examples") or [])
    return settings


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SpaceError(f"--out {out} exists and is not empty; pass --overwrite to replace an earlier Space.")
        if not ((out / CONFIG_FILE).is_file() and (out / "app.py").is_file()
                and (out / "app.py").read_text(encoding="utf-8") .startswith(APP_SOURCE.read_text(encoding="utf-8")[:60])):
            raise SpaceError(f"--overwrite refuses to delete {out}: it is not an earlier `mask2dit hub space` folder.")
        shutil.rmtree(out)


def _model_source(model: str, model_repo_id: Optional[str], bundle: Optional[bool]) -> Dict[str, Any]:
    """Where the app loads the model from and what the folder says about it:
    ``{"local": folder or None, "load": model setting, "models": Hub ids, "bundle": bool, "settings": {...}}``."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        if os.path.exists(model) or model.startswith((".", "/", "~")):
            raise SpaceError(f"--model {model} is not a folder.")
        check_repo_id(model, "--model (a folder or a Hub id)")
        if bundle:
            raise SpaceError("--bundle-model needs --model to be a local folder.")
        return {"local": None, "load": model, "models": [model], "bundle": False, "settings": {}}
    folder = folder.resolve()
    if not ((folder / "model_index.json").is_file() and (folder / "pipeline.py").is_file()):
        raise SpaceError(
            f"--model {folder} is not a Hub folder (model_index.json + the bundled pipeline.py): build it first with "
            f"`mask2dit hub build --model {folder} --out <hub folder> --space <space folder>`."
        )
    if model_repo_id:
        check_repo_id(model_repo_id, "--model-repo-id")
    bundle = bundle if bundle is not None else not model_repo_id
    return {"local": folder, "load": BUNDLED_MODEL if bundle else model_repo_id, "bundle": bundle,
            "models": [model_repo_id] if model_repo_id else [], "settings": folder_settings(folder)}


def _space_config(source: Dict[str, Any], overrides: Dict[str, Any], title: Optional[str]) -> Dict[str, Any]:
    config = {"model": source["load"], "title": title or DEFAULT_CONFIG["title"]}
    config.update(source["settings"])
    config.update({key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise SpaceError(f"Unknown Space settings {unknown}; accepted: {sorted(DEFAULT_CONFIG)}.")
    if not 1 <= int(config.get("max_scenes", DEFAULT_CONFIG["max_scenes"])) <= 16:
        raise SpaceError(f"--max-scenes must be 1 to 16, got {config['max_scenes']}.")
    if int(config.get("num_inference_steps", 1)) < 1:
        raise SpaceError(f"--steps must be at least 1, got {config['num_inference_steps']}.")
    if float(config.get("guidance_scale", 0)) < 0:
        raise SpaceError(f"--guidance must be >= 0 (<= 1 turns guidance off), got {config['guidance_scale']}.")
    if not config.get("examples") and not config.get("vocabulary"):
        config["examples"] = list(EXAMPLE_PROMPTS)
    return config


def _hardware(source: Dict[str, Any], hardware: Optional[str], notes: List[str]) -> str:
    if hardware:
        if hardware not in HARDWARE:
            raise SpaceError(f"--hardware must be one of {list(HARDWARE)}, got {hardware!r}.")
        return hardware
    if source["local"] is not None and _transformer_bytes(source["local"]) < SMALL_MODEL_BYTES:
        return "cpu-basic"
    notes.append("suggested hardware zero-a10g (ZeroGPU: the app uses `spaces.GPU`); pass --hardware to change it.")
    return "zero-a10g"


def gradio_version() -> str:
    """The gradio version the Space pins (``sdk_version``): the one installed here, which the tests ran."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        raise SpaceError("gradio is not installed: pip install \"diffusers-mask2dit[space]\"") from None


def space_readme(config: Dict[str, Any], models: List[str], hardware: str, sdk_version: str) -> str:
    """``README.md`` of the Space: the front matter the Hub reads, then how to run it."""
    lines = ["---", f"title: {json.dumps(config['title'][:60], ensure_ascii=False)}", "emoji: 🎬",
             "colorFrom: indigo", "colorTo: pink", "sdk: gradio", f"sdk_version: {sdk_version}", "app_file: app.py",
             "pinned: false", "license: apache-2.0", f"suggested_hardware: {hardware}",
             "short_description: Multi-scene video with Mask²DiT (one prompt per scene)"]
    if models:
        lines += ["models:"] + [f"- {model}" for model in models]
    lines += ["tags:", "- mask2dit", "- text-to-video", "---", "", f"# {config['title']}", "",
              "A demo of Mask²DiT multi-scene video generation (Qi et al., CVPR 2025) made with `mask2dit hub space` "
              "(diffusers-mask2dit): one prompt per scene, add or remove scenes, extend the last film by one scene.",
              "", f"Model: `{config['model']}` (its own licence applies to its weights; `app.py` is Apache-2.0).", "",
              "Run it on your machine (binds 127.0.0.1:7860; `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` change it):",
              "", "```bash", f"pip install gradio=={sdk_version} -r requirements.txt", "python app.py", "```", ""]
    return "\n".join(lines)


def build_space(model: str, out: os.PathLike | str, *, model_repo_id: Optional[str] = None,
                bundle_model: Optional[bool] = None, title: Optional[str] = None, hardware: Optional[str] = None,
                overrides: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> SpaceResult:
    """Write a Space folder for ``model`` (a Hub folder built by ``mask2dit hub build``, or a Hub id) to ``out``.

    Args:
        model_repo_id: the model's Hub id: the Space loads it from there (unless ``bundle_model``) and lists it
            under ``models:``. Without it a local folder is bundled into the Space (``model/``).
        overrides: ``space.json`` values that win over the folder's (e.g. ``num_inference_steps``, ``max_scenes``).
    """
    out = Path(out).expanduser().resolve()
    source = _model_source(str(model), model_repo_id, bundle_model)
    config = _space_config(source, dict(overrides or {}), title)
    notes: List[str] = []
    hardware = _hardware(source, hardware, notes)
    sdk_version = gradio_version()
    if source["local"] is not None and (out == source["local"] or source["local"] in out.parents):
        raise SpaceError(f"--out {out} must not be inside --model {source['local']}.")
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_SOURCE, out / "app.py")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    requirements = list(REQUIREMENTS) + (["spaces"] if hardware.startswith("zero") else [])
    (out / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    (out / "README.md").write_text(space_readme(config, source["models"], hardware, sdk_version), encoding="utf-8")
    if source["bundle"]:
        shutil.copytree(source["local"], out / BUNDLED_MODEL)
        notes.append("the model is bundled into the Space (model/); pass --model-repo-id to load it from the Hub instead.")
    if not source["models"]:
        notes.append("no --model-repo-id: the Space card lists no `models:` entry.")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return SpaceResult(out=out, config=config, hardware=hardware, files=files, notes=notes)


def serve_demo(pipe, folder: Optional[os.PathLike | str] = None, output_root: Optional[os.PathLike | str] = None, examples: Optional[List[str]] = None,
               steps: Optional[int] = None, guidance: Optional[float] = None, **launch_kwargs: Any) -> int:
    """Serve the Space's page for a pipeline loaded here (``mask2dit demo --web``): settings from ``folder`` (default:
    the folder the pipeline was loaded from; its prompt vocabulary and defaults) and the arguments; binds 127.0.0.1 unless ``GRADIO_SERVER_NAME`` or
    ``server_name`` says otherwise. Blocks until the server stops; returns 0."""
    from .space_app import SceneMaker, build_demo, launch

    folder = folder or pipe.config.get("_name_or_path")
    folder = folder if folder and Path(folder).is_dir() else None
    config = dict(DEFAULT_CONFIG, model=str(folder or "the demo pipeline"), title="Mask²DiT demo", output_ttl_s=None)
    if folder is not None:
        config.update(folder_settings(Path(folder)))
    overrides = {"examples": list(examples or []) or None, "num_inference_steps": steps, "guidance_scale": guidance}
    config.update({key: value for key, value in overrides.items() if value is not None})
    launch(build_demo(SceneMaker(pipe, config, output_root)), **launch_kwargs)
    return 0
