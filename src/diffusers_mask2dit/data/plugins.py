"""Encoders (shot embeddings for relevance) and captioners (one caption per shot), chosen by a spec string.

An encoder is any object with ``encode_video(frames uint8 (F, H, W, 3)) -> (D,)`` (the evaluation package's
interface); a captioner any object with ``caption(frames, context) -> str``, where ``context`` holds the shot's
``video``, ``start_frame``, ``end_frame``, ``chapter`` (title or None) and ``clip`` (path of its mp4).

Specs (``--encoder`` / ``--captioner``):

- ``none``: no encoder (no relevance, every group kept) / no captioner (captions empty, or from ``--captions``);
- a registered name (:func:`register_encoder`, :func:`register_captioner`);
- ``module:attribute``: a factory imported and called without arguments (how the Shapes world plugs in its
  exact scorer and ground-truth captioner without the library importing it);
- encoder: a folder with a ``transformers`` CLIP model (:class:`~diffusers_mask2dit.evaluation.CLIPVideoEncoder`);
- captioner: ``cmd:COMMAND``, run once per shot with ``{clip}`` replaced by the clip's path, stdout is the
  caption; or a folder with a ``transformers`` image-to-text model, run on the shot's middle frame.
"""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
from typing import Any, Callable, Dict, Optional

import numpy as np

ENCODERS: Dict[str, Callable[[], Any]] = {}
CAPTIONERS: Dict[str, Callable[[], Any]] = {}


def register_encoder(name: str, factory: Callable[[], Any]) -> None:
    """Make ``--encoder name`` build ``factory()``."""
    ENCODERS[name] = factory


def register_captioner(name: str, factory: Callable[[], Any]) -> None:
    """Make ``--captioner name`` build ``factory()``."""
    CAPTIONERS[name] = factory


def _import_factory(spec: str, option: str) -> Callable[[], Any]:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`{option}` {spec!r}: cannot import {attribute!r} from {module_name!r} ({error}).") from None
    if not callable(factory):
        raise ValueError(f"`{option}` {spec!r} is not callable; name a factory that returns the object.")
    return factory


def _is_module_spec(spec: str) -> bool:
    return ":" in spec and not os.path.exists(spec) and not spec.startswith("cmd:")


def _build(spec: str, registry: Dict[str, Callable[[], Any]], option: str, from_folder: Callable[[str], Any], accepted: str) -> Any:
    """The object a registered name, ``module:factory`` or folder spec builds; a ValueError naming ``option`` else."""
    if spec in registry:
        return registry[spec]()
    if _is_module_spec(spec):
        return _import_factory(spec, option)()
    if os.path.isdir(spec):
        return from_folder(spec)
    known = ", ".join(sorted(registry)) or "none registered"
    raise ValueError(f"`{option}` {spec!r} is not a folder, a registered name ({known}) or module:factory; give {accepted}.")


def _clip_encoder(path: str, device: Optional[str]) -> Any:
    from ..evaluation.encoders import CLIPVideoEncoder

    try:
        return CLIPVideoEncoder.from_pretrained(path, device=device, local_files_only=True)
    except ValueError as error:
        raise ValueError(f"`--encoder` {path}: {error}") from None


def load_encoder(spec: str, device: Optional[str] = None) -> Optional[Any]:
    """The encoder a spec names, or None for ``none``; a ValueError naming ``--encoder`` otherwise."""
    if spec == "none":
        return None
    encoder = _build(spec, ENCODERS, "--encoder", lambda path: _clip_encoder(path, device),
                     "a CLIP model folder, module:factory, or none")
    if not callable(getattr(encoder, "encode_video", None)):
        raise ValueError(f"`--encoder` {spec!r} built a {type(encoder).__name__} without encode_video(frames).")
    return encoder


class CommandCaptioner:
    """Runs a user command per shot (``{clip}`` -> the clip's path); its stripped stdout is the caption."""

    def __init__(self, command: str) -> None:
        if "{clip}" not in command:
            raise ValueError(f"`--captioner` cmd:{command!r} must contain {{clip}} where the clip's path goes.")
        self.command = command

    def caption(self, frames: np.ndarray, context: Dict[str, Any]) -> str:
        argv = [part.replace("{clip}", context["clip"]) for part in shlex.split(self.command)]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"captioner command failed (exit {result.returncode}): {' '.join(result.stderr.split())[:200]}")
        return " ".join(result.stdout.split())


class ImageToTextCaptioner:
    """A ``transformers`` captioning model (e.g. BLIP) run on the shot's middle frame, without a text prompt."""

    def __init__(self, path: str, device: Optional[str] = None) -> None:
        from transformers import pipeline
        from transformers.pipelines import SUPPORTED_TASKS

        # transformers 5 folded the "image-to-text" pipeline into "image-text-to-text" (which needs a text: "")
        self.task = "image-to-text" if "image-to-text" in SUPPORTED_TASKS else "image-text-to-text"
        try:
            self.pipe = pipeline(self.task, model=path, device=device)
        except Exception as error:  # transformers raises many types for a folder it cannot load
            raise ValueError(f"`--captioner` {path}: cannot load an image-to-text model ({type(error).__name__}: {error}).") from None

    def caption(self, frames: np.ndarray, context: Dict[str, Any]) -> str:
        from PIL import Image

        image = Image.fromarray(frames[len(frames) // 2])
        output = self.pipe(image) if self.task == "image-to-text" else self.pipe(images=image, text="")
        return " ".join(str(output[0].get("generated_text", "")).split()) if output else ""


def load_captioner(spec: str, device: Optional[str] = None) -> Optional[Any]:
    """The captioner a spec names, or None for ``none``; a ValueError naming ``--captioner`` otherwise."""
    if spec == "none":
        return None
    if spec.startswith("cmd:"):
        return CommandCaptioner(spec[4:])
    captioner = _build(spec, CAPTIONERS, "--captioner", lambda path: ImageToTextCaptioner(path, device),
                       "an image-to-text model folder, cmd:COMMAND, module:factory, or none")
    if not callable(getattr(captioner, "caption", None)):
        raise ValueError(f"`--captioner` {spec!r} built a {type(captioner).__name__} without caption(frames, context).")
    return captioner
