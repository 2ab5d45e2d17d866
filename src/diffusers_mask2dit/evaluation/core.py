"""Evaluate multi-scene videos: in memory (:func:`evaluate_scenes`), from our output folders or one mp4
(:func:`evaluate_video`), and over a folder of samples (:func:`evaluate_batch`). Formulas: see ``metrics``."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..video_io import read_video, to_uint8_frames
from . import metrics
from .encoders import _to_numpy, check_encoder, encode_frame_embeddings

PROMPTS_FILE = "prompts.txt"
WHOLE_VIDEO_FILE = "video.mp4"
_SCENE_FILE = re.compile(r"^scene_(\d+)\.mp4$")


def _check_prompts(prompts: Any, num_scenes: int) -> List[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"`prompts` must be a list of strings, one per scene; got {type(prompts).__name__}."
        )
    if len(prompts) != num_scenes:
        raise ValueError(
            f"`prompts` must hold one prompt per scene: got {len(prompts)} prompts for {num_scenes} scenes."
        )
    cleaned: List[str] = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"`prompts`[{index}] must be a non-empty string; got {prompt!r}.")
        cleaned.append(prompt.strip())
    return cleaned


def _check_scenes(scenes_frames: Any) -> List[np.ndarray]:
    if isinstance(scenes_frames, np.ndarray) and scenes_frames.ndim == 4:
        raise ValueError(
            "`scenes_frames` must be a list of scenes, each (F, H, W, 3); got one (F, H, W, 3) video. "
            "Split it per scene (e.g. with split_scenes(video, scene_frames))."
        )
    try:
        scenes = list(scenes_frames)
    except TypeError:
        raise ValueError(
            f"`scenes_frames` must be a list of scenes, each (F, H, W, 3); got {type(scenes_frames).__name__}."
        ) from None
    if len(scenes) < 2:
        raise ValueError(
            f"`scenes_frames` must hold at least 2 scenes (the metrics compare scenes); got {len(scenes)}."
        )
    arrays: List[np.ndarray] = []
    for index, scene in enumerate(scenes):
        if scene is None or len(scene) == 0:
            raise ValueError(f"`scenes_frames`[{index}] is empty; every scene needs at least 2 frames.")
        try:
            array = to_uint8_frames(scene)
        except ValueError as error:
            raise ValueError(f"`scenes_frames`[{index}]: {error}") from error
        if len(array) < 2:
            raise ValueError(
                f"`scenes_frames`[{index}] has {len(array)} frame; every scene needs at least 2 frames."
            )
        arrays.append(array)
    return arrays


def evaluate_scenes(
    scenes_frames: Sequence[Any],
    prompts: Sequence[str],
    encoder: Any,
    frame_stride: int = 1,
) -> Dict[str, Any]:
    """All metrics of one multi-scene video.

    Args:
        scenes_frames: ``S >= 2`` scenes, each frames ``(F_i, H, W, 3)`` (uint8 or float in [0, 1], list of PIL
            images, or a torch tensor) with ``F_i >= 2``.
        prompts: ``S`` scene prompts.
        encoder: a :class:`~diffusers_mask2dit.evaluation.VideoTextEncoder` (e.g. ``CLIPVideoEncoder``).
        frame_stride: use every ``frame_stride``-th frame for the per-frame metrics (CSCV, smoothness) to save
            encoder time; pixel smoothness always uses every frame.

    Returns:
        ``{metric: float}`` for every key of ``METRIC_KEYS`` plus ``num_scenes``, ``scene_frames``,
        ``frame_stride``, ``visual_pairwise`` (``S x S`` percent) and ``per_scene`` (list of dicts with
        ``prompt, frames, semantic, cscv, smoothness, pixel_smoothness``).
    """
    scenes = _check_scenes(scenes_frames)
    prompt_list = _check_prompts(prompts, len(scenes))
    check_encoder(encoder)
    if not isinstance(frame_stride, (int, np.integer)) or isinstance(frame_stride, bool) or frame_stride < 1:
        raise ValueError(f"`frame_stride` must be an integer >= 1; got {frame_stride!r}.")
    for index, scene in enumerate(scenes):
        if len(scene[::frame_stride]) < 2:
            raise ValueError(
                f"`frame_stride`={frame_stride} leaves fewer than 2 frames in scene {index} ({len(scene)} frames); "
                "use a smaller stride."
            )

    video_embeddings = np.stack([_to_numpy(encoder.encode_video(scene)).reshape(-1) for scene in scenes])
    text_embeddings = np.stack([_to_numpy(encoder.encode_text(prompt)).reshape(-1) for prompt in prompt_list])
    frame_embeddings = [encode_frame_embeddings(encoder, scene[::frame_stride]) for scene in scenes]

    visual = metrics.visual_consistency(video_embeddings)
    semantic_per_scene = metrics.semantic_scores(video_embeddings, text_embeddings)
    semantic = float(semantic_per_scene.mean())
    cscv_per_scene = [metrics.cscv(e) for e in frame_embeddings]
    smooth_per_scene = [metrics.smoothness(e) for e in frame_embeddings]
    pixel_per_scene = [metrics.pixel_smoothness(scene) for scene in scenes]

    return {
        "visual_consistency": visual,
        "semantic_consistency": semantic,
        "sequence_consistency": metrics.sequence_consistency(visual, semantic),
        "cscv": metrics.cscv(np.concatenate(frame_embeddings, axis=0)),
        "cscv_within_scene": float(np.mean(cscv_per_scene)),
        "smoothness": float(np.mean(smooth_per_scene)),
        "pixel_smoothness": float(np.mean(pixel_per_scene)),
        "num_scenes": len(scenes),
        "scene_frames": [int(len(scene)) for scene in scenes],
        "frame_stride": int(frame_stride),
        "visual_pairwise": (100.0 * metrics.cosine_similarity_matrix(video_embeddings)).tolist(),
        "per_scene": [
            {
                "prompt": prompt_list[i],
                "frames": int(len(scenes[i])),
                "semantic": float(semantic_per_scene[i]),
                "cscv": cscv_per_scene[i],
                "smoothness": smooth_per_scene[i],
                "pixel_smoothness": pixel_per_scene[i],
            }
            for i in range(len(scenes))
        ],
    }


# ------------------------------------------------------------------------------------------------------ files


def parse_scene_frames(text: Union[str, Sequence[int]]) -> List[int]:
    """``"49,49,49"`` (or a list of ints) -> ``[49, 49, 49]``; every count must be an integer >= 1."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            counts = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"`scene_frames` must be comma-separated frame counts like '49,49,49'; got {text!r}."
            ) from None
    else:
        counts = [int(c) for c in text]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"`scene_frames` must be one or more frame counts >= 1; got {text!r}.")
    return counts


def split_scenes(video: np.ndarray, scene_frames: Sequence[int]) -> List[np.ndarray]:
    """Split frames ``(F, H, W, 3)`` into scenes of ``scene_frames`` frames; the counts must sum to ``F``."""
    counts = parse_scene_frames(scene_frames)
    if sum(counts) != len(video):
        raise ValueError(
            f"`scene_frames` {counts} sums to {sum(counts)} frames but the video has {len(video)}; "
            "the counts must add up to the video's frame count."
        )
    bounds = np.cumsum([0] + counts)
    return [video[bounds[i] : bounds[i + 1]] for i in range(len(counts))]


def read_prompts(path: str) -> List[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise ValueError(f"`prompts`: prompt file not found: {path} (expected one scene prompt per line).")
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise ValueError(f"`prompts`: prompt file {path} has no prompts (expected one scene prompt per line).")
    return prompts


def scene_files(folder: str) -> List[str]:
    """``scene_XX.mp4`` files of ``folder``, ordered by scene number."""
    found = []
    for name in os.listdir(folder):
        match = _SCENE_FILE.match(name)
        if match:
            found.append((int(match.group(1)), name))
    return [os.path.join(folder, name) for _, name in sorted(found)]


def load_scenes(video: str, scene_frames: Optional[Union[str, Sequence[int]]] = None) -> List[np.ndarray]:
    """Scenes of a generation output folder or of one mp4.

    * folder, no ``scene_frames``: its ``scene_*.mp4`` files in scene order;
    * folder with ``scene_frames``: its ``video.mp4`` split by the counts;
    * an mp4 file: split by ``scene_frames`` (required).
    """
    if not isinstance(video, (str, os.PathLike)) or not os.path.exists(video):
        raise ValueError(
            f"`video`: {video!r} does not exist; pass an output folder with scene_*.mp4 files or one mp4 file "
            "with scene frame counts."
        )
    video = os.fspath(video)
    if os.path.isdir(video):
        if scene_frames is None:
            files = scene_files(video)
            if not files:
                raise ValueError(
                    f"`video`: folder {video} has no scene_*.mp4 files; pass the folder the generation CLI writes, "
                    f"or its {WHOLE_VIDEO_FILE} / one mp4 together with scene frame counts."
                )
            return [read_video(path) for path in files]
        video = os.path.join(video, WHOLE_VIDEO_FILE)
        if not os.path.isfile(video):
            raise ValueError(f"`video`: with scene frame counts the folder must hold {WHOLE_VIDEO_FILE}; {video} is missing.")
    if scene_frames is None:
        raise ValueError(
            f"`scene_frames` is required with a single video file ({video}): give the frame count of each scene, "
            "e.g. 49,49,49."
        )
    return split_scenes(read_video(video), scene_frames)


def default_prompts_path(video: str) -> str:
    """``prompts.txt`` inside an output folder, or beside a video file."""
    folder = video if os.path.isdir(video) else os.path.dirname(os.path.abspath(video))
    return os.path.join(folder, PROMPTS_FILE)


def evaluate_video(
    video: str,
    encoder: Any,
    prompts: Optional[Union[str, Sequence[str]]] = None,
    scene_frames: Optional[Union[str, Sequence[int]]] = None,
    frame_stride: int = 1,
) -> Dict[str, Any]:
    """:func:`evaluate_scenes` on files (see :func:`load_scenes`). ``prompts``: a list, a text file, or ``None``
    for the ``prompts.txt`` of the folder (or beside the file). Adds ``"video": path`` to the result."""
    scenes = load_scenes(video, scene_frames)
    if prompts is None:
        prompts = default_prompts_path(os.fspath(video))
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(os.fspath(prompts))
    result = evaluate_scenes(scenes, prompts, encoder, frame_stride=frame_stride)
    return {"video": os.fspath(video), **result}


def sample_folders(root: str) -> List[str]:
    """Subfolders of ``root`` that hold at least one ``.mp4`` file, sorted by name."""
    if not os.path.isdir(root):
        raise ValueError(f"`batch`: {root!r} is not a folder; pass a folder with one subfolder per sample.")
    folders = [
        os.path.join(root, name)
        for name in sorted(os.listdir(root))
        if os.path.isdir(os.path.join(root, name))
        and any(f.endswith(".mp4") for f in os.listdir(os.path.join(root, name)))
    ]
    if not folders:
        raise ValueError(f"`batch`: {root} has no sample subfolders with mp4 files (one subfolder per sample).")
    return folders


def evaluate_batch(
    root: str,
    encoder: Any,
    prompts: Optional[Union[str, Sequence[str]]] = None,
    scene_frames: Optional[Union[str, Sequence[int]]] = None,
    frame_stride: int = 1,
    method: str = "t",
    progress: bool = True,
    on_error: Optional[Callable[[str, Exception], None]] = None,
) -> Dict[str, Any]:
    """Evaluate every sample folder of ``root`` (see :func:`sample_folders`) with a tqdm progress bar.

    ``prompts``: ``None`` for each sample's own ``prompts.txt``, else one list/file used for every sample.
    A sample that fails (bad file, prompt count...) is recorded under ``failed`` and skipped.
    Returns ``{"samples": [result...], "failed": [{"sample", "error"}], "summary": {metric: mean/std/interval},
    "interval": method}`` (see :func:`~diffusers_mask2dit.evaluation.metrics.summarize`).
    """
    from tqdm.auto import tqdm

    if method not in ("t", "normal"):
        raise ValueError(f"`method` must be 't' or 'normal'; got {method!r}.")
    check_encoder(encoder)
    folders = sample_folders(root)
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(os.fspath(prompts))
    samples: List[Dict[str, Any]] = []
    failed: List[Dict[str, str]] = []
    for folder in tqdm(folders, desc="evaluate", unit="sample", disable=not progress):
        try:
            result = evaluate_video(folder, encoder, prompts=prompts, scene_frames=scene_frames, frame_stride=frame_stride)
        except ValueError as error:
            failed.append({"sample": folder, "error": str(error)})
            if on_error is not None:
                on_error(folder, error)
            continue
        samples.append({"sample": os.path.basename(folder), **result})
    summary = metrics.summarize(samples, method=method) if samples else {}
    return {"samples": samples, "failed": failed, "summary": summary, "interval": method}
