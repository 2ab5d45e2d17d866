"""``mask2dit generate``, ``mask2dit extend`` and ``mask2dit demo``.

    mask2dit demo --out demo/                                   # tiny random model, offline, < 1 min on CPU
    mask2dit generate --prompt "scene 1" --prompt "scene 2" --prompt "scene 3" --out out/
    mask2dit extend --from out/ --prompt "scene 4" --out out_4/
    mask2dit generate --model THUDM/CogVideoX-5b --lora my-lora/ --scheduler CogVideoXDPMScheduler --prompts-file p.txt --out o/
    torchrun --nproc-per-node 8 -m diffusers_mask2dit.cli generate --ulysses-degree 4 --cfg-parallel --prompts-file p.txt --out o/

Every command writes to its output folder: ``scene_00.mp4``, ``scene_01.mp4``, ..., ``video.mp4`` (the scene files
joined without re-encoding), ``contact_sheet.png`` (one row per scene, labelled with its prompt; scenes made by
scene extension are marked), ``prompts.txt`` (one scene prompt per line) and ``latents.safetensors`` (every
scene's exact latents, which ``extend`` continues from). ``mask2dit evaluate`` reads these names.
Exit code: 0 ok, 2 bad input (one line on stderr naming the option and what it accepts).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .cli import DEVICE_CHOICES, check_device, fail, one_line
from .parallel import DEFAULT_COLLECTIVE_TIMEOUT, is_main_process, launched_by_torchrun
from .video_io import contact_sheet, join_videos, read_video, write_atomically, write_video

DEFAULT_MODEL = "qth/Mask2DiT"
WHOLE_VIDEO_FILE = "video.mp4"
CONTACT_SHEET_FILE = "contact_sheet.png"
PROMPTS_FILE = "prompts.txt"
LATENTS_FILE = "latents.safetensors"
LATENTS_FORMAT = "mask2dit-latents-1"
DTYPES = ("auto", "fp32", "fp16", "bf16")
# The schedulers diffusers' CogVideoX pipelines are made for (both read a CogVideoX scheduler config as it is).
SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
LORA_ADAPTER = "cli_lora"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MASK_CHOICES = "v1, v2, v3 or full (or the authors' numbers 1, 2, 3, 5)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The demo's default video (Shapes-world prompts): 3 scenes made together, a 4th added by scene extension.
DEMO_PROMPTS = [
    "a red circle moves right",
    "a blue square moves up",
    "a yellow triangle moves left",
    "a green circle moves down",
]


def scene_file(index: int) -> str:
    """``scene_00.mp4``, ``scene_01.mp4``, ... (two digits, from 0)."""
    return f"scene_{index:02d}.mp4"


# --------------------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------------------


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
) -> List[str]:
    """Write the standard output files for one video whose scenes are frames ``(F, H, W, 3)``; returns the paths.

    ``latents`` adds ``latents.safetensors`` (and marks extended scenes on the contact sheet); ``copied`` maps a
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
    paths = [join_videos(scene_paths, os.path.join(folder, WHOLE_VIDEO_FILE))] + scene_paths
    extended = latents.extended if latents is not None else [False] * len(scenes)
    labels = _scene_labels(prompts, extended)
    paths.append(contact_sheet(scenes, os.path.join(folder, CONTACT_SHEET_FILE), labels=labels, highlighted=extended))
    prompts_path = os.path.join(folder, PROMPTS_FILE)
    with open(prompts_path, "w", encoding="utf-8") as handle:
        handle.write("".join(" ".join(p.split()) + "\n" for p in prompts))  # one line per scene, whatever was typed
    paths.append(prompts_path)
    latents_path = os.path.join(folder, LATENTS_FILE)
    if latents is not None:
        paths.append(save_latents(latents_path, latents))
    elif os.path.exists(latents_path):
        os.remove(latents_path)  # it would describe another video
    return paths


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


# --------------------------------------------------------------------------------------------------
# Checking options: before loading the model where possible, against the model right after loading it
# --------------------------------------------------------------------------------------------------


def _check_int(args: argparse.Namespace, name: str, minimum: int, accepted: str) -> None:
    value = getattr(args, name, None)
    if value is not None and value < minimum:
        raise ValueError(f"`--{name.replace('_', '-')}` must be {accepted}; got {value}.")


def check_mask(value: Optional[str]) -> Optional[str]:
    """``--mask`` normalised (``"V2"`` -> ``"v2"``, the authors' ``5`` -> ``"full"``); errors echo it as typed."""
    from .layout import check_mask_variant

    if value is None:
        return None
    try:
        return check_mask_variant(value, "--mask")
    except ValueError:
        raise ValueError(f"`--mask` must be {MASK_CHOICES}; got {value!r}.") from None


def check_model_source(value: str, option: str = "--model") -> str:
    """A local folder, or a string shaped like a Hub id (``owner/name``); anything else is a missing folder."""
    if os.path.isdir(value):
        if option == "--model" and not any(
            os.path.isfile(os.path.join(value, name)) for name in ("model_index.json", "transformer/config.json")
        ):
            raise ValueError(
                f"`--model`: {value!r} holds neither model_index.json (a diffusers folder) nor transformer/config.json "
                "(the authors' release layout)."
            )
        return value
    if os.path.exists(value):
        raise ValueError(f"`{option}`: {value!r} is a file; pass a model folder or a Hub id (owner/name).")
    if not _HUB_ID.match(value):
        raise ValueError(f"`{option}`: folder {value!r} does not exist (and it is not a Hub id such as owner/name).")
    return value


def check_options(args: argparse.Namespace) -> None:
    """Every option that can be checked without the model; raises a ValueError naming the option."""
    _check_int(args, "steps", 1, "a whole number of denoising steps >= 1")
    _check_int(args, "frames", 1, "a positive frame count (1, 9, 17, ..., 49 for CogVideoX)")
    _check_int(args, "height", 1, "a positive multiple of 16 pixels (e.g. 480)")
    _check_int(args, "width", 1, "a positive multiple of 16 pixels (e.g. 720)")
    _check_int(args, "fps", 1, "a positive number of frames per second")
    _check_int(args, "seed", 0, "a whole number from 0 to 2**64 - 1")
    _check_int(args, "scenes_per_window", 2, ">= 2 (scene extension conditions on at least one earlier scene)")
    _check_int(args, "context_scenes", 1, ">= 1")
    if args.seed >= 2**64:
        raise ValueError(f"`--seed` must be a whole number from 0 to 2**64 - 1; got {args.seed}.")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise ValueError(f"`--guidance` must be a finite number >= 0 (<= 1 turns guidance off); got {args.guidance}.")
    if args.lora_scale is not None and (args.lora is None or not math.isfinite(args.lora_scale)):
        raise ValueError(f"`--lora-scale` needs `--lora` and a finite number; got {args.lora_scale}.")
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise ValueError(f"`--scheduler` must be one of {', '.join(SCHEDULERS)}; got {args.scheduler!r}.")
    if os.path.isfile(args.out):
        raise ValueError(f"`--out`: {args.out!r} is a file; pass a folder (it is created if missing).")
    args.mask = check_mask(args.mask)
    check_device(args.device)
    if getattr(args, "model", None) is not None:
        check_model_source(args.model)
    if args.transformer is not None:
        transformer_folder(args.transformer)
    if args.lora is not None:
        lora_source(args.lora)
    check_parallel_options(args)


def wants_parallel(args: argparse.Namespace) -> bool:
    return getattr(args, "ulysses_degree", 1) > 1 or getattr(args, "cfg_parallel", False)


def check_parallel_options(args: argparse.Namespace) -> None:
    """``--ulysses-degree``, ``--cfg-parallel`` and ``--collective-timeout``: one process per device, from torchrun."""
    _check_int(args, "ulysses_degree", 1, "a whole number >= 1 (processes that share one video's sequence)")
    _check_int(args, "collective_timeout", 1, "a whole number of seconds >= 1")
    if not wants_parallel(args):
        return
    if not launched_by_torchrun():
        raise ValueError(
            "`--ulysses-degree`/`--cfg-parallel` need one process per GPU: launch with `torchrun --nproc-per-node N "
            "-m diffusers_mask2dit.cli generate ...` (N = ulysses degree x 2 with --cfg-parallel)."
        )
    processes = int(os.environ["WORLD_SIZE"])
    cfg_degree = 2 if args.cfg_parallel else 1
    if args.ulysses_degree * cfg_degree != processes:
        raise ValueError(
            f"`--ulysses-degree` ({args.ulysses_degree}) x {cfg_degree} (`--cfg-parallel`) must equal the number of "
            f"processes torchrun started ({processes})."
        )
    if args.cfg_parallel and args.guidance <= 1:
        raise ValueError(f"`--cfg-parallel` needs classifier-free guidance (`--guidance` > 1); got {args.guidance}.")
    if args.cpu_offload:
        raise ValueError("`--cpu-offload` cannot be combined with `--ulysses-degree`/`--cfg-parallel`.")


def _valid_frame_counts(pipe) -> str:
    counts = [frames for frames in range(1, 200) if pipe.is_valid_num_frames(frames)]
    return ", ".join(str(c) for c in counts[:7]) + ", ..."


def check_model_options(pipe, args: argparse.Namespace) -> None:
    """``--frames``, ``--height`` and ``--width`` against the loaded model, before anything is generated."""
    if args.frames is not None and not pipe.is_valid_num_frames(args.frames):
        raise ValueError(
            f"`--frames` must be a frame count this model's VAE decodes back exactly ({_valid_frame_counts(pipe)}); "
            f"got {args.frames}."
        )
    factor = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % factor:
            lower = max(factor, value // factor * factor)
            raise ValueError(
                f"`--{name}` must be a positive multiple of {factor} pixels for this model; got {value} "
                f"(nearest: {lower} and {lower + factor})."
            )


def check_context_size(args: argparse.Namespace, folder: OutputFolder) -> None:
    """New scenes take the size of the context scenes: ``--height``/``--width`` may only repeat it."""
    height, width = folder.scenes[-1].shape[1:3]
    for name, size in (("height", height), ("width", width)):
        value = getattr(args, name)
        if value is not None and value != size:
            raise ValueError(
                f"`--{name}` {value} does not match the scenes in --from ({height}x{width} pixels): new scenes keep the "
                f"context's size; omit --height/--width or pass --height {height} --width {width}."
            )


def context_scene_count(requested: Optional[int], available: int) -> int:
    """``--context-scenes``: default ``min(2, scenes in --from)``; more than the folder holds is an error."""
    if requested is None:
        return min(2, available)
    if requested > available:
        raise ValueError(f"`--context-scenes` is {requested} but --from holds only {available} scene(s); pass 1 to {available}.")
    return requested


# --------------------------------------------------------------------------------------------------
# Loading the pipeline and what the options add to it
# --------------------------------------------------------------------------------------------------


def resolve_device_dtype(device: str, dtype: str):
    """``--device auto`` -> cuda if available else cpu; ``--dtype auto`` -> bf16 on cuda, fp32 elsewhere."""
    import torch

    device = check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in DTYPES:
        raise ValueError(f"`--dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if dtype == "auto":
        dtype = "bf16" if str(device).startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def transformer_folder(path: str) -> "tuple[str, Optional[str]]":
    """``--transformer``: ``(folder, subfolder)`` of a transformer saved with ``save_pretrained`` (a trainer's full
    fine-tune: its output folder, which has ``transformer/``, or that folder itself)."""
    for subfolder in ("transformer", None):
        if os.path.isfile(os.path.join(path, subfolder or "", "config.json")):
            return path, subfolder
    if not os.path.isdir(path):
        raise ValueError(f"`--transformer`: folder {path!r} does not exist.")
    raise ValueError(
        f"`--transformer`: {path!r} has no config.json nor transformer/config.json; pass the output folder of a full "
        "fine-tune (`mask2dit train` with finetune: full) or a folder written by the transformer's save_pretrained."
    )


def lora_source(path: str) -> "tuple[str, Dict[str, str]]":
    """``--lora``: ``(folder or Hub id, load_lora_weights keyword arguments)`` for a LoRA saved by the trainer
    (a folder with pytorch_lora_weights.safetensors), one .safetensors file, or a Hub id."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"`--lora`: {path!r} is not a .safetensors file; pass the file or the folder holding it.")
        return os.path.dirname(os.path.abspath(path)), {"weight_name": os.path.basename(path)}
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
            raise ValueError(
                f"`--lora`: {path!r} has no {LORA_WEIGHT_NAME}; pass the output folder of a LoRA run of `mask2dit "
                "train` or the .safetensors file itself."
            )
        return path, {}
    check_model_source(path, "--lora")
    return path, {}


def load_transformer(path: str, dtype):
    """The transformer of ``--transformer`` in ``dtype``."""
    from .release_loading import DIFFUSERS_DTYPE_KWARG  # `dtype` or `torch_dtype`, whichever this diffusers takes
    from .transformer import Mask2DiTTransformer3DModel

    folder, subfolder = transformer_folder(path)
    try:
        return Mask2DiTTransformer3DModel.from_pretrained(folder, subfolder=subfolder, **{DIFFUSERS_DTYPE_KWARG: dtype})
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"`--transformer`: could not load {path!r}: {one_line(error)}") from error


def _check_transformer_fits(pipe, option: str) -> None:
    """A transformer made for another VAE or text encoder would fail deep inside torch: say so up front."""
    config = pipe.transformer.config
    expected = {
        "in_channels": getattr(getattr(pipe.vae, "config", None), "latent_channels", None),
        "text_embed_dim": getattr(getattr(pipe.text_encoder, "config", None), "d_model", None),
    }
    for key, value in expected.items():
        if value is not None and config.get(key) != value:
            raise ValueError(
                f"`{option}`: the transformer has {key}={config.get(key)} but this model's "
                f"{'VAE' if key == 'in_channels' else 'text encoder'} needs {value}; it was trained for another model."
            )


def apply_lora(pipe, path: str, scale: Optional[float]) -> None:
    """Load ``--lora`` into the pipeline's transformer and set its ``--lora-scale`` (default 1)."""
    source, kwargs = lora_source(path)
    try:
        pipe.load_lora_weights(source, adapter_name=LORA_ADAPTER, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"`--lora`: could not apply {path!r} to this model: {one_line(error)}") from error
    pipe.set_adapters([LORA_ADAPTER], [1.0 if scale is None else scale])


def finish_pipeline(pipe, args: argparse.Namespace, device: str, dtype, description: str):
    """What the options add to a loaded pipeline: scheduler, LoRA, dtype, device, memory options, progress bar,
    parallel inference (one process per GPU: this process's device, progress bars on rank 0 only)."""
    import diffusers
    import torch

    from .parallel import enable_parallel_inference, init_parallel

    if wants_parallel(args):
        device = init_parallel(torch.device(device).type, args.collective_timeout)

    _check_transformer_fits(pipe, "--transformer" if args.transformer else "--model")
    if args.scheduler is not None:
        pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    if pipe.transformer.dtype != dtype:
        pipe.to(dtype=dtype)
    if args.lora is not None:
        apply_lora(pipe, args.lora, args.lora_scale)
    if getattr(args, "cpu_offload", False):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if getattr(args, "vae_tiling", False):
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(desc=description)
    if wants_parallel(args):
        enable_parallel_inference(pipe, args.ulysses_degree, args.cfg_parallel)
    return pipe


def load_pipeline(args: argparse.Namespace, description: str = "denoising"):
    """The pipeline of ``--model`` (with ``--transformer``, ``--scheduler``, ``--lora``) on ``--device``."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    pipe = _from_pretrained(check_model_source(args.model), args, dtype, f"`--model`: could not load {args.model!r}")
    return finish_pipeline(pipe, args, device, dtype, description)


def _from_pretrained(source: str, args: argparse.Namespace, dtype, failure: str):
    """``Mask2DiTPipeline.from_pretrained(source)`` with ``--transformer`` (if given) in place of the folder's own,
    which is then never loaded; a folder that does not load is a ValueError starting with ``failure``."""
    from .pipeline import Mask2DiTPipeline

    components = {"transformer": load_transformer(args.transformer, dtype)} if args.transformer else {}
    try:
        return Mask2DiTPipeline.from_pretrained(source, dtype=dtype, **components)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{failure}: {one_line(error)}") from error


def demo_defaults(args: argparse.Namespace, prompts: List[str]) -> List[str]:
    """Fill in the demo model's sampling defaults (``--steps``, ``--guidance``) and, for the Shapes model, check
    that every prompt is in its world's vocabulary; returns the prompts as the model reads them."""
    if args.random_weights:
        args.steps = 4 if args.steps is None else args.steps
        args.guidance = 6.0 if args.guidance is None else args.guidance
        return prompts
    from .shapes import model as shapes_model
    from .shapes.world import parse_prompt

    for index, prompt in enumerate(prompts):
        parse_prompt(prompt, f"--prompt {index + 1}")
    args.steps = shapes_model.NUM_INFERENCE_STEPS if args.steps is None else args.steps
    args.guidance = shapes_model.GUIDANCE_SCALE if args.guidance is None else args.guidance
    return [" ".join(prompt.lower().split()) for prompt in prompts]


def demo_pipeline(args: argparse.Namespace):
    """The demo's model: the Shapes-world Mask²DiT shipped in the package, or (``--random-weights``) a tiny
    random-weight CogVideoX built offline in the ``--style`` asked for."""
    from .pipeline import Mask2DiTPipeline

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if not args.random_weights:
        from .shapes.model import shipped_model_path

        pipe = _from_pretrained(shipped_model_path(), args, dtype, "the Shapes model shipped in the package could not be loaded")
        return finish_pipeline(pipe, args, device, dtype, "demo")
    from .tiny import build_tiny_components

    components = build_tiny_components(style=args.style, seed=args.seed)
    if args.transformer:
        components["transformer"] = load_transformer(args.transformer, dtype)
    return finish_pipeline(Mask2DiTPipeline(**components), args, device, dtype, "demo")


# --------------------------------------------------------------------------------------------------
# Generating
# --------------------------------------------------------------------------------------------------


def _generator(device: Any, seed: int):
    import torch

    return torch.Generator(device="cpu" if getattr(device, "type", device) == "mps" else device).manual_seed(seed)


def _call_options(args: argparse.Namespace, default_steps: int = 50) -> dict:
    options = dict(
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=default_steps if args.steps is None else args.steps,
        guidance_scale=args.guidance,
        output_type="latent",  # decoded below: the exact latents are saved too
    )
    if args.mask is not None:
        options["attention_kwargs"] = {"scene_mask": args.mask}
    return options


def _decode(pipe, scene_latents: Sequence[Any]) -> List[np.ndarray]:
    """Decode one video's scene latents, each ``(F_i, C, h, w)``, to frames in [0, 1] ``(F, H, W, 3)``."""
    import torch

    latents = torch.cat(list(scene_latents), dim=0)[None]
    _, scenes = pipe.decode_scenes(latents, [s.shape[0] for s in scene_latents], output_type="np")
    return list(scenes[0])


def generate_scenes(pipe, prompts: List[str], args: argparse.Namespace, default_steps: int = 50):
    """All scenes of one video: one pass for up to ``--scenes-per-window`` prompts, then scene extension.

    Returns ``(scenes, latents)``: frames in [0, 1] per scene and the `SavedLatents` of the video.
    """
    import torch

    options = _call_options(args, default_steps)
    if args.frames is not None and not pipe.is_valid_num_frames(args.frames):
        # The pipeline takes any count for one scene (as CogVideoXPipeline); written scenes must re-encode exactly.
        raise ValueError(
            f"`num_frames` must be a count the VAE decodes back exactly (1, 9, 17, ..., 49) so that `mask2dit extend "
            f"--from` can continue from the written scenes; got {args.frames}."
        )
    generator = _generator(pipe._execution_device, args.seed)
    window = args.scenes_per_window
    if len(prompts) <= window:
        output = pipe(prompt=prompts, generator=generator, **options)
    else:
        output = pipe.generate_long(prompts, scenes_per_window=window, generator=generator, **options)
    scene_latents = list(output.scene_frames[0])
    scenes = _decode(pipe, scene_latents)
    latents = SavedLatents(
        latents=torch.cat(scene_latents, dim=0)[None],
        latent_frames=[s.shape[0] for s in scene_latents],
        pixel_frames=[len(scene) for scene in scenes],
        extended=[index >= window for index in range(len(prompts))],
    )
    return scenes, latents


def folder_latents(pipe, folder: OutputFolder) -> SavedLatents:
    """The exact latents saved in ``--from``; without them, the scenes' mp4 frames encoded with the VAE (a note says
    so: H.264 changed the frames slightly, so the continuation is close but not exact)."""
    if folder.latents is not None:
        return folder.latents
    print(
        f"mask2dit extend: note: {os.path.dirname(folder.scene_paths[0]) or '.'} has no {LATENTS_FILE}; the scenes "
        "are encoded again from their mp4 files, which H.264 changed slightly.",
        file=sys.stderr,
    )
    frames = [scene.astype(np.float32) / 255.0 for scene in folder.scenes]  # the pipeline takes floats in [0, 1]
    latents, pixel_frames = pipe.encode_video_scenes(frames)
    latent_frames = [pipe.latent_frames(count) for count in pixel_frames]
    return SavedLatents(latents, latent_frames, pixel_frames, [False] * len(folder.scenes))


def extend_scenes(pipe, folder: OutputFolder, new_prompts: List[str], context_count: int, args: argparse.Namespace):
    """New scenes conditioned on the last ``context_count`` scenes' latents.

    Returns ``(new scenes, SavedLatents of the whole longer video)``; the context latents in it are those the
    pipeline returns, which it keeps unchanged.
    """
    import torch

    saved = folder_latents(pipe, folder)
    context_frames = sum(saved.latent_frames[-context_count:])
    output = pipe.extend(
        prompt=new_prompts,
        context_prompts=folder.prompts[-context_count:],
        context_latents=saved.latents[:, saved.latents.shape[1] - context_frames :],
        context_num_frames=saved.pixel_frames[-context_count:],
        num_new_scenes=len(new_prompts),
        generator=_generator(pipe._execution_device, args.seed),
        **_call_options(args),  # --height/--width default to the context scenes' size
    )
    new_latents = list(output.scene_frames[0][context_count:])
    new_scenes = _decode(pipe, new_latents)
    earlier = saved.latents[:, : saved.latents.shape[1] - context_frames].to(output.frames)
    latents = SavedLatents(
        latents=torch.cat([earlier, output.frames[:1]], dim=1),
        latent_frames=saved.latent_frames + [s.shape[0] for s in new_latents],
        pixel_frames=saved.pixel_frames + [len(scene) for scene in new_scenes],
        extended=saved.extended + [True] * len(new_prompts),
    )
    return new_scenes, latents


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def _progress_label(first: int, last: int, total: int, extension: bool = False) -> str:
    """``scenes 1-3/4`` or ``scene 4/4``, as `generate_long` labels its bars."""
    scenes = f"scene {first}/{total}" if first == last else f"scenes {first}-{last}/{total}"
    return scenes + (" (extension)" if extension else "")


def run_generate(args: argparse.Namespace) -> int:
    try:
        check_options(args)
        prompts = read_prompts(args.prompt, args.prompts_file)
        pipe = load_pipeline(args, _progress_label(1, min(len(prompts), args.scenes_per_window), len(prompts)))
        check_model_options(pipe, args)
        scenes, latents = generate_scenes(pipe, prompts, args)
        if not is_main_process():  # parallel inference: every process holds the video; the first writes it
            return 0
        save_outputs(args.out, scenes, prompts, args.fps, latents=latents)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return fail("generate", error)
    print(f"Wrote {len(scenes)} scenes to {args.out}: {WHOLE_VIDEO_FILE}, scene_XX.mp4, {CONTACT_SHEET_FILE}, "
          f"{PROMPTS_FILE}, {LATENTS_FILE}")
    return 0


def run_extend(args: argparse.Namespace) -> int:
    try:
        check_options(args)
        new_prompts = read_prompts(args.prompt, args.prompts_file)
        folder = read_output_folder(args.source)
        context_count = context_scene_count(args.context_scenes, len(folder.scenes))
        check_context_size(args, folder)
        total = len(folder.scenes) + len(new_prompts)
        pipe = load_pipeline(args, _progress_label(len(folder.scenes) + 1, total, total, extension=True))
        check_model_options(pipe, args)
        new_scenes, latents = extend_scenes(pipe, folder, new_prompts, context_count, args)
        if not is_main_process():  # parallel inference: every process holds the video; the first writes it
            return 0
        copied = dict(enumerate(folder.scene_paths))  # earlier scenes: their files, unchanged
        save_outputs(args.out, folder.scenes + new_scenes, folder.prompts + new_prompts, args.fps, latents, copied)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return fail("extend", error)
    print(f"Wrote {len(folder.scenes)} + {len(new_prompts)} scenes to {args.out}")
    return 0


DEMO_RANDOM_NOTE = ("mask2dit demo: tiny RANDOM-weight model built offline. The videos are noise: this shows the machinery "
                    "(multi-scene generation + scene extension), not quality. Use `mask2dit generate` with real weights.")
DEMO_SHAPES_NOTE = ("mask2dit demo: the Shapes-world Mask²DiT shipped with the package (trained on a CPU with `mask2dit "
                    "train`): one background shared by all scenes, each scene follows its own prompt (docs/shapes.md).")


def run_demo(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args.prompt, args.prompts_file, required=False) or list(DEMO_PROMPTS)
        prompts = demo_defaults(args, prompts)
        if is_main_process():
            print(DEMO_RANDOM_NOTE if args.random_weights else DEMO_SHAPES_NOTE)
        check_options(args)
        if args.web:  # the Space's page on this machine (hub/space.py), instead of files
            from .hub.space import serve_demo
            return serve_demo(demo_pipeline(args), output_root=args.out, examples=prompts, steps=args.steps, guidance=args.guidance)
        start = time.time()
        pipe = demo_pipeline(args)
        check_model_options(pipe, args)
        # The first `--scenes-per-window` scenes come from one pass, the rest from scene extension.
        scenes, latents = generate_scenes(pipe, prompts, args)
        if not is_main_process():  # parallel inference: every process holds the video; the first writes it
            return 0
        save_outputs(args.out, scenes, prompts, args.fps, latents=latents)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return fail("demo", error)
    how = (
        f"{args.scenes_per_window} at once, then extended one at a time"
        if len(scenes) > args.scenes_per_window
        else "at once"
    )
    print(f"Wrote {len(scenes)} scenes ({how}) to {args.out} in {time.time() - start:.1f}s: {WHOLE_VIDEO_FILE}, "
          f"scene_XX.mp4, {CONTACT_SHEET_FILE}, {PROMPTS_FILE}, {LATENTS_FILE}")
    return 0


# --------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser, model: bool) -> None:
    if model:
        parser.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"model folder or Hub id (default: {DEFAULT_MODEL}; CogVideoX ids such as THUDM/CogVideoX-5b work too)",
        )
    parser.add_argument(
        "--transformer", help="a full fine-tune's transformer: the `mask2dit train` output folder or a transformer folder"
    )
    parser.add_argument("--lora", help="LoRA to apply: a `mask2dit train` output folder, a .safetensors file or a Hub id")
    parser.add_argument("--lora-scale", type=float, default=None, help="strength of --lora (default: 1.0)")
    parser.add_argument("--scheduler", help=f"diffusers scheduler class: {', '.join(SCHEDULERS)} (default: the model's)")
    parser.add_argument("--device", default="auto", help=f"torch device: {DEVICE_CHOICES} (default: auto = cuda if available)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (default: bf16 on cuda, fp32 on cpu)"
    )
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (less GPU memory)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory)")
    parser.add_argument(
        "--ulysses-degree", type=int, default=1,
        help="under torchrun: processes (GPUs) that share each video's sequence, Ulysses context parallelism (default: 1)",
    )
    parser.add_argument(
        "--cfg-parallel", action="store_true",
        help="under torchrun: run the guidance passes (unconditional, conditional) on two groups of processes",
    )
    parser.add_argument(
        "--collective-timeout", type=int, default=DEFAULT_COLLECTIVE_TIMEOUT,
        help=f"under torchrun: seconds a process waits for the others before the run stops with an error "
        f"(default: {DEFAULT_COLLECTIVE_TIMEOUT})",
    )


def _add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    parser.add_argument("--prompt", action="append", default=[], help="one scene prompt; repeat once per scene, in order")
    parser.add_argument("--prompts-file", help="text file with one scene prompt per line (after any --prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every scene (default: none)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed, 0 to 2**64 - 1 (default: 0)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: 50; demo: the model's)")
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's, 480)")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's, 720)")
    parser.add_argument(
        "--frames", type=int, default=None, help="pixel frames per scene: 1, 9, 17, ..., 49 (default: the model's, 49)"
    )
    parser.add_argument(
        "--guidance", type=float, default=6.0, help="classifier-free guidance scale; <= 1 turns it off (default: 6.0; demo: the model's)"
    )
    parser.add_argument("--mask", default=None, help=f"scene attention mask: {MASK_CHOICES} (default: the model's, v2)")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of the written videos (default: 8)")
    _add_model_options(parser, model)


def _ends_parallel(run):
    """``run``, then the end of torch.distributed when the parallel options started it."""

    def command(args: argparse.Namespace) -> int:
        from .parallel import end_parallel

        try:
            return run(args)
        finally:
            if wants_parallel(args):
                end_parallel()

    command.__name__ = run.__name__
    return command


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``generate``, ``extend`` and ``demo`` to the ``mask2dit`` dispatcher."""
    generate = subparsers.add_parser(
        "generate",
        help="generate a multi-scene video, one prompt per scene",
        description="Generate one video with one scene per prompt. Up to --scenes-per-window scenes are made in one "
        "pass; longer lists continue by scene extension over a sliding window. Writes the scenes' exact latents "
        f"({LATENTS_FILE}) beside the videos, for `mask2dit extend`.",
    )
    _add_common(generate)
    generate.add_argument("--scenes-per-window", type=int, default=3, help="scenes the model sees at once, >= 2 (default: 3)")
    generate.set_defaults(func=_ends_parallel(run_generate))

    extend = subparsers.add_parser(
        "extend",
        help="add scenes to a video written by `generate`",
        description=f"Generate new scene(s) conditioned on the last scenes of an output folder, from their exact "
        f"latents ({LATENTS_FILE}; without it, from the mp4 frames, with a note). Writes the whole longer video to "
        "--out: the earlier scene files copied unchanged, then the new ones. New scenes keep the context's size.",
    )
    extend.add_argument(
        "--from", dest="source", required=True, help=f"output folder of `generate` (scene_XX.mp4, prompts.txt, {LATENTS_FILE})"
    )
    extend.add_argument(
        "--context-scenes", type=int, default=None, help="last scenes used as context, >= 1 (default: 2, or 1 if --from has one)"
    )
    _add_common(extend)
    extend.set_defaults(func=_ends_parallel(run_extend))

    demo = subparsers.add_parser(
        "demo",
        help="multi-scene generation + scene extension offline with the Shapes-world model shipped in the package",
        description="Generate 3 scenes together with the small Shapes-world Mask²DiT shipped in the package, extend "
        "by one more, and write the standard outputs, in seconds on a CPU. Prompts are 'a {red,green,blue,yellow} "
        "{circle,square,triangle} moves {left,right,up,down}'. --random-weights: a tiny random CogVideoX instead.",
    )
    _add_common(demo, model=False)
    demo.set_defaults(guidance=None)  # the model's own: 3.0 for the Shapes model, 6.0 with --random-weights
    demo.add_argument("--random-weights", action="store_true", help="a tiny random-weight CogVideoX (noise: the machinery only)")
    demo.add_argument("--style", default="5b", choices=("5b", "2b", "1.5"), help="--random-weights model style (default: 5b)")
    demo.add_argument("--web", action="store_true", help="serve the Gradio page on 127.0.0.1:7860 (GRADIO_SERVER_NAME/PORT change it); each job is written to --out/job-*")
    demo.add_argument("--scenes-per-window", type=int, default=3, help="scenes generated at once, >= 2 (default: 3)")
    demo.set_defaults(func=_ends_parallel(run_demo))
