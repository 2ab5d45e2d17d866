"""Checking ``mask2dit generate`` / ``extend`` options: every one that can be checked before loading the model, then
the sizes against the loaded model. Each error names the option and what it accepts."""

from __future__ import annotations

import argparse
import math
import os
from typing import List, Optional

from ..attention import check_backend_name, get_attention_backend
from ..cli_utils import check_device
from ..optimization import optimizations_from_args
from ..parallel import launched_by_torchrun
from .loading import SCHEDULERS, check_model_source, lora_source, resolve_device_dtype, transformer_folder, wants_parallel
from .outputs import OutputFolder

MASK_CHOICES = "v1, v2, v3 or full (or the authors' numbers 1, 2, 3, 5)"


def _check_int(args: argparse.Namespace, name: str, minimum: int, accepted: str) -> None:
    value = getattr(args, name, None)
    if value is not None and value < minimum:
        raise ValueError(f"`--{name.replace('_', '-')}` must be {accepted}; got {value}.")


def check_mask(value: Optional[str]) -> Optional[str]:
    """``--mask`` normalised (``"V2"`` -> ``"v2"``, the authors' ``5`` -> ``"full"``); errors echo it as typed."""
    from ..layout import check_mask_variant

    if value is None:
        return None
    try:
        return check_mask_variant(value, "--mask")
    except ValueError:
        raise ValueError(f"`--mask` must be {MASK_CHOICES}; got {value!r}.") from None


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
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 0):
        raise ValueError(f"`--guidance` must be a finite number >= 0 (<= 1 turns guidance off); got {args.guidance}.")
    _check_int(args, "max_sequence_length", 1, "a positive number of text tokens (226 for CogVideoX)")
    _check_int(args, "num_videos", 1, "a whole number of videos >= 1")
    check_lora_scales(args.lora, args.lora_scale)
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
    for lora in args.lora or ():
        lora_source(lora)
    if args.attention_backend is not None:
        check_backend_name(args.attention_backend, "--attention-backend")
    check_parallel_options(args)
    optimizations_from_args(args)  # --compile, --quantize, --offload, --cache: values and what this machine can run


def check_lora_scales(loras: Optional[List[str]], scales: Optional[List[float]]) -> None:
    """``--lora-scale``: finite, and none or one per ``--lora``."""
    for scale in scales or ():
        if not loras or not math.isfinite(scale):
            raise ValueError(f"`--lora-scale` needs `--lora` and a finite number; got {scale}.")
    if scales and len(scales) != len(loras):
        raise ValueError(
            f"`--lora-scale` is given {len(scales)} times for {len(loras)} `--lora`; give one --lora-scale per "
            "--lora (in the same order) or none (1.0 each)."
        )


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
    if args.offload not in (None, "none"):
        raise ValueError(f"`--offload {args.offload}` cannot be combined with `--ulysses-degree`/`--cfg-parallel`.")
    if getattr(args, "num_videos", 1) > 1:  # each finished scene is written as one video's as its window ends
        raise ValueError("`--num-videos` makes one video per run under `--ulysses-degree`/`--cfg-parallel`; leave it out.")
    if args.cfg_parallel and args.guidance is not None and args.guidance <= 1:  # a given value: refused before loading
        raise ValueError(f"`--cfg-parallel` needs classifier-free guidance (`--guidance` > 1); got {args.guidance}.")


def _valid_frame_counts(pipe) -> str:
    counts = [frames for frames in range(1, 200) if pipe.is_valid_num_frames(frames)]
    return ", ".join(str(c) for c in counts[:7]) + ", ..."


def check_model_options(pipe, args: argparse.Namespace) -> None:
    """``--frames``, ``--height``, ``--width`` and ``--cfg-parallel`` against the loaded model (its sizes and
    guidance default), before anything is generated."""
    guidance = pipe.generation_defaults.get("guidance_scale", 6.0) if args.guidance is None else args.guidance
    if getattr(args, "cfg_parallel", False) and guidance <= 1:
        raise ValueError(f"`--cfg-parallel` needs classifier-free guidance (`--guidance` > 1); got {guidance}.")
    if args.frames is not None and not pipe.is_valid_num_frames(args.frames):
        raise ValueError(
            f"`--frames` must be a frame count this model's VAE decodes back exactly ({_valid_frame_counts(pipe)}); "
            f"got {args.frames}."
        )
    check_backend_runs(pipe, args.attention_backend, resolve_device_dtype(args.device, args.dtype)[1])
    factor = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % factor:
            lower = max(factor, value // factor * factor)
            raise ValueError(
                f"`--{name}` must be a positive multiple of {factor} pixels for this model; got {value} "
                f"(nearest: {lower} and {lower + factor})."
            )


def check_backend_runs(pipe, backend: Optional[str], dtype) -> None:
    """``--attention-backend`` named explicitly must run on the pipeline's device and compute ``dtype`` (``auto``
    finds one that does)."""
    import torch

    if backend in (None, "auto"):
        return
    head_dim = pipe.transformer.config.attention_head_dim
    query = torch.empty(1, 1, 1, head_dim, device=pipe._execution_device, dtype=dtype)
    reason = get_attention_backend(backend).unmet_constraint(query)
    if reason is not None:
        raise ValueError(f"`--attention-backend {backend}` cannot run here: {reason}; use `--attention-backend auto`.")


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
