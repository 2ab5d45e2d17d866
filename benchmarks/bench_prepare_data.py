"""Throughput of ``mask2dit prepare-data`` per hour of source video, on a synthetic 480x720 long video.

    python benchmarks/bench_prepare_data.py --minutes 1 --fps 24

The video is Shapes-world shots (2 to 6 s each, hard cuts) scaled up to 480x720 and written as ordinary H.264;
it is read once with ``--encoder none`` and once with a tiny random CLIP (``save_tiny_clip``: it runs the CLIP
code path, but a real CLIP ViT-L costs far more per frame, so its embedding figure is a lower bound). Prints the
seconds of every stage (wall clock, as ``report.json`` records them) and the process CPU seconds (this process
and its ffmpeg children), both per video-hour.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def write_long_video(path: str, minutes: float, fps: int, seed: int = 0) -> int:
    """A ``minutes`` long 480x720 video of world shots of 2-6 s; returns its frame count."""
    from diffusers_mask2dit.shapes import world
    from diffusers_mask2dit.video_io import write_video

    rng = np.random.default_rng(seed)
    shots, total = [], 0
    while total < minutes * 60 * fps:
        length = int(rng.integers(2 * fps, 6 * fps))
        frames = world.render_scene(world.sample_scene(rng), length)
        shots.append(np.repeat(np.repeat(frames, 10, axis=1), 15, axis=2))  # 48x48 -> 480x720
        total += length
    write_video(np.concatenate(shots), path, fps=fps)
    return total


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--fps", type=int, default=24)
    args = parser.parse_args(argv)
    from diffusers_mask2dit.data import PrepareOptions, prepare_data
    from diffusers_mask2dit.evaluation.encoders import save_tiny_clip

    results = {}
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "videos")
        os.makedirs(folder)
        frames = write_long_video(os.path.join(folder, "long.mp4"), args.minutes, args.fps)
        clip = save_tiny_clip(os.path.join(root, "tiny-clip"))
        for name, encoder in (("no encoder", "none"), ("tiny CLIP", clip)):
            started_cpu, started = cpu_seconds(), time.perf_counter()
            report = prepare_data(folder, os.path.join(root, name.replace(" ", "_")), PrepareOptions(encoder=encoder, progress=False))
            hours = report["videos"]["hours"]
            results[name] = {"video_hours": hours, "shots": report["shots"]["with_clip"],
                             "stage_seconds_per_video_hour": report["seconds_per_video_hour"],
                             "wall_seconds_per_video_hour": round((time.perf_counter() - started) / hours, 1),
                             "cpu_seconds_per_video_hour": round((cpu_seconds() - started_cpu) / hours, 1)}
    print(json.dumps({"frames": frames, "fps": args.fps, "cpu_count": os.cpu_count(),
                      "load_average": os.getloadavg(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
