"""Training data: the authors' formats and a simple JSONL, frame sampling, multi-scene datasets and collation.

A training sample is ``num_scenes`` clips, each with its own caption:

- ``pretrain``: n unrelated single-shot clips, regrouped at random every epoch;
- ``sft``: n consecutive shots of one video (a random run of n when it has more).

Every random choice of a sample (grouping, frame window, later its noise and timestep) is a function of
``(seed, epoch, index)``, never of a global RNG, so a resumed run and a run on another number of processes
see exactly the same data. Bad data never stops training: records that cannot be used are dropped when the
data file is read, videos that fail to decode are replaced by the next sample, and both are reported as a
warning with a count.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..video_io import VideoReadError, read_video
from ..video_io import VideoTooShortError as TooShortError

logger = logging.getLogger(__name__)

# Frames are taken at most this many source frames apart (49 frames span at most 145 source frames).
MAX_FRAME_STRIDE = 3
# Pretraining clips are sampled inside this fraction of their length, away from fades and cuts at the ends.
PRETRAIN_SPAN = (0.05, 0.95)
# A bad sample is replaced by the next one; give up (with a clear error) after this many in a row.
MAX_CONSECUTIVE_SKIPS = 64



@dataclass(frozen=True)
class Clip:
    """One single-shot video with its caption. ``num_frames`` is the frame count the data file states, if any."""

    video: str
    caption: str
    num_frames: Optional[int] = None


# ------------------------------------------------------------------------------------------------
# Skip accounting
# ------------------------------------------------------------------------------------------------


class SkipReport:
    """Counts of skipped records by reason, with a few examples, reported as one warning."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: List[str] = []

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{reason}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def warn(self, what: str) -> None:
        if not self.total:
            return
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.counts.items()))
        examples = "; ".join(self.examples)
        logger.warning(f"Skipped {self.total} {what} ({reasons}). Examples: {examples}")


# ------------------------------------------------------------------------------------------------
# Data files
# ------------------------------------------------------------------------------------------------


def _resolve(path: str, video_root: str) -> Optional[str]:
    """The video's path, or None when it leaves ``video_root`` (an absolute path elsewhere, or ``..``)."""
    root = os.path.normpath(os.path.abspath(video_root))
    resolved = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return resolved


def _read_text(path: str) -> str:
    """The data file's text; a file that is not UTF-8 is a ValueError naming it and the first bad byte."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"`data_file` {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8."
        ) from None


def _positive_int(value: Any) -> Optional[int]:
    try:
        number = int(round(float(value)))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _clip_from_fields(video: Any, caption: Any, num_frames: Optional[int], video_root: str, skips: SkipReport, where: str) -> Optional[Clip]:
    if not isinstance(video, str) or not video.strip():
        skips.add("records without a video path", where)
        return None
    if not isinstance(caption, str) or not caption.strip():
        skips.add("records without a caption", where)
        return None
    path = _resolve(video.strip(), video_root)
    if path is None:
        # A data file names videos only inside its video root: set `video_root` for videos elsewhere.
        skips.add("videos outside the video root (set `video_root` to the folder that holds them)", f"{where}: {video.strip()!r} is outside {video_root}")
        return None
    return Clip(path, caption.strip(), num_frames)


def read_pretrain_clips(path: str, video_root: Optional[str] = None) -> Tuple[List[Clip], SkipReport]:
    """Clips of a pretraining data file: the authors' CSV (``fps,width,height,caption,path,num_frame``) or JSONL.

    JSONL: one ``{"video": path, "caption": str}`` per line. Relative paths start at ``video_root`` (default:
    the data file's folder). Malformed rows are returned as skips, not raised.
    """
    video_root = video_root or os.path.dirname(os.path.abspath(path))
    skips = SkipReport()
    clips: List[Clip] = []
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        with io.StringIO(_read_text(path), newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"path", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"`data_file` {path} lacks the columns {sorted(missing)}; the pretraining CSV has the columns "
                    "fps,width,height,caption,path,num_frame."
                )
            for row_number, row in enumerate(reader, start=2):
                clip = _clip_from_fields(
                    row.get("path"), row.get("caption"), _positive_int(row.get("num_frame")), video_root, skips,
                    f"{path}:{row_number}",
                )
                if clip:
                    clips.append(clip)
    elif extension == ".jsonl":
        for line_number, record in _jsonl_records(path, skips):
            clip = _clip_from_fields(
                record.get("video"), record.get("caption"), _positive_int(record.get("num_frames")), video_root,
                skips, f"{path}:{line_number}",
            )
            if clip:
                clips.append(clip)
    else:
        raise ValueError(f"`data_file` for stage 'pretrain' must be a .csv (authors' format) or .jsonl file, got {path!r}.")
    return clips, skips


def read_sft_videos(path: str, video_root: Optional[str] = None) -> Tuple[List[List[Clip]], SkipReport]:
    """Multi-shot videos of an SFT data file, each a list of shots in order: the authors' JSON or JSONL.

    JSON: ``[{"prefix": str, "values": [{"url": path, "caption": str, "duration": s, "fps": f, ...}, ...]}]``.
    JSONL: one ``{"scenes": [{"video": path, "caption": str}, ...]}`` per line. A video with a malformed shot
    is skipped whole (its shots would no longer be consecutive).
    """
    video_root = video_root or os.path.dirname(os.path.abspath(path))
    skips = SkipReport()
    videos: List[List[Clip]] = []
    extension = os.path.splitext(path)[1].lower()
    if extension == ".json":
        try:
            records = json.loads(_read_text(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"`data_file` {path} is not valid JSON: {error}") from None
        if not isinstance(records, list):
            raise ValueError(f"`data_file` {path} must hold a JSON list of {{\"prefix\", \"values\"}} records.")
        for number, record in enumerate(records):
            shots = record.get("values") if isinstance(record, dict) else None
            where = f"{path}[{number}]"
            if not isinstance(shots, list) or not shots:
                skips.add("records without shots", where)
                continue
            clips = []
            for shot in shots:
                if not isinstance(shot, dict):
                    skips.add("records with a malformed shot", where)
                    break
                num_frames = None  # from the stated duration and fps, only to drop clearly too short shots early
                if shot.get("duration") is not None and shot.get("fps") is not None:
                    try:
                        num_frames = _positive_int(float(shot["duration"]) * float(shot["fps"]))
                    except (TypeError, ValueError):
                        num_frames = None
                clip = _clip_from_fields(shot.get("url"), shot.get("caption"), num_frames, video_root, skips, where)
                if clip is None:
                    break
                clips.append(clip)
            if len(clips) == len(shots):
                videos.append(clips)
    elif extension == ".jsonl":
        for line_number, record in _jsonl_records(path, skips):
            where = f"{path}:{line_number}"
            scenes = record.get("scenes")
            if not isinstance(scenes, list) or not scenes or not all(isinstance(s, dict) for s in scenes):
                skips.add("records without scenes", where)
                continue
            clips = [
                _clip_from_fields(s.get("video"), s.get("caption"), _positive_int(s.get("num_frames")), video_root, skips, where)
                for s in scenes
            ]
            if all(clips):
                videos.append(clips)
    else:
        raise ValueError(f"`data_file` for stage 'sft' must be a .json (authors' format) or .jsonl file, got {path!r}.")
    return videos, skips


def _jsonl_records(path: str, skips: SkipReport) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with io.StringIO(_read_text(path)) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skips.add("lines that are not JSON", f"{path}:{line_number}")
                continue
            if not isinstance(record, dict):
                skips.add("lines that are not JSON objects", f"{path}:{line_number}")
                continue
            yield line_number, record


def _usable(clip: Clip, min_frames: int, skips: SkipReport) -> bool:
    if not os.path.isfile(clip.video):
        skips.add("missing videos", clip.video)
        return False
    if clip.num_frames is not None and clip.num_frames < min_frames:
        skips.add("too short videos", f"{clip.video} ({clip.num_frames} < {min_frames} frames)")
        return False
    return True


def load_training_records(
    data_file: str,
    stage: str,
    num_scenes: int,
    scene_frames: Sequence[int],
    video_root: Optional[str] = None,
    warn: bool = True,
) -> List[List[Clip]]:
    """The usable records of ``data_file``: for ``pretrain`` one single-clip list per clip, for ``sft`` the shot lists.

    Drops (with one warning giving counts, unless ``warn`` is False, e.g. on all but one process) malformed
    records, missing files, clips the data file says are shorter than the longest scene, and SFT videos
    with fewer than ``num_scenes`` shots.
    """
    if not os.path.isfile(data_file):
        raise ValueError(f"`data_file` not found: {data_file}")
    min_frames = max(scene_frames)
    if stage == "pretrain":
        clips, skips = read_pretrain_clips(data_file, video_root)
        records = [[clip] for clip in clips if _usable(clip, min_frames, skips)]
    else:
        videos, skips = read_sft_videos(data_file, video_root)
        records = []
        for shots in videos:
            if len(shots) < num_scenes:
                skips.add(f"videos with fewer than {num_scenes} shots", shots[0].video)
            elif all(_usable(shot, min_frames, skips) for shot in shots):
                records.append(shots)
    if warn:
        skips.warn(f"records of {data_file}")
    return records


# ------------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------------


def frame_indices(total_frames: int, num_frames: int, stage: str, rng: np.random.Generator) -> np.ndarray:
    """Which ``num_frames`` of a ``total_frames`` video to take, in order.

    pretrain: evenly over a window of ``(num_frames - 1) * 3 + 1`` frames (145 for 49) placed at random in the
    5%–95% span, shrunk to the span (or to the whole clip) when the clip is shorter.
    sft: the largest stride ≤ 3 that fits, window placed at random.

    Raises:
        TooShortError: the video has fewer than ``num_frames`` frames.
    """
    if total_frames < num_frames:
        raise TooShortError(f"has {total_frames} frames, fewer than the {num_frames} a scene needs")
    if stage == "pretrain":
        first = int(math.floor(total_frames * PRETRAIN_SPAN[0]))
        end = int(math.ceil(total_frames * PRETRAIN_SPAN[1]))
        if end - first < num_frames:
            first, end = 0, total_frames
        window = min((num_frames - 1) * MAX_FRAME_STRIDE + 1, end - first)
        start = int(rng.integers(first, end - window + 1))
        return np.round(np.linspace(start, start + window - 1, num_frames)).astype(np.int64)
    stride = 1 if num_frames == 1 else min(MAX_FRAME_STRIDE, (total_frames - 1) // (num_frames - 1))
    window = stride * (num_frames - 1) + 1
    start = int(rng.integers(0, total_frames - window + 1))
    return start + stride * np.arange(num_frames, dtype=np.int64)


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """``uint8 (F, H, W, 3)`` frames scaled to cover ``height x width``, center-cropped, as ``(F, 3, height, width)`` in [-1, 1]."""
    source_height, source_width = frames.shape[1:3]
    scale = max(height / source_height, width / source_width)
    resized_height = max(height, int(round(source_height * scale)))
    resized_width = max(width, int(round(source_width * scale)))
    top = (resized_height - height) // 2
    left = (resized_width - width) // 2
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        image = Image.fromarray(frame)
        if (resized_width, resized_height) != (source_width, source_height):
            image = image.resize((resized_width, resized_height), Image.BICUBIC)
        out[index] = np.asarray(image)[top : top + height, left : left + width]
    tensor = torch.from_numpy(out).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def load_clip_pixels(clip: Clip, num_frames: int, height: int, width: int, stage: str, rng: np.random.Generator) -> torch.Tensor:
    """One scene's frames, sampled per :func:`frame_indices`, as ``(num_frames, 3, height, width)`` in [-1, 1]."""
    frames = read_video(clip.video, pick=lambda total: frame_indices(total, num_frames, stage, rng))
    return resize_center_crop(frames, height, width)


# ------------------------------------------------------------------------------------------------
# Deterministic randomness
# ------------------------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on all ``keys`` (e.g. ``(seed, epoch, index)``), the same on every machine."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


def stable_key(text: str) -> int:
    """A 32-bit integer from a string, stable across runs (Python's ``hash`` is salted per process)."""
    import zlib

    return zlib.crc32(text.encode("utf-8"))


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(num_samples)`` that depends only on ``(seed, epoch)``; call :meth:`start_epoch`.

    The method is deliberately not called ``set_epoch``: accelerate calls that one with its own iteration
    counter, which a resumed run does not restore.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A11))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


class SceneSource:
    """Turns one clip placed at one scene position into that scene's tensors."""

    def load(self, clip: Clip, num_frames: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self, clip: Clip, num_frames: int) -> str:
        """The file a scene's tensors come from, for messages about bad data."""
        return clip.video


class VideoSource(SceneSource):
    """Decodes the video: ``{"pixels": (F, 3, H, W)}`` in [-1, 1]; the caption is encoded later, in the trainer."""

    def __init__(self, height: int, width: int, stage: str) -> None:
        self.height, self.width, self.stage = height, width, stage

    def load(self, clip: Clip, num_frames: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        return {"pixels": load_clip_pixels(clip, num_frames, self.height, self.width, self.stage, rng)}


class MultiSceneDataset(torch.utils.data.Dataset):
    """Samples of ``num_scenes`` clips. Item ``i`` depends only on ``(seed, epoch, i)``; call :meth:`start_epoch`.

    Args:
        records: for ``pretrain`` single-clip lists (regrouped n at a time every epoch), for ``sft`` the shot
            lists of multi-shot videos (a random run of n consecutive shots each epoch).
        source: loads a scene's tensors (decoded pixels, or cached latents and prompt embeddings).
        scene_frames: pixel frames of each scene position.

    Items: ``{"index", "sample_seed", "captions": [str] * n, "sources": [str] * n, <source keys>: [tensor] * n,
    "skipped": [str]}``, where ``sources`` names each scene's file and ``skipped`` describes samples that failed
    to load and were replaced by this one.
    """

    def __init__(self, records: Sequence[Sequence[Clip]], source: SceneSource, stage: str, num_scenes: int, scene_frames: Sequence[int], seed: int) -> None:
        self.records = [list(record) for record in records]
        self.source = source
        self.stage = stage
        self.num_scenes = num_scenes
        self.scene_frames = list(scene_frames)
        self.seed = seed
        self.epoch = 0
        if stage == "pretrain":
            self._length = len(self.records) // num_scenes
            detail = f"{len(self.records)} usable clips"
        else:
            self._length = len(self.records)
            detail = f"{len(self.records)} usable multi-shot videos"
        if self._length == 0:
            raise ValueError(f"No training samples: {detail}, {num_scenes} scenes per sample.")
        self._groups = self._grouping(0)

    def start_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s grouping and random choices (see `EpochShuffleSampler.start_epoch` for the name)."""
        self.epoch = int(epoch)
        self._groups = self._grouping(self.epoch)

    def _grouping(self, epoch: int) -> Optional[np.ndarray]:
        if self.stage != "pretrain":
            return None
        rng = np.random.default_rng(derive_seed(self.seed, epoch, 0x6E0))
        order = rng.permutation(len(self.records))[: self._length * self.num_scenes]
        return order.reshape(self._length, self.num_scenes)

    def __len__(self) -> int:
        return self._length

    def sample_clips(self, index: int, rng: np.random.Generator) -> List[Clip]:
        """The clips of sample ``index`` in the current epoch, in scene order."""
        if self.stage == "pretrain":
            return [self.records[i][0] for i in self._groups[index]]
        shots = self.records[index]
        start = int(rng.integers(0, len(shots) - self.num_scenes + 1))
        return shots[start : start + self.num_scenes]

    def _load(self, index: int) -> Dict[str, Any]:
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, index, 0xC11))
        clips = self.sample_clips(index, rng)
        scenes = [self.source.load(clip, frames, rng) for clip, frames in zip(clips, self.scene_frames)]
        item: Dict[str, Any] = {
            "index": index,
            "sample_seed": derive_seed(self.seed, self.epoch, index),
            "captions": [clip.caption for clip in clips],
            "sources": [self.source.describe(clip, frames) for clip, frames in zip(clips, self.scene_frames)],
        }
        for key in scenes[0]:
            item[key] = [scene[key] for scene in scenes]
        return item

    def __getitem__(self, index: int) -> Dict[str, Any]:
        skipped: List[str] = []
        candidate = index
        for _ in range(min(MAX_CONSECUTIVE_SKIPS, self._length)):
            try:
                item = self._load(candidate)
            except VideoReadError as error:
                skipped.append(str(error))
                candidate = (candidate + 1) % self._length
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(
            f"{len(skipped)} samples in a row could not be loaded (missing, unreadable or too short videos); "
            f"last error: {skipped[-1]}"
        )


def collate_scenes(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack items into a batch: tensors become lists over scenes of ``(B, ...)``; captions ``[scene][sample]``."""
    batch: Dict[str, Any] = {
        "indices": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "sample_seeds": torch.tensor([item["sample_seed"] for item in items], dtype=torch.long),
        "captions": [list(scene) for scene in zip(*(item["captions"] for item in items))],
        "skipped": [message for item in items for message in item["skipped"]],
        "sources": [list(item["sources"]) for item in items],  # [sample][scene]
    }
    tensor_keys = [key for key, value in items[0].items() if isinstance(value, list) and value and torch.is_tensor(value[0])]
    for key in tensor_keys:
        batch[key] = [torch.stack(scene) for scene in zip(*(item[key] for item in items))]
    return batch
