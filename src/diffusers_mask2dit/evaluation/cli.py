"""``mask2dit evaluate``: score one generated multi-scene video or a folder of samples.

    mask2dit evaluate --video out/ --clip path/to/clip                     # out/scene_*.mp4 + out/prompts.txt
    mask2dit evaluate --video one.mp4 --scene-frames 49,49,49 --prompts p.txt --clip path/to/clip
    mask2dit evaluate --batch samples/ --clip path/to/clip                 # one subfolder per sample
    mask2dit evaluate --video out/ --tiny-clip                             # offline try-out: tiny random CLIP
    mask2dit evaluate --video out/ --shapes                                # Shapes-world videos: exact scorer

Prints a table and writes JSON (``--output``; default ``<folder>/metrics.json``, ``<video>_metrics.json`` beside a
single file, or ``<batch root>/metrics_summary.json``). Exit code: 0 ok, 1 some batch samples failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from ..cli_utils import check_device, fail
from . import core
from .metrics import METRIC_KEYS

_PERCENT_KEYS = {"cscv", "cscv_within_scene"}  # these are ratios, the rest percentages


def _fmt(key: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if key in _PERCENT_KEYS else f"{value:.2f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain left-aligned text table."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def result_table(result: Dict[str, Any]) -> str:
    """Metric table plus a per-scene table for one :func:`evaluate_scenes` result."""
    metric_rows = [[key, _fmt(key, result[key])] for key in METRIC_KEYS]
    scene_rows = [
        [
            str(i),
            str(scene["frames"]),
            _fmt("semantic", scene["semantic"]),
            _fmt("cscv", scene["cscv"]),
            _fmt("smoothness", scene["smoothness"]),
            _fmt("pixel_smoothness", scene["pixel_smoothness"]),
            scene["prompt"] if len(scene["prompt"]) <= 48 else scene["prompt"][:45] + "...",
        ]
        for i, scene in enumerate(result["per_scene"])
    ]
    return (
        format_table(["metric", "value"], metric_rows)
        + "\n\n"
        + format_table(["scene", "frames", "semantic", "cscv", "smoothness", "pixel_smooth", "prompt"], scene_rows)
    )


def summary_table(summary: Dict[str, Dict[str, Any]], method: str) -> str:
    """Batch table: mean, 95% interval, std and n per metric."""
    rows = []
    for key in METRIC_KEYS:
        if key not in summary:
            continue
        stats = summary[key]
        interval = "n/a" if stats["low"] is None else f"[{_fmt(key, stats['low'])}, {_fmt(key, stats['high'])}]"
        rows.append([key, _fmt(key, stats["mean"]), interval, _fmt(key, stats["std"]), str(stats["n"])])
    label = "95% CI (t)" if method == "t" else "95% CI (normal)"
    return format_table(["metric", "mean", label, "std", "n"], rows)


def write_json(data: Any, path: str) -> str:
    """Write ``data`` as indented JSON through a temporary file in the target folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, ensure_ascii=False)
            stream.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _default_output(args: argparse.Namespace) -> str:
    if args.batch:
        return os.path.join(args.batch, "metrics_summary.json")
    if os.path.isdir(args.video):
        return os.path.join(args.video, "metrics.json")
    stem = os.path.splitext(os.path.abspath(args.video))[0]
    return stem + "_metrics.json"


TINY_CLIP = "tiny-random-clip"  # what the JSON records as `clip` with --tiny-clip
SHAPES_SCORER = "shapes-scorer"  # ... and with --shapes


def _encoder_name(args: argparse.Namespace) -> str:
    return args.clip or (SHAPES_SCORER if args.shapes else TINY_CLIP)


def _load_encoder(args: argparse.Namespace):
    from .encoders import CLIPVideoEncoder, registered_encoder, save_tiny_clip

    if args.shapes:  # registered by the Shapes world's command module (`mask2dit demo`), which the CLI loads
        return registered_encoder(SHAPES_SCORER)
    options = dict(device=args.device, frames_per_scene=args.frames_per_scene, batch_size=args.batch_size)
    if not args.tiny_clip:
        return CLIPVideoEncoder.from_pretrained(args.clip, **options)
    print("mask2dit evaluate: --tiny-clip: a tiny RANDOM-weight CLIP built offline; the scores show the machinery "
          "and mean nothing. Pass --clip with a real CLIP model to measure.")
    with tempfile.TemporaryDirectory() as folder:
        return CLIPVideoEncoder.from_pretrained(save_tiny_clip(folder), local_files_only=True, **options)


def _run_single(args: argparse.Namespace, scene_frames: Optional[List[int]]) -> int:
    scenes = core.load_scenes(args.video, scene_frames)
    prompts_path = args.prompts or core.default_prompts_path(args.video)
    prompts = core.read_prompts(prompts_path)
    if len(prompts) != len(scenes):
        raise ValueError(
            f"`prompts`: {prompts_path} has {len(prompts)} prompts but the video has {len(scenes)} scenes; "
            "give one prompt per line per scene."
        )
    encoder = _load_encoder(args)
    result = core.evaluate_scenes(scenes, prompts, encoder, frame_stride=args.frame_stride)
    result = {"video": args.video, "prompts_file": prompts_path, "clip": _encoder_name(args), **result}
    output = args.output or _default_output(args)
    write_json(result, output)
    print(f"Mask²DiT evaluation of {args.video} ({result['num_scenes']} scenes, frames {result['scene_frames']})")
    print(result_table(result))
    print(f"\nwrote {output}")
    return 0


def _run_batch(args: argparse.Namespace, scene_frames: Optional[List[int]]) -> int:
    core.sample_folders(args.batch)  # fail fast before loading the model
    prompts = core.read_prompts(args.prompts) if args.prompts else None
    encoder = _load_encoder(args)

    def report(folder: str, error: Exception) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"skipped {folder}: {error}", file=sys.stderr)

    batch = core.evaluate_batch(
        args.batch,
        encoder,
        prompts=prompts,
        scene_frames=scene_frames,
        frame_stride=args.frame_stride,
        method=args.interval,
        progress=not args.no_progress,
        on_error=report,
    )
    batch = {"root": args.batch, "clip": _encoder_name(args), **batch}
    output = args.output or _default_output(args)
    write_json(batch, output)
    print(f"Mask²DiT evaluation of {len(batch['samples'])} samples in {args.batch} ({len(batch['failed'])} failed)")
    if batch["summary"]:
        print(summary_table(batch["summary"], args.interval))
    print(f"\nwrote {output}")
    return 1 if batch["failed"] else 0


# The Python API's parameter names in error messages -> the options a command-line user typed.
_OPTION_NAMES = {
    "`video`": "`--video`",
    "`scene_frames`": "`--scene-frames`",
    "`scenes_frames`": "`--video` (its scenes)",
    "`prompts`": "`--prompts`",
    "`batch`": "`--batch`",
    "`path_or_id`": "`--clip`",
}


def _with_option_names(error: Exception) -> str:
    message = str(error)
    for name, option in _OPTION_NAMES.items():
        message = message.replace(name, option)
    return message


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mask2dit evaluate``; returns the exit code."""
    try:
        if check_device(args.device) == "auto":
            args.device = None  # CLIPVideoEncoder's default: cuda if available, else cpu
        for name in ("frames_per_scene", "frame_stride", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1; got {getattr(args, name)}.")
        scene_frames = core.parse_scene_frames(args.scene_frames) if args.scene_frames else None
        if args.batch:
            return _run_batch(args, scene_frames)
        return _run_single(args, scene_frames)
    except (ValueError, OSError) as error:  # bad input, unreadable files or model
        return fail("evaluate", _with_option_names(error))


def register_cli(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to the ``mask2dit`` dispatcher."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score multi-scene videos (visual/semantic/sequence consistency, CSCV, smoothness)",
        description=(
            "Score a multi-scene video with a CLIP model (a stand-in for ViCLIP): visual, semantic and sequence "
            "consistency (Mask²DiT, percent), CSCV (DiTCtrl) and smoothness. Prints a table and writes JSON."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--video", help="an output folder with scene_*.mp4 (and prompts.txt), or one mp4 with --scene-frames"
    )
    source.add_argument("--batch", help="a folder with one sample subfolder per video; prints mean and 95%% interval")
    parser.add_argument("--prompts", help="text file, one scene prompt per line (default: prompts.txt of the sample)")
    parser.add_argument("--scene-frames", help="frame count per scene, e.g. 49,49,49, to split one mp4 (or video.mp4)")
    encoder = parser.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--clip", help="CLIP model folder (save_pretrained) or Hub id")
    encoder.add_argument(
        "--tiny-clip", action="store_true", help="a tiny random CLIP built offline: tries the command, scores mean nothing"
    )
    encoder.add_argument(
        "--shapes", action="store_true", help="videos of the Shapes world: its exact pixel scorer as the encoder"
    )
    parser.add_argument("--output", help="JSON file to write (default: metrics.json in the folder, <video>_metrics.json beside one mp4, metrics_summary.json in the batch root)")
    parser.add_argument("--device", default=None, help="torch device: auto, cpu, cuda, cuda:N, mps (default: auto = cuda if available, else cpu)")
    parser.add_argument("--frames-per-scene", type=int, default=8, help="frames sampled evenly per scene for the video embedding (default: 8)")
    parser.add_argument("--frame-stride", type=int, default=1, help="use every N-th frame for CSCV and smoothness (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per CLIP forward pass (default: 32)")
    parser.add_argument(
        "--interval", choices=("t", "normal"), default="t", help="95%% interval: Student-t (default) or normal (1.96) quantile"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the batch progress bar")
    parser.set_defaults(func=run)
    return parser
