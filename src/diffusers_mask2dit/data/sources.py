"""Which long videos to read: a folder, a list file or a CSV, and optional chapters in VidChapters' layout.

A :class:`SourceVideo` keeps the path as the user gave it (``shots.jsonl`` records it unchanged) and a stable,
file-system-safe ``key`` that names its clips and its resume record inside the output folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class SourceVideo:
    """A long video: ``path`` as given, ``file`` resolved on disk, ``key`` unique and safe as a file name."""

    path: str
    file: str
    key: str


@dataclass(frozen=True)
class Chapter:
    """A chapter of a video: ``[start_s, end_s)`` in seconds (``end_s`` None: until the video ends) and its title."""

    start_s: float
    end_s: Optional[float]
    title: str


def video_key(path: str) -> str:
    """``<file stem>-<8 hex of the path>``: readable, and different for two ``clip.mp4`` in different folders."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(path))[0])[:60] or "video"
    return f"{stem}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:8]}"


def _list_file_paths(path: str) -> List[str]:
    """Paths of a ``.txt`` list (one per line, ``#`` comments) or a ``.csv`` with a ``video`` or ``path`` column."""
    with open(path, encoding="utf-8") as handle:
        if path.lower().endswith(".csv"):
            reader = csv.DictReader(handle)
            column = next((c for c in ("video", "path") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise ValueError(f"`--videos` CSV {path} needs a `video` or `path` column; it has {reader.fieldnames}.")
            return [row[column].strip() for row in reader if (row.get(column) or "").strip()]
        return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]


def list_videos(videos: str) -> List[SourceVideo]:
    """The videos named by ``--videos``: every video file under a folder (sorted, recursively), or the lines of a
    list file / rows of a CSV (relative paths start at the list's folder). Raises a ValueError naming ``--videos``
    when there is nothing to read."""
    if os.path.isdir(videos):
        found = []
        for folder, _, names in sorted(os.walk(videos)):
            found += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(VIDEO_EXTENSIONS)]
        if not found:
            raise ValueError(f"`--videos` folder {videos} holds no video files ({', '.join(VIDEO_EXTENSIONS)}).")
        return [SourceVideo(path, path, video_key(os.path.relpath(path, videos))) for path in found]
    if not os.path.isfile(videos):
        raise ValueError(f"`--videos` {videos!r} is neither a folder of videos nor a list file (.txt or .csv).")
    root = os.path.dirname(os.path.abspath(videos))
    paths = _list_file_paths(videos)
    if not paths:
        raise ValueError(f"`--videos` list {videos} names no videos.")
    return [SourceVideo(p, p if os.path.isabs(p) else os.path.join(root, p), video_key(p)) for p in paths]


def _chapter_list(entry: object, where: str) -> List[Tuple[float, str]]:
    chapters = entry.get("chapters") if isinstance(entry, dict) else entry
    if not isinstance(chapters, list):
        raise ValueError(f"`--chapters` {where}: expected a list of {{\"time\", \"label\"}} chapters.")
    parsed = []
    for chapter in chapters:
        try:
            parsed.append((float(chapter["time"]), str(chapter.get("label", ""))))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"`--chapters` {where}: every chapter needs a numeric `time` (seconds) and a `label`; got {chapter!r}.") from None
    return sorted(parsed)


def read_chapters(path: str) -> Dict[str, List[Chapter]]:
    """Chapters per video from a VidChapters-style JSON: ``{video_id: {"duration": s, "chapters": [{"time": s,
    "label": str}, ...]}}`` (a bare list of chapters per id is accepted too). A chapter ends where the next begins;
    the last one at ``duration`` (or the video's end). ``video_id`` matches a video's path as given, its file
    name or its file stem."""
    if not os.path.isfile(path):
        raise ValueError(f"`--chapters` file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"`--chapters` {path} is not a JSON file ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"`--chapters` {path} must map video ids to chapters (VidChapters' layout).")
    result: Dict[str, List[Chapter]] = {}
    for video_id, entry in data.items():
        starts = _chapter_list(entry, f"{path} [{video_id!r}]")
        duration = entry.get("duration") if isinstance(entry, dict) else None
        ends = [s for s, _ in starts[1:]] + [float(duration) if duration is not None else None]
        result[str(video_id)] = [Chapter(s, e, title) for (s, title), e in zip(starts, ends)]
    return result


def match_chapters(videos: Sequence[SourceVideo], chapters: Dict[str, List[Chapter]]) -> Tuple[Dict[str, List[Chapter]], List[str]]:
    """``({video key: chapters}, ids naming no video)``: a chapter id matches a path, a file name or a stem."""
    names: Dict[str, str] = {}
    for video in videos:
        base = os.path.basename(video.path)
        for name in (video.path, base, os.path.splitext(base)[0]):
            names.setdefault(name, video.key)
    matched, missing = {}, []
    for video_id, entries in chapters.items():
        key = names.get(video_id)
        if key is None:
            missing.append(video_id)
        else:
            matched[key] = entries
    return matched, missing
