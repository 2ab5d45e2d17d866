"""Shots of a long video: detected with PySceneDetect or taken from chapters, length limits, clip frames.

Frames are numbered from 0 in the source video's decoding order (OpenCV, as PySceneDetect reads them); a shot is
``[start_frame, end_frame)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

DETECTORS = ("content", "adaptive")


class UnreadableVideo(ValueError):
    """A video that cannot be opened or decoded, or has no frames."""


@dataclass(frozen=True)
class DetectOptions:
    """PySceneDetect settings. ``threshold``: the content detector's threshold, or the adaptive detector's
    ``adaptive_threshold``; ``min_shot_frames``: PySceneDetect's ``min_scene_len``."""

    detector: str = "content"
    threshold: Optional[float] = None  # None: PySceneDetect's default (27 content, 3 adaptive)
    min_shot_frames: int = 15

    def check(self) -> "DetectOptions":
        if self.detector not in DETECTORS:
            raise ValueError(f"`--detector` must be one of {', '.join(DETECTORS)}; got {self.detector!r}.")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"`--threshold` must be > 0; got {self.threshold}.")
        if self.min_shot_frames < 1:
            raise ValueError(f"`--min-detect-frames` must be >= 1; got {self.min_shot_frames}.")
        return self


def _detector(options: DetectOptions):
    from scenedetect import AdaptiveDetector, ContentDetector

    if options.detector == "adaptive":
        extra = {} if options.threshold is None else {"adaptive_threshold": options.threshold}
        return AdaptiveDetector(min_scene_len=options.min_shot_frames, **extra)
    extra = {} if options.threshold is None else {"threshold": options.threshold}
    return ContentDetector(min_scene_len=options.min_shot_frames, **extra)


def detect_shots(path: str, options: DetectOptions) -> Tuple[List[Tuple[int, int]], float, int]:
    """``(shots, fps, total_frames)``: every shot ``(start, end)`` of the video, covering it without gaps.

    Raises:
        UnreadableVideo: the file cannot be opened or decoded, or has no frames.
    """
    from scenedetect import SceneManager, open_video

    try:
        video = open_video(path)
        manager = SceneManager()
        manager.add_detector(_detector(options))
        manager.detect_scenes(video)
        total = int(video.frame_number)
        fps = float(video.frame_rate)
    except Exception as error:  # OpenCV and PySceneDetect raise several types for a bad file
        raise UnreadableVideo(f"cannot decode ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
    if total <= 0:
        raise UnreadableVideo("has no frames")
    cuts = [int(start.frame_num) for start, _ in manager.get_scene_list(start_in_scene=True)[1:]]
    bounds = [0] + cuts + [total]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a], fps, total


def chapter_shots(chapters: Sequence["Chapter"], fps: float, total_frames: int) -> List[Tuple[int, int]]:  # noqa: F821
    """Chapters as shots ``(start, end)`` in frames, clipped to the video."""
    shots = []
    for chapter in chapters:
        start = int(round(chapter.start_s * fps))
        end = total_frames if chapter.end_s is None else min(total_frames, int(round(chapter.end_s * fps)))
        if end > start and start < total_frames:
            shots.append((start, end))
    return shots


def video_info(path: str) -> Tuple[float, int]:
    """``(fps, total_frames)`` of a video (decodes it once to count frames exactly)."""
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise UnreadableVideo("cannot be opened")
        fps, total = float(capture.get(cv2.CAP_PROP_FPS) or 0.0), 0
        while capture.grab():
            total += 1
    finally:
        capture.release()
    if total <= 0:
        raise UnreadableVideo("has no frames")
    return fps or 25.0, total


def clip_indices(start: int, end: int, num_frames: int, max_stride: int) -> Optional[np.ndarray]:
    """The ``num_frames`` source frames a shot's clip takes: the largest stride <= ``max_stride`` that fits, the
    window centred in the shot; None when the shot is shorter than ``num_frames``."""
    length = end - start
    if length < num_frames:
        return None
    stride = 1 if num_frames == 1 else max(1, min(max_stride, (length - 1) // (num_frames - 1)))
    window = stride * (num_frames - 1) + 1
    first = start + (length - window) // 2
    return first + stride * np.arange(num_frames, dtype=np.int64)


def read_frames(path: str, indices: Sequence[int], height: int, width: int) -> Dict[int, np.ndarray]:
    """``{index: uint8 (height, width, 3)}`` for the wanted frames, in one decoding pass; each frame is scaled to
    cover ``height x width`` and centre-cropped as it is read (the trainer's transform), so memory stays small."""
    import cv2

    from ..training.data import resize_center_crop

    wanted, last, frames = set(int(i) for i in indices), max(indices), {}
    capture = cv2.VideoCapture(path)
    try:
        index = 0
        while index <= last and capture.grab():
            if index in wanted:
                ok, bgr = capture.retrieve()
                if not ok:
                    break
                rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                if rgb.shape[:2] != (height, width):
                    rgb = ((resize_center_crop(rgb[None], height, width)[0].permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
                frames[index] = rgb
            index += 1
    finally:
        capture.release()
    missing = wanted - set(frames)
    if missing:
        raise UnreadableVideo(f"ended before frame {min(missing)}")
    return frames
