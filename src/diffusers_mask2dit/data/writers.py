"""Files of a prepared data folder, each written to a temporary name and renamed (never half-written).

- clips: one mp4 per shot, lossless RGB H.264 (decodes back bit for bit) or high-quality H.264 (``crf 12``);
- ``pretrain.csv`` (the authors' ``fps,width,height,caption,path,num_frame``) and ``pretrain.jsonl``: every shot;
- ``sft.json`` (the authors' ``[{"prefix", "values": [{"vid","width","height","duration","fps","url","caption"}]}]``)
  and ``sft.jsonl`` (``{"scenes": [{"video", "caption", "num_frames"}], "relevance"}``): the kept groups;
- ``shots.jsonl``: one line per shot with its source frames.

Paths inside the data files are relative to the output folder, where the trainer looks for them by default.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from ..video_io import write_atomically

CLIP_CODECS = ("lossless", "h264")


def write_clip(frames: np.ndarray, path: str, fps: float, codec: str = "lossless") -> str:
    """Write ``uint8 (F, H, W, 3)`` frames as an mp4 (see module doc for the codecs); returns ``path``."""
    import imageio_ffmpeg

    if codec not in CLIP_CODECS:
        raise ValueError(f"`--clip-codec` must be one of {', '.join(CLIP_CODECS)}; got {codec!r}.")
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if codec == "lossless":
        settings = dict(codec="libx264rgb", pix_fmt_out="rgb24", output_params=["-qp", "0", "-preset", "veryfast", "-f", "mp4"])
    else:
        settings = dict(codec="libx264", pix_fmt_out="yuv444p", output_params=["-crf", "12", "-preset", "medium", "-f", "mp4"])

    def write(tmp: str) -> None:
        writer = imageio_ffmpeg.write_frames(tmp, (frames.shape[2], frames.shape[1]), fps=fps, pix_fmt_in="rgb24",
                                             quality=None, macro_block_size=1, **settings)
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()

    return write_atomically(path, write)


def write_text(path: str, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return write_atomically(path, write)


def write_json(path: str, data: Any) -> str:
    return write_text(path, json.dumps(data, indent=1) + "\n")


def write_jsonl(path: str, records: Iterable[Dict[str, Any]]) -> str:
    return write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def write_pretrain_csv(path: str, shots: Sequence[Dict[str, Any]]) -> str:
    """The authors' pretraining CSV: one row per shot clip."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["fps", "width", "height", "caption", "path", "num_frame"], lineterminator="\n")
    writer.writeheader()
    for shot in shots:
        writer.writerow({"fps": shot["clip_fps"], "width": shot["width"], "height": shot["height"],
                         "caption": shot["caption"], "path": shot["clip"], "num_frame": shot["num_frames"]})
    return write_text(path, buffer.getvalue())


def sft_record(group: Dict[str, Any], shots: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One group in the authors' SFT JSON layout."""
    values = [
        {"vid": os.path.splitext(os.path.basename(s["clip"]))[0] + "@" + s["key"], "width": s["width"], "height": s["height"],
         "duration": round(s["num_frames"] / s["clip_fps"], 6), "fps": s["clip_fps"], "url": s["clip"], "caption": s["caption"]}
        for s in shots
    ]
    return {"prefix": group.get("prefix", ""), "values": values}


def sft_jsonl_record(group: Dict[str, Any], shots: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    scenes = [{"video": s["clip"], "caption": s["caption"], "num_frames": s["num_frames"]} for s in shots]
    return {"scenes": scenes, "relevance": group["relevance"], "source": group["video"], "first_shot": group["start"]}


def write_outputs(out: str, all_shots: List[Dict[str, Any]], shots: List[Dict[str, Any]], kept: List[Dict[str, Any]]) -> Dict[str, str]:
    """Write every data file of ``out``: ``all_shots`` (every detected shot, for ``shots.jsonl``), ``shots`` (those
    with a clip) and the ``kept`` groups (each carries its ``shots``). Returns the paths."""
    paths = {
        "shots": write_jsonl(os.path.join(out, "shots.jsonl"), all_shots),
        "pretrain_csv": write_pretrain_csv(os.path.join(out, "pretrain.csv"), shots),
        "pretrain_jsonl": write_jsonl(os.path.join(out, "pretrain.jsonl"),
                                      ({"video": s["clip"], "caption": s["caption"], "num_frames": s["num_frames"]} for s in shots)),
        "sft_json": write_json(os.path.join(out, "sft.json"), [sft_record(g, g["shots"]) for g in kept]),
        "sft_jsonl": write_jsonl(os.path.join(out, "sft.jsonl"), (sft_jsonl_record(g, g["shots"]) for g in kept)),
    }
    return paths
