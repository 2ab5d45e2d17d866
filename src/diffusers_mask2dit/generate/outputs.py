"""The output folder of ``mask2dit generate``, ``extend`` and ``demo``: what is written, and reading it back.

Every command writes ``scene_00.mp4``, ``scene_01.mp4``, ..., ``video.mp4`` (the scene files joined without
re-encoding), ``contact_sheet.png`` (one row per scene, labelled with its prompt; scenes made by scene extension are
marked), ``prompts.txt`` (one scene prompt per line), ``latents.safetensors`` (every scene's exact latents, which
``extend`` continues from) and ``settings.json`` (the model, LoRA and sampling settings, which ``extend --from``
reuses). ``mask2dit evaluate`` reads these names. A parallel run stopped by a hung or dead process leaves only the
scenes it finished: ``scene_XX.mp4`` and ``scene_XX.latents.safetensors`` (:mod:`..finished_scenes`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..cli_utils import one_line
from ..video_io import contact_sheet, join_videos, read_video, write_atomically, write_video

WHOLE_VIDEO_FILE = "video.mp4"
CONTACT_SHEET_FILE = "contact_sheet.png"
PROMPTS_FILE = "prompts.txt"
LATENTS_FILE = "latents.safetensors"
LATENTS_FORMAT = "mask2dit-latents-1"
SETTINGS_FILE = "settings.json"


def video_folder(out: str, index: int, num_videos: int) -> str:
    """Where video ``index`` of a run of ``num_videos`` (``--num-videos``) goes: ``out`` itself for one video, else
    ``out/video_00``, ``out/video_01``, ...: each a whole output folder that ``extend --from`` takes."""
    return out if num_videos == 1 else os.path.join(out, f"video_{index:02d}")


def scene_file(index: int) -> str:
    """``scene_00.mp4``, ``scene_01.mp4``, ... (two digits, from 0)."""
    return f"scene_{index:02d}.mp4"



@dataclass
class SavedLatents:
    """The content of ``latents.safetensors``: ``latents (1, F_latent, C, h, w)`` of all scenes in order (scaled
    as the pipeline's latents, ready for ``extend(context_latents=...)``), and per scene its latent and pixel frame
    counts and whether scene extension made it."""

    latents: Any
    latent_frames: List[int]
    pixel_frames: List[int]
    extended: List[bool]



@dataclass
class OutputFolder:
    """What ``read_output_folder`` finds: scenes ``uint8 (F, H, W, 3)``, prompts, scene files, saved latents."""

    scenes: List[np.ndarray]
    prompts: List[str]
    scene_paths: List[str]
    latents: Optional[SavedLatents] = None


def _counts(values: Sequence[Any]) -> str:
    return ",".join(str(int(v)) for v in values)


def save_latents(path: str, latents: SavedLatents) -> str:
    """Write ``latents.safetensors`` (through a temporary file in the same folder); returns ``path``."""
    from safetensors.torch import save_file

    metadata = {
        "format": LATENTS_FORMAT,
        "scene_latent_frames": _counts(latents.latent_frames),
        "scene_pixel_frames": _counts(latents.pixel_frames),
        "extended_scenes": _counts(latents.extended),
    }
    tensors = {"latents": latents.latents.detach().cpu().contiguous()}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_latents(path: str) -> SavedLatents:
    """Read ``latents.safetensors``; a ValueError names the file when it is damaged or inconsistent."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            latents = handle.get_tensor("latents")
        counts = [[int(v) for v in metadata[key].split(",")] for key in ("scene_latent_frames", "scene_pixel_frames")]
        extended = [bool(int(v)) for v in metadata["extended_scenes"].split(",")]
    except Exception as error:  # safetensors reports damage with several exception types
        raise ValueError(f"`--from`: {path} is not a readable {LATENTS_FILE} ({one_line(error)}).") from error
    if metadata.get("format") != LATENTS_FORMAT or latents.dim() != 5 or latents.shape[0] != 1:
        raise ValueError(f"`--from`: {path} is not a {LATENTS_FILE} written by `mask2dit generate`.")
    if sum(counts[0]) != latents.shape[1] or not len(counts[0]) == len(counts[1]) == len(extended):
        raise ValueError(f"`--from`: {path} is inconsistent: its scene frame counts do not add up to its latents.")
    return SavedLatents(latents, counts[0], counts[1], extended)


def _scene_labels(prompts: Sequence[str], extended: Sequence[bool]) -> List[str]:
    return [
        f"{index + 1}{' (extended)' if is_extended else ''}: {' '.join(prompt.split())}"
        for index, (prompt, is_extended) in enumerate(zip(prompts, extended))
    ]


def save_outputs(
    folder: str,
    scenes: Sequence[Any],
    prompts: Sequence[str],
    fps: int = 8,
    latents: Optional[SavedLatents] = None,
    copied: Optional[Dict[int, str]] = None,
    settings: Optional[Dict[str, Any]] = None,
    whole_video: Optional[Any] = None,
) -> List[str]:
    """Write the standard output files for one video whose scenes are frames ``(F, H, W, 3)``; returns the paths.

    ``whole_video`` (frames ``(F, H, W, 3)``) is written as the whole video instead of the scenes joined (DiTCtrl's
    video holds transition tiles between its prompts' own tiles).

    ``latents`` adds ``latents.safetensors`` (and marks extended scenes on the contact sheet); ``settings`` adds
    ``settings.json`` (see :func:`recorded_settings`); ``copied`` maps a
    scene index to an mp4 file copied unchanged instead of encoding that scene's frames again. Scene files of an
    earlier, longer run in ``folder`` are removed, so the folder always describes one video.
    """
    if len(scenes) != len(prompts):
        raise ValueError(f"{len(scenes)} scenes but {len(prompts)} prompts; they must match one to one.")
    os.makedirs(folder, exist_ok=True)
    scene_paths = []
    for index, scene in enumerate(scenes):
        path = os.path.join(folder, scene_file(index))
        source = (copied or {}).get(index)
        if source is None:
            write_video(scene, path, fps=fps)
        elif not os.path.exists(path) or not os.path.samefile(source, path):
            shutil.copyfile(source, path)
        scene_paths.append(path)
    stale = len(scenes)
    while os.path.isfile(os.path.join(folder, scene_file(stale))):
        os.remove(os.path.join(folder, scene_file(stale)))
        stale += 1
    whole_path = os.path.join(folder, WHOLE_VIDEO_FILE)
    if whole_video is None:
        paths = [join_videos(scene_paths, whole_path)] + scene_paths
    else:
        paths = [write_video(whole_video, whole_path, fps=fps)] + scene_paths
    extended = latents.extended if latents is not None else [False] * len(scenes)
    labels = _scene_labels(prompts, extended)
    paths.append(contact_sheet(scenes, os.path.join(folder, CONTACT_SHEET_FILE), labels=labels, highlighted=extended))
    prompts_path = os.path.join(folder, PROMPTS_FILE)
    with open(prompts_path, "w", encoding="utf-8") as handle:
        handle.write("".join(" ".join(p.split()) + "\n" for p in prompts))  # one line per scene, whatever was typed
    paths.append(prompts_path)
    for name, content, save in ((LATENTS_FILE, latents, save_latents), (SETTINGS_FILE, settings, _save_settings)):
        path = os.path.join(folder, name)
        if content is not None:
            paths.append(save(path, content))
        elif os.path.exists(path):
            os.remove(path)  # it would describe another video
    from ..finished_scenes import remove_scene_latents

    remove_scene_latents(folder)  # a parallel run's scenes as they finished: now in latents.safetensors (or stale)
    return paths


# What `extend --from` reuses from the run that wrote the folder when its own options leave them out (None).
RECORDED_OPTIONS = ("model", "transformer", "lora", "lora_scale", "scheduler", "steps", "guidance", "mask",
                    "negative_prompt", "fps", "max_sequence_length", "attention_backend", "compile", "quantize",
                    "offload", "cache", "vae_tiling", "vae_slicing")


def recorded_settings(args: Any) -> Dict[str, Any]:
    """The options of ``args`` that ``extend --from`` reuses (local paths made absolute, so they hold from any
    working folder); options not given are recorded as None (the model's defaults)."""
    settings = {name: getattr(args, name, None) for name in RECORDED_OPTIONS}
    absolute = lambda path: os.path.abspath(path) if os.path.exists(path) else path  # noqa: E731
    for name in ("model", "transformer"):
        if settings[name] is not None:
            settings[name] = absolute(settings[name])
    if settings["lora"] is not None:  # one entry per --lora
        settings["lora"] = [absolute(path) for path in settings["lora"]]
    return settings


def _save_settings(path: str, settings: Dict[str, Any]) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2)

    return write_atomically(path, write)


def read_settings(folder: str) -> Dict[str, Any]:
    """The ``settings.json`` of an output folder (``{}`` for a folder written before it existed); a ValueError names
    the file when it is damaged."""
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            settings = json.load(handle)
    except ValueError as error:
        raise ValueError(f"`--from`: {path} is not valid JSON ({one_line(error)}); delete it or fix it.") from error
    if not isinstance(settings, dict):
        raise ValueError(f"`--from`: {path} must hold a JSON object of option names and values.")
    recorded = {name: settings[name] for name in RECORDED_OPTIONS + ("random_weights",) if name in settings}
    for name in ("lora", "lora_scale"):  # written as one value before several --lora were taken
        if recorded.get(name) is not None and not isinstance(recorded[name], list):
            recorded[name] = [recorded[name]]
    return recorded


def read_prompts(prompts: Optional[Sequence[str]], prompts_file: Optional[str], required: bool = True) -> List[str]:
    """Prompts from repeated ``--prompt`` arguments, then from a file (one per line, blank lines skipped)."""
    collected = [p for p in (prompts or [])]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise ValueError(f"`--prompts-file`: {prompts_file!r} does not exist.")
        with open(prompts_file, encoding="utf-8") as handle:
            collected += [line.strip() for line in handle if line.strip()]
    if any(not p.strip() for p in collected):
        raise ValueError("`--prompt`: empty scene prompt; every `--prompt` needs text.")
    if required and not collected:
        raise ValueError("No prompts: pass `--prompt` once per scene or `--prompts-file` (one prompt per line).")
    return collected


def read_output_folder(folder: str) -> OutputFolder:
    """Scenes (``uint8 (F, H, W, 3)``), prompts and saved latents of an output folder written by these commands."""
    if not os.path.isdir(folder):
        raise ValueError(f"`--from`: {folder!r} is not a folder written by `mask2dit generate`.")
    prompts_path = os.path.join(folder, PROMPTS_FILE)
    prompts = read_prompts(None, prompts_path) if os.path.isfile(prompts_path) else []
    paths = []
    while os.path.isfile(os.path.join(folder, scene_file(len(paths)))):
        paths.append(os.path.join(folder, scene_file(len(paths))))
    if not paths:
        raise ValueError(f"`--from`: {folder!r} has no {scene_file(0)}; pass a folder written by `mask2dit generate`.")
    if len(prompts) != len(paths):
        raise ValueError(f"`--from`: {folder!r} has {len(paths)} scene files but {len(prompts)} lines in {PROMPTS_FILE}.")
    scenes = [read_video(path) for path in paths]
    latents_path = os.path.join(folder, LATENTS_FILE)
    latents = load_latents(latents_path) if os.path.isfile(latents_path) else None
    if latents is not None and latents.pixel_frames != [len(scene) for scene in scenes]:
        raise ValueError(
            f"`--from`: {latents_path} describes scenes of {latents.pixel_frames} frames but the scene files have "
            f"{[len(scene) for scene in scenes]}; it belongs to another video (delete it to continue from the mp4s)."
        )
    return OutputFolder(scenes, prompts, paths, latents)
