"""``OUT/report.json`` and its pictures: what was read, found, kept and dropped, and how fast.

- ``report.json``: videos read / skipped (by reason, with names), shots found / with a clip / too short /
  trimmed, captions (how many empty, and where they came from), groups kept and dropped by reason, the
  similarity histogram, seconds per stage and per video-hour;
- ``similarity_histogram.png``: the groups' relevance, kept in green, dropped in red, the threshold marked;
- ``groups_contact_sheet.png``: a few kept and a few dropped groups, one row per shot.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..video_io import contact_sheet, read_video, write_atomically
from . import grouping, writers

SHEET_GROUPS = 4  # kept and dropped groups each on the contact sheet


def _per_hour(seconds: float, video_seconds: float) -> Optional[float]:
    return round(seconds * 3600.0 / video_seconds, 2) if video_seconds > 0 else None


def build_report(out: str, options: Any, listed: Sequence[Any], records: Sequence[Dict[str, Any]], skipped: Dict[str, List[str]],
                 resumed: int, shots: Sequence[Dict[str, Any]], groups: Sequence[Dict[str, Any]], timings: Dict[str, float],
                 missing_chapters: Sequence[str]) -> Dict[str, Any]:
    """The report as a dict (see the module doc)."""
    detected = [shot for record in records for shot in record["shots"]]
    relevances = [g["relevance"] for g in groups if g["relevance"] is not None]
    video_seconds = sum(r["total_frames"] / r["fps"] for r in records if r["fps"])
    empty = sum(1 for s in shots if not s["caption"])
    caption_source = options.captioner if options.captioner != "none" else ("file" if options.captions else "none")
    notes = []
    if empty:
        notes.append(f"{empty} of {len(shots)} shots have no caption (captioner: {caption_source}); the trainer skips "
                     "records without a caption: give --captioner or --captions.")
    if relevances == [] and groups:
        notes.append("No encoder: groups have no relevance and --min-similarity was not applied.")
    return {
        "videos": {"listed": len(listed), "read": len(records), "resumed": resumed,
                   "skipped": {reason: len(names) for reason, names in skipped.items()}, "skipped_names": skipped,
                   "hours": round(video_seconds / 3600.0, 4),
                   "shots_from": {kind: sum(1 for r in records if r["shots_from"] == kind) for kind in ("detected", "chapters")},
                   "fewer_shots_than_num_scenes": sum(1 for r in records if sum("clip" in s for s in r["shots"]) < options.num_scenes)},
        "chapters_without_video": list(missing_chapters),
        "shots": {"found": len(detected), "with_clip": len(shots), "too_short": sum(1 for s in detected if s.get("dropped")),
                  "trimmed": sum(1 for s in shots if s["trimmed"])},
        "captions": {"source": caption_source, "empty": empty, "nonempty": len(shots) - empty},
        "groups": {"num_scenes": options.num_scenes, "grouping": options.grouping, "min_similarity": options.min_similarity,
                   "total": len(groups), "kept": sum(1 for g in groups if g["kept"]),
                   "dropped": {"below min_similarity": sum(1 for g in groups if not g["kept"])}},
        "similarity_histogram": grouping.histogram(relevances) if relevances else None,
        "seconds": {name: round(value, 2) for name, value in timings.items()},
        "seconds_per_video_hour": {name: _per_hour(value, video_seconds) for name, value in timings.items()},
        "notes": notes,
    }


def histogram_png(relevances: Sequence[float], kept: Sequence[bool], threshold: float, path: str, bins: int = 40) -> str:
    """A bar chart of group relevance over [-1, 1] (or [0, 1] when all are >= 0): kept green, dropped red."""
    low = 0.0 if min(relevances, default=0.0) >= 0 else -1.0
    edges = np.linspace(low, 1.0, bins + 1)
    values = np.clip(np.asarray(relevances, dtype=np.float64), low, 1.0)
    kept_mask = np.asarray(kept, dtype=bool)
    counts_kept = np.histogram(values[kept_mask], bins=edges)[0]
    counts_dropped = np.histogram(values[~kept_mask], bins=edges)[0]
    width, height, margin = 640, 320, 30
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    top = max(1, int((counts_kept + counts_dropped).max()))
    bar = (width - 2 * margin) / bins
    for index, (k, d) in enumerate(zip(counts_kept, counts_dropped)):
        x0 = margin + index * bar
        base = height - margin
        for count, colour in ((d, (220, 60, 60)), (k, (60, 170, 80))):
            bar_height = (height - 2 * margin) * count / top
            draw.rectangle([x0, base - bar_height, x0 + bar - 1, base], fill=colour)
            base -= bar_height
    x_threshold = margin + (threshold - low) / (1.0 - low) * (width - 2 * margin)
    draw.line([x_threshold, margin, x_threshold, height - margin], fill=(0, 0, 0), width=2)
    draw.text((margin, 8), f"group relevance (mean pairwise cosine), {len(values)} groups; max bar {top}; "
              f"threshold {threshold:g}", fill=(0, 0, 0))
    draw.text((margin, height - margin + 6), f"{low:g}", fill=(0, 0, 0))
    draw.text((width - margin - 10, height - margin + 6), "1", fill=(0, 0, 0))
    return write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def groups_sheet(out: str, groups: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
    """Contact sheet of the first few kept and dropped groups (one row per shot, labelled)."""
    chosen = [g for g in groups if g["kept"]][:SHEET_GROUPS] + [g for g in groups if not g["kept"]][:SHEET_GROUPS]
    scenes, labels, marks = [], [], []
    for group in chosen:
        status = "KEPT" if group["kept"] else "DROPPED"
        relevance = "n/a" if group["relevance"] is None else f"{group['relevance']:.2f}"
        for position, shot in enumerate(group["shots"]):
            scenes.append(read_video(os.path.join(out, shot["clip"])))
            labels.append(f"{status} r={relevance} {os.path.basename(shot['video'])} shot {shot['shot']}: {shot['caption']}"
                          if position == 0 else f"   shot {shot['shot']}: {shot['caption']}")
            marks.append(not group["kept"])
    if not scenes:
        return None
    return contact_sheet(scenes, path, labels=labels, highlighted=marks)


def write_report(out: str, summary: Dict[str, Any], groups: Sequence[Dict[str, Any]], threshold: float) -> None:
    relevances = [g["relevance"] for g in groups if g["relevance"] is not None]
    if relevances:
        histogram_png(relevances, [g["kept"] for g in groups if g["relevance"] is not None], threshold,
                      os.path.join(out, "similarity_histogram.png"))
    groups_sheet(out, groups, os.path.join(out, "groups_contact_sheet.png"))
    writers.write_json(os.path.join(out, "report.json"), summary)
