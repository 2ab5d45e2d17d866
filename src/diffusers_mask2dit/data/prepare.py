"""``prepare_data``: long videos -> shots -> clips, embeddings and captions -> scene groups -> training files.

Per video (the expensive part, done once and kept in ``OUT/videos/<key>.json``, so a rerun skips finished
videos): detect shots (or take chapters), drop shots shorter than a clip and trim long ones, cut each shot to
the trainer's frame count and size as an mp4, embed it with the encoder, caption it. Then, for every run
(cheap, so ``--num-scenes``, ``--grouping`` and ``--min-similarity`` may change between runs on one folder):
group consecutive shots, keep the groups whose relevance reaches the threshold, write the data files and the
report. A video that cannot be read is skipped with a counted warning naming it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import grouping, plugins, report, shots as shot_lib, sources, writers

logger = logging.getLogger(__name__)

# Settings that change what is stored per video; a rerun on the same folder must keep them.
_PER_VIDEO_SETTINGS = ("detect", "num_frames", "height", "width", "max_stride", "min_shot_frames", "max_shot_frames",
                       "clip_codec", "encoder", "captioner", "captions", "chapters", "title_prefix")


@dataclass
class PrepareOptions:
    """Settings of ``mask2dit prepare-data`` (the CLI's options, same names with ``_``)."""

    num_scenes: int = 3
    min_similarity: float = 0.0
    grouping: str = "sliding"
    detect: shot_lib.DetectOptions = field(default_factory=shot_lib.DetectOptions)
    num_frames: int = 49
    height: int = 480
    width: int = 720
    max_stride: int = 3
    min_shot_frames: Optional[int] = None  # None: num_frames (a shorter shot cannot make a clip)
    max_shot_frames: Optional[int] = None  # longer shots are trimmed to their middle this many frames
    clip_codec: str = "lossless"
    encoder: str = "none"
    captioner: str = "none"
    captions: Optional[str] = None
    chapters: Optional[str] = None
    title_prefix: bool = False
    device: Optional[str] = None
    progress: bool = True

    def check(self) -> "PrepareOptions":
        self.detect.check()
        positive = {"--num-scenes": self.num_scenes, "--num-frames": self.num_frames, "--height": self.height,
                    "--width": self.width, "--max-stride": self.max_stride}
        for option, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{option}` must be an integer >= 1; got {value!r}.")
        if (self.num_frames - 1) % 8:
            raise ValueError(f"`--num-frames` must be 8k+1 (1, 9, 17, ..., 49) for the CogVideoX VAE; got {self.num_frames}.")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"`--min-similarity` must be a cosine similarity in [-1, 1]; got {self.min_similarity}.")
        if self.min_shot_frames is not None and self.min_shot_frames < self.num_frames:
            raise ValueError(f"`--min-shot-frames` must be >= --num-frames ({self.num_frames}); got {self.min_shot_frames}.")
        if self.max_shot_frames is not None and self.max_shot_frames < max(self.num_frames, self.min_shot_frames or 0):
            raise ValueError(f"`--max-shot-frames` must be >= --num-frames and --min-shot-frames; got {self.max_shot_frames}.")
        if self.clip_codec not in writers.CLIP_CODECS:
            raise ValueError(f"`--clip-codec` must be one of {', '.join(writers.CLIP_CODECS)}; got {self.clip_codec!r}.")
        if self.grouping not in grouping.GROUPINGS:
            raise ValueError(f"`--grouping` must be one of {', '.join(grouping.GROUPINGS)}; got {self.grouping!r}.")
        for option, path in (("--captions", self.captions), ("--chapters", self.chapters)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"`{option}` file not found: {path}")
        return self

    def per_video_settings(self) -> Dict[str, Any]:
        values = asdict(self)
        return {key: values[key] for key in _PER_VIDEO_SETTINGS}


def read_caption_file(path: Optional[str]) -> Dict[Tuple[str, int, int], str]:
    """``{(video, start_frame, end_frame): caption}`` from a JSONL such as a captioned ``shots.jsonl``."""
    if path is None:
        return {}
    captions = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                captions[(str(record["video"]), int(record["start_frame"]), int(record["end_frame"]))] = str(record["caption"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"`--captions` {path}:{number}: each line must be JSON with video, start_frame, end_frame, caption.") from None
    return captions


@dataclass
class Context:
    """What every video's processing shares."""

    out: str
    options: PrepareOptions
    encoder: Any
    captioner: Any
    captions: Dict[Tuple[str, int, int], str]
    chapters: Dict[str, List[sources.Chapter]]
    timings: Dict[str, float] = field(default_factory=lambda: {"detect": 0.0, "cut": 0.0, "embed": 0.0, "caption": 0.0})


def _timed(context: Context, name: str, started: float) -> float:
    now = time.perf_counter()
    context.timings[name] += now - started
    return now


def _shot_bounds(video: sources.SourceVideo, context: Context) -> Tuple[List[Tuple[int, int]], float, int, str]:
    """``(shots, fps, total_frames, "chapters" | "detected")``."""
    chapters = context.chapters.get(video.key)
    if chapters:
        fps, total = shot_lib.video_info(video.file)
        return shot_lib.chapter_shots(chapters, fps, total), fps, total, "chapters"
    bounds, fps, total = shot_lib.detect_shots(video.file, context.options.detect)
    return bounds, fps, total, "detected"


def _plan_shots(bounds: Sequence[Tuple[int, int]], options: PrepareOptions) -> List[Dict[str, Any]]:
    """Every shot with its clip's source frames, or the reason it makes no clip."""
    minimum = options.min_shot_frames or options.num_frames
    planned = []
    for index, (start, end) in enumerate(bounds):
        shot: Dict[str, Any] = {"shot": index, "start_frame": start, "end_frame": end, "trimmed": False}
        if end - start < minimum:
            shot["dropped"] = "too short"
        else:
            use_start, use_end = start, end
            if options.max_shot_frames and end - start > options.max_shot_frames:
                use_start = start + (end - start - options.max_shot_frames) // 2
                use_end, shot["trimmed"] = use_start + options.max_shot_frames, True
            shot["frames"] = shot_lib.clip_indices(use_start, use_end, options.num_frames, options.max_stride).tolist()
        planned.append(shot)
    return planned


def _caption(video: sources.SourceVideo, shot: Dict[str, Any], frames: np.ndarray, title: Optional[str], context: Context) -> str:
    text = context.captions.get((video.path, shot["start_frame"], shot["end_frame"]))
    if text is None and context.captioner is not None:
        shot_context = {"video": video.path, "start_frame": shot["start_frame"], "end_frame": shot["end_frame"],
                        "chapter": title, "clip": os.path.join(context.out, shot["clip"])}
        text = context.captioner.caption(frames, shot_context)
    text = text or ""
    if context.options.title_prefix and title and text:
        text = f"{title}. {text}"
    return text


def _chapter_title(video: sources.SourceVideo, shot: Dict[str, Any], fps: float, context: Context) -> Optional[str]:
    for chapter in context.chapters.get(video.key, []):
        if chapter.start_s * fps <= shot["start_frame"] < (chapter.end_s * fps if chapter.end_s is not None else float("inf")):
            return chapter.title
    return None


def process_video(video: sources.SourceVideo, context: Context) -> Dict[str, Any]:
    """Detect, cut, embed and caption one video; returns its record (stored as ``videos/<key>.json``)."""
    options, started = context.options, time.perf_counter()
    bounds, fps, total, origin = _shot_bounds(video, context)
    started = _timed(context, "detect", started)
    planned = _plan_shots(bounds, options)
    wanted = sorted({i for shot in planned for i in shot.get("frames", [])})
    frames = shot_lib.read_frames(video.file, wanted, options.height, options.width) if wanted else {}
    for shot in planned:
        if "frames" not in shot:
            continue
        clip = np.stack([frames[i] for i in shot["frames"]])
        stride = shot["frames"][1] - shot["frames"][0] if len(shot["frames"]) > 1 else 1
        shot["clip"] = os.path.join("clips", video.key, f"shot_{shot['shot']:04d}.mp4")
        shot["clip_fps"] = round(fps / stride, 6)
        writers.write_clip(clip, os.path.join(context.out, shot["clip"]), shot["clip_fps"], options.clip_codec)
        started = _timed(context, "cut", started)
        if context.encoder is not None:
            shot["embedding"] = np.asarray(context.encoder.encode_video(clip), dtype=np.float64).ravel().round(6).tolist()
            started = _timed(context, "embed", started)
        shot["caption"] = _caption(video, shot, clip, _chapter_title(video, shot, fps, context), context)
        started = _timed(context, "caption", started)
    return {"video": video.path, "key": video.key, "fps": fps, "total_frames": total, "shots_from": origin,
            "shots": planned}


# ------------------------------------------------------------------------------------------------ the run


def _settings_guard(out: str, options: PrepareOptions) -> None:
    """Refuse to mix videos processed with other per-video settings into one folder."""
    path = os.path.join(out, "prepare_settings.json")
    settings = json.loads(json.dumps(options.per_video_settings()))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
        differing = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
        if differing:
            raise ValueError(
                f"`--out` {out} was prepared with other settings ({', '.join(differing)} differ); use a new --out, or "
                "the same settings (--num-scenes, --grouping and --min-similarity may change between runs)."
            )
    else:
        writers.write_json(path, settings)


def _load_record(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError):  # damaged: process the video again
        logger.warning(f"Resume record {path} is damaged; processing its video again.")
        return None


def process_all(videos: Sequence[sources.SourceVideo], context: Context) -> Tuple[List[Dict[str, Any]], Dict[str, List[str]], int]:
    """Records of the readable videos (processed now or read back), skipped videos by reason, and how many were
    read back from an earlier run."""
    from tqdm.auto import tqdm

    records, skipped, resumed = [], {}, 0
    for video in tqdm(videos, desc="prepare-data videos", disable=not context.options.progress):
        path = os.path.join(context.out, "videos", f"{video.key}.json")
        record = _load_record(path)
        if record is not None:
            records.append(record)
            resumed += 1
            continue
        if not os.path.isfile(video.file):
            skipped.setdefault("missing", []).append(video.path)
            continue
        try:
            record = process_video(video, context)
        except shot_lib.UnreadableVideo as error:
            skipped.setdefault(f"unreadable ({error})" if "no frames" in str(error) else "unreadable", []).append(video.path)
            continue
        writers.write_json(path, record)
        records.append(record)
    for reason, names in skipped.items():
        logger.warning(f"Skipped {len(names)} video(s), {reason}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    return records, skipped, resumed


def _clip_shots(records: Sequence[Dict[str, Any]], options: PrepareOptions) -> List[List[Dict[str, Any]]]:
    """Per video, its runs of consecutive usable shots (a dropped shot breaks a run), as public shot dicts."""
    runs_per_video = []
    for record in records:
        runs, current = [], []
        for shot in record["shots"]:
            if "clip" not in shot:
                runs, current = runs + ([current] if current else []), []
                continue
            current.append({"video": record["video"], "start_frame": shot["start_frame"], "end_frame": shot["end_frame"],
                            "shot": shot["shot"], "clip": shot["clip"], "frames": shot["frames"], "caption": shot["caption"],
                            "trimmed": shot["trimmed"], "num_frames": options.num_frames, "width": options.width,
                            "height": options.height, "clip_fps": shot["clip_fps"], "key": record["key"],
                            "embedding": shot.get("embedding"), "shots_from": record["shots_from"]})
        runs_per_video.append(runs + ([current] if current else []))
    return runs_per_video


def shot_lines(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``shots.jsonl``: every detected shot (``clip`` None and ``dropped`` set when it makes no clip)."""
    lines = []
    for record in records:
        for shot in record["shots"]:
            lines.append({"video": record["video"], "start_frame": shot["start_frame"], "end_frame": shot["end_frame"],
                          "shot": shot["shot"], "shots_from": record["shots_from"], "clip": shot.get("clip"),
                          "frames": shot.get("frames"), "caption": shot.get("caption"), "trimmed": shot["trimmed"],
                          "dropped": shot.get("dropped")})
    return lines


def make_groups(runs_per_video: Sequence[Sequence[Sequence[Dict[str, Any]]]], options: PrepareOptions) -> List[Dict[str, Any]]:
    """Every group of ``num_scenes`` consecutive usable shots, with its relevance and whether it is kept."""
    groups = []
    for runs in runs_per_video:
        for run in runs:
            starts = grouping.group_starts(len(run), options.num_scenes, options.grouping)
            similarity = None
            if starts and run[0]["embedding"] is not None:
                similarity = grouping.cosine_matrix(np.asarray([s["embedding"] for s in run]))
            for start in starts:
                relevance = None if similarity is None else grouping.group_relevance(similarity, start, options.num_scenes)
                members = list(run[start : start + options.num_scenes])
                groups.append({"video": members[0]["video"], "start": members[0]["shot"], "shots": members,
                               "relevance": None if relevance is None else round(relevance, 6),
                               "kept": grouping.keep_group(relevance, options.min_similarity)})
    return groups


def prepare_data(videos: str, out: str, options: Optional[PrepareOptions] = None, encoder: Any = None, captioner: Any = None) -> Dict[str, Any]:
    """Prepare training data from the long videos ``videos`` (a folder or a list file) into ``out``.

    ``encoder`` / ``captioner`` objects override ``options.encoder`` / ``options.captioner`` specs (Python API
    injection). Returns the report (also written to ``out/report.json``).
    """
    options = (options or PrepareOptions()).check()
    out = os.path.abspath(out)
    listed = [v for v in sources.list_videos(videos) if not os.path.abspath(v.file).startswith(out + os.sep)]
    chapters, missing_chapters = {}, []
    if options.chapters:
        chapters, missing_chapters = sources.match_chapters(listed, sources.read_chapters(options.chapters))
        if missing_chapters:
            logger.warning(f"`--chapters` names {len(missing_chapters)} video(s) not among --videos, ignored: "
                           f"{', '.join(missing_chapters[:5])}{' ...' if len(missing_chapters) > 5 else ''}")
    encoder = encoder if encoder is not None else plugins.load_encoder(options.encoder, options.device)
    captioner = captioner if captioner is not None else plugins.load_captioner(options.captioner, options.device)
    os.makedirs(out, exist_ok=True)
    _settings_guard(out, options)
    context = Context(out, options, encoder, captioner, read_caption_file(options.captions), chapters)
    records, skipped, resumed = process_all(listed, context)
    runs_per_video = _clip_shots(records, options)
    shots = [shot for runs in runs_per_video for run in runs for shot in run]
    groups = make_groups(runs_per_video, options)
    kept = [g for g in groups if g["kept"]]
    writers.write_outputs(out, shot_lines(records), shots, kept)
    summary = report.build_report(out, options, listed, records, skipped, resumed, shots, groups, context.timings,
                                  missing_chapters)
    report.write_report(out, summary, groups, options.min_similarity)
    return summary
