"""``mask2dit prepare-data``: long videos to the trainer's data files (see :mod:`.prepare` and docs/data.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

COMMAND = "prepare-data"


def _options(args: argparse.Namespace):
    from .prepare import PrepareOptions
    from .shots import DetectOptions

    detect = DetectOptions(detector=args.detector, threshold=args.threshold, min_shot_frames=args.min_detect_frames)
    return PrepareOptions(
        num_scenes=args.num_scenes, min_similarity=args.min_similarity, grouping=args.grouping, detect=detect,
        num_frames=args.num_frames, height=args.height, width=args.width, max_stride=args.max_stride,
        min_shot_frames=args.min_shot_frames, max_shot_frames=args.max_shot_frames, clip_codec=args.clip_codec,
        encoder=args.encoder, captioner=args.captioner, captions=args.captions, chapters=args.chapters,
        title_prefix=args.title_prefix, device=args.device, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from ..cli_utils import check_device, fail
    from .prepare import prepare_data

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"mask2dit {COMMAND}: warning: %(message)s"))
    logger = logging.getLogger("diffusers_mask2dit.data")
    logger.addHandler(handler)
    try:
        check_device(args.device)
        report = prepare_data(args.videos, args.out, _options(args))
    except (ValueError, OSError, RuntimeError) as error:
        return fail(COMMAND, error)
    finally:
        logger.removeHandler(handler)
    groups = report["groups"]
    print(f"{report['videos']['read']} videos ({report['videos']['resumed']} from an earlier run), "
          f"{sum(report['videos']['skipped'].values())} skipped; {report['shots']['with_clip']} shots with a clip; "
          f"{groups['kept']} of {groups['total']} groups kept -> {args.out}")
    for note in report["notes"]:
        print(f"note: {note}")
    if args.print_report:
        print(json.dumps(report, indent=1))
    return 0


def register_cli(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(COMMAND, help="make multi-scene training data from a folder of long videos",
                                   description="Long videos -> shots -> groups of consecutive related shots -> "
                                               "pretrain.csv, sft.json, JSONL, clips and report.json (docs/data.md).")
    parser.add_argument("--videos", required=True, help="folder of videos, or a .txt/.csv list of video files")
    parser.add_argument("--out", required=True, help="output folder (resumable: finished videos are skipped)")
    parser.add_argument("--num-scenes", type=int, default=3, help="shots per group (default 3)")
    parser.add_argument("--min-similarity", type=float, default=0.0, help="keep groups whose mean pairwise cosine reaches this")
    parser.add_argument("--grouping", default="sliding", help="sliding (every start) or disjoint (back to back)")
    parser.add_argument("--encoder", default="none", help="CLIP folder, module:factory, registered name, or none")
    parser.add_argument("--captioner", default="none", help="image-to-text folder, cmd:COMMAND {clip}, module:factory, or none")
    parser.add_argument("--captions", default=None, help="JSONL of {video, start_frame, end_frame, caption} (e.g. a captioned shots.jsonl)")
    parser.add_argument("--chapters", default=None, help="VidChapters-style JSON: chapters instead of detected shots")
    parser.add_argument("--title-prefix", action="store_true", help="prefix captions with their chapter's title")
    parser.add_argument("--detector", default="content", help="PySceneDetect detector: content or adaptive")
    parser.add_argument("--threshold", type=float, default=None, help="detector threshold (default: PySceneDetect's)")
    parser.add_argument("--min-detect-frames", type=int, default=15, help="PySceneDetect's min_scene_len in frames")
    parser.add_argument("--num-frames", type=int, default=49, help="frames per clip, 8k+1 (default 49)")
    parser.add_argument("--height", type=int, default=480, help="clip height (scaled to cover, centre-cropped)")
    parser.add_argument("--width", type=int, default=720, help="clip width")
    parser.add_argument("--max-stride", type=int, default=3, help="largest source-frame step between clip frames")
    parser.add_argument("--min-shot-frames", type=int, default=None, help="drop shorter shots (default: --num-frames)")
    parser.add_argument("--max-shot-frames", type=int, default=None, help="trim longer shots to their middle")
    parser.add_argument("--clip-codec", default="lossless", help="lossless (RGB H.264) or h264 (crf 12)")
    parser.add_argument("--device", default=None, help="device of the encoder and captioner models")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--print-report", action="store_true", help="print report.json")
    parser.set_defaults(func=run)
    return parser
