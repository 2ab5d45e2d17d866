"""Reading and writing videos: mp4 through imageio-ffmpeg, contact sheets as PNG.

Frames are ``uint8`` arrays ``(F, H, W, 3)`` unless a function says otherwise. Files are written to a
temporary name in the target folder and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_FONT_SIZE = 13
LABEL_HEIGHT = 20  # pixels of the text line above each contact sheet row

FrameLike = Union[np.ndarray, "Image.Image", "torch.Tensor"]  # noqa: F821


class VideoReadError(ValueError):
    """A video file is missing, unreadable or has no frames."""


class VideoTooShortError(VideoReadError):
    """A video has fewer frames than were asked for."""


# ffmpeg prefixes its messages with "[in#0 @ 0x55...] "; its banner (version, build options, library versions)
# says nothing about the file.
_FFMPEG_CONTEXT = re.compile(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*")
_FFMPEG_BANNER = ("ffmpeg version", "built with", "configuration:", "libav", "libsw", "libpostproc", "=== stderr",
                  "FFMPEG call failed", "Could not load meta information")


def ffmpeg_reason(error: BaseException) -> str:
    """The one line of an ffmpeg failure that says what is wrong with the file, without ffmpeg's banner."""
    reasons: List[str] = []
    for line in str(error).splitlines():
        line = _FFMPEG_CONTEXT.sub("", line.strip())
        if line and not line.startswith(_FFMPEG_BANNER) and line not in reasons:
            reasons.append(line)
    # ffmpeg ends with its most general complaint ("Error opening input files: Invalid data ..."); the
    # context lines before it ("moov atom not found") say why.
    specific = [r for r in reasons if not r.startswith(("Error opening input", "Format "))]
    return "; ".join((specific or reasons)[-2:]) or type(error).__name__


def to_uint8_frames(frames: Union[Sequence[FrameLike], np.ndarray]) -> np.ndarray:
    """Frames as ``uint8 (F, H, W, 3)``.

    Accepts a list of PIL images, a float array in [0, 1] or a uint8 array ``(F, H, W, 3)``, or a torch
    tensor ``(F, 3, H, W)`` / ``(F, H, W, 3)`` in [0, 1].
    """
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().float().cpu().numpy()
        if frames.ndim == 4 and frames.shape[1] in (1, 3) and frames.shape[-1] not in (1, 3):
            frames = frames.transpose(0, 2, 3, 1)
    if isinstance(frames, np.ndarray):
        array = frames
    else:
        array = np.stack([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in frames])
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"`frames` must be (F, H, W, 3); got an array of shape {array.shape}.")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def write_atomically(path: str, write: Callable[[str], Any]) -> str:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same extension), then rename it to ``path``: a
    crash never leaves a half-written ``path``. The file is readable by everyone (0644). Returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for people to open
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_video(frames: Union[Sequence[FrameLike], np.ndarray], path: str, fps: int = 8) -> str:
    """Write frames as an H.264 mp4 (imageio-ffmpeg). Returns ``path``."""
    import imageio.v2 as imageio

    array = to_uint8_frames(frames)
    # H.264 with yuv420p needs even sizes; pad by one pixel rather than resample.
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")

    def write(tmp: str) -> None:
        writer = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1)
        for frame in array:
            writer.append_data(frame)
        writer.close()

    return write_atomically(path, write)


def count_frames(path: str) -> int:
    """Exact number of decodable frames of a video (decodes it once, without copying pixels)."""
    import imageio_ffmpeg

    if not os.path.isfile(path):
        raise VideoReadError(f"Video file not found: {path}")
    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(path)
    except Exception as error:  # ffmpeg reports corrupt files with several exception types
        raise VideoReadError(f"Could not decode video {path}: {ffmpeg_reason(error)}") from error
    if frames <= 0:
        raise VideoReadError(f"Video {path} has no frames.")
    return int(frames)


def read_video(path: str, pick: Optional[Callable[[int], Sequence[int]]] = None) -> np.ndarray:
    """Frames of a video file as ``uint8 (F, H, W, 3)``: all of them, or those ``pick(total_frames)`` names.

    Frames are streamed, so only the picked ones are held in memory (a long 720p clip stays cheap).

    Raises:
        VideoReadError: missing or undecodable file, or no frames.
        VideoTooShortError: fewer frames than ``pick`` asks for (``pick`` may raise it too).
    """
    import imageio_ffmpeg

    if not os.path.isfile(path):
        raise VideoReadError(f"Video file not found: {path}")
    indices = None
    if pick is not None:
        try:
            indices = np.asarray(pick(count_frames(path)), dtype=np.int64)
        except VideoTooShortError as error:
            raise VideoTooShortError(f"Video {path} {error}") from None
    wanted = None if indices is None else set(int(i) for i in indices)
    last = None if indices is None else int(indices.max())
    kept: Dict[int, np.ndarray] = {}
    try:
        stream = imageio_ffmpeg.read_frames(path)
        meta = next(stream)
        width, height = meta["size"]
        try:
            for index, raw in enumerate(stream):
                if wanted is None or index in wanted:
                    kept[index] = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy()
                if last is not None and index >= last:
                    break
        finally:
            stream.close()
    except Exception as error:  # ffmpeg reports corrupt files with several exception types
        raise VideoReadError(f"Could not decode video {path}: {ffmpeg_reason(error)}") from error
    if not kept:
        raise VideoReadError(f"Video {path} has no frames.")
    if indices is None:
        return np.stack([kept[i] for i in sorted(kept)])
    if len(kept) < len(wanted):
        raise VideoTooShortError(f"Video {path} ended before frame {last}")
    return np.stack([kept[int(i)] for i in indices])


def join_videos(paths: Sequence[str], path: str) -> str:
    """Join mp4 files of the same size and codec into ``path`` without re-encoding (ffmpeg's concat demuxer with
    stream copy): the frames are exactly those of the parts, in order. Returns ``path``."""
    import imageio_ffmpeg

    def write(tmp: str) -> None:
        listing = tmp + ".txt"
        try:
            with open(listing, "w", encoding="utf-8") as handle:
                for part in paths:  # concat's list syntax: quote with ', escape ' as '\''
                    handle.write("file '" + os.path.abspath(part).replace("'", "'\\''") + "'\n")
            command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "concat", "-safe", "0", "-i",
                       listing, "-c", "copy", "-f", "mp4", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
        finally:
            if os.path.exists(listing):
                os.remove(listing)
        if result.returncode != 0:
            raise OSError(f"Could not join {len(paths)} videos into {path}: {ffmpeg_reason(RuntimeError(result.stderr))}")

    return write_atomically(path, write)


def _label_font() -> "ImageFont.ImageFont":
    try:
        return ImageFont.load_default(size=LABEL_FONT_SIZE)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _label_strip(text: str, width: int, height: int, font: "ImageFont.ImageFont", highlight: bool) -> np.ndarray:
    """A white strip ``(height, width, 3)`` with ``text`` on it, shortened with "..." to fit."""
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    fits = lambda candidate: draw.textlength(candidate, font=font) <= width - 8  # noqa: E731
    if not fits(text):
        while text and not fits(text + "..."):
            text = text[:-1]
        text = text.rstrip() + "..."
    draw.text((4, 2), text, fill=(180, 60, 0) if highlight else (0, 0, 0), font=font)
    return np.asarray(strip)


def contact_sheet(
    scenes: Sequence[Union[Sequence[FrameLike], np.ndarray]],
    path: str,
    frames_per_row: int = 8,
    thumb_height: int = 96,
    margin: int = 2,
    labels: Optional[Sequence[str]] = None,
    highlighted: Optional[Sequence[bool]] = None,
) -> str:
    """Write a PNG grid: one row per scene, ``frames_per_row`` frames spread evenly across each scene.

    With ``labels`` (one per scene) each row gets a line of text above it; rows whose ``highlighted`` entry is
    true have their label drawn in orange (the commands mark scenes made by scene extension this way).
    """
    if labels is not None and len(labels) != len(scenes):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(scenes)} scenes; give one per scene.")
    rows: List[np.ndarray] = []
    for scene in scenes:
        array = to_uint8_frames(scene)
        picks = np.linspace(0, len(array) - 1, num=min(frames_per_row, len(array))).round().astype(int)
        height, width = array.shape[1:3]
        thumb_width = max(1, round(width * thumb_height / height))
        thumbs = [np.asarray(Image.fromarray(array[i]).resize((thumb_width, thumb_height), Image.BILINEAR)) for i in picks]
        # A white margin around every thumbnail keeps frames and scene rows apart.
        thumbs = [np.pad(t, ((margin, margin), (margin, margin), (0, 0)), constant_values=255) for t in thumbs]
        rows.append(np.concatenate(thumbs, axis=1))
    sheet_width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, sheet_width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    if labels is not None:
        font = _label_font()
        marks = list(highlighted) if highlighted is not None else [False] * len(rows)
        rows = [
            np.concatenate([_label_strip(text, sheet_width, LABEL_HEIGHT, font, mark), row], axis=0)
            for text, mark, row in zip(labels, marks, rows)
        ]
    sheet = np.concatenate(rows, axis=0)
    return write_atomically(path, lambda tmp: Image.fromarray(sheet).save(tmp, format="PNG"))
