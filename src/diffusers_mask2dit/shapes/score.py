"""Exact scorer of the Shapes world, from decoded pixels only.

Per scene (frames ``uint8 (F, H, W, 3)``) it reads:

- **background**: every frame's pixels vote for their nearest background colour; the winner must hold most of
  the frame, be the same in every frame, and its median colour must be near that palette colour and clearly
  nearer to it than to any other (a colour half-way between two backgrounds is *unknown*, not a guess);
- **shape mask**: pixels nearer to one of the four shape colours than to the measured background colour; the
  largest 4-connected blob of each frame is the shape (specks elsewhere are ignored);
- **shape colour**: the blob pixels' nearest shape colour, one colour for at least 75% of them over the scene,
  with the same margin test on their median colour;
- **shape**: per frame, how full the corners of the blob's bounding box are, top and bottom (a square fills
  all four, a circle little of any, an up-pointing triangle only the bottom two), nearest to one of the three
  measured prototypes with a margin, size near 40% of the frame height; at least 2 of 3 frames must agree;
- **direction**: the least-squares line through the blob's centroids: the displacement along the dominant
  axis must be at least half the world's travel (30% of the frame), the other axis small, and the track
  straight (small residuals).

Anything that fails its test is ``None`` (unknown), which never counts as correct or as consistent, so the
scorer cannot be fooled by a blurred colour, a blob, a still shape or a shape that changes on the way.

Metrics of a multi-scene video: **prompt accuracy** (share of scenes whose colour, shape and direction all
match the prompt) and **identity consistency** (share of scene pairs with the same, known background).
`ShapesEncoder` exposes the same readings to `diffusers_mask2dit.evaluation` (see its docstring for what the
paper's visual/semantic/sequence consistency mean in this world).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import world

# Tests of the readings (distances are Euclidean in 8-bit RGB).
BACKGROUND_MAX_DISTANCE = 30.0  # median background colour to its palette colour
COLOUR_MAX_DISTANCE = 60.0  # median shape colour to its palette colour
MARGIN_RATIO = 0.5  # the nearest palette colour must be at most this fraction of the distance to the second
BACKGROUND_MIN_SHARE = 0.6  # of a frame's pixels voting for the winning background
COLOUR_MIN_SHARE = 0.75  # of the scene's blob pixels voting for the winning shape colour
SHAPE_MARGIN_RATIO = 0.75  # nearest shape prototype at most this fraction of the distance to the second
SHAPE_MIN_FRAMES = 2 / 3  # share of frames that must agree on the shape
CORNER_FRACTION = 0.3  # side of the corner regions of a blob's bounding box, as a share of the box's side
SIZE_RANGE = (0.6, 1.4)  # blob bounding box side / the world's shape size
MIN_TRAVEL = 0.5  # dominant displacement / the world's travel, at least
MAX_TRAVEL = 1.6  # ... and at most
MAX_CROSS_RATIO = 0.35  # displacement across / along the dominant axis, at most
MAX_RESIDUAL = 0.2  # RMS distance of the centroids to their fitted line / the world's travel, at most
MIN_TRACK_FRAMES = 5  # frames with a valid blob needed to read a direction


@dataclass
class SceneReading:
    """What the scorer read from one scene; ``None`` where a test failed."""

    background: Optional[str]
    colour: Optional[str]
    shape: Optional[str]
    direction: Optional[str]
    details: Dict[str, Any]

    def attributes(self) -> Tuple[Optional[str], Optional[str], Optional[str]]:
        return self.colour, self.shape, self.direction

    def matches(self, prompt: str) -> bool:
        """True when colour, shape and direction are all read and all equal the prompt's."""
        return self.attributes() == world.parse_prompt(prompt) and None not in self.attributes()

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- colours


def _palette(names: Sequence[str], table: Dict[str, Tuple[int, int, int]]) -> np.ndarray:
    return np.asarray([table[name] for name in names], dtype=np.float64)


BACKGROUND_NAMES = tuple(world.BACKGROUNDS)
COLOUR_NAMES = tuple(world.SHAPE_COLOURS)
_BACKGROUND_RGB = _palette(BACKGROUND_NAMES, world.BACKGROUNDS)
_COLOUR_RGB = _palette(COLOUR_NAMES, world.SHAPE_COLOURS)


def nearest_with_margin(colour: np.ndarray, palette: np.ndarray, max_distance: float, ratio: float = MARGIN_RATIO) -> Optional[int]:
    """Index of the palette colour nearest ``colour`` if it is within ``max_distance`` and at most ``ratio`` times
    the distance to the second nearest; otherwise None."""
    distances = np.linalg.norm(palette - np.asarray(colour, dtype=np.float64)[None], axis=1)
    order = np.argsort(distances)
    first, second = distances[order[0]], distances[order[1]]
    if first <= max_distance and first <= ratio * second:
        return int(order[0])
    return None


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(N,)`` index of the nearest palette colour of each pixel ``(N, 3)``."""
    distances = (palette * palette).sum(1)[None, :] - 2.0 * pixels @ palette.T  # |p - c|^2 - |p|^2
    return distances.argmin(1)


def read_background(frames: np.ndarray) -> Tuple[Optional[str], np.ndarray, Dict[str, Any]]:
    """The scene's background name (or None), the measured background colour of every frame ``(F, 3)``, details."""
    pixels = frames.reshape(len(frames), -1, 3).astype(np.float64)
    winners, shares, colours = [], [], []
    for frame in pixels:
        votes = _nearest(frame, _BACKGROUND_RGB)
        counts = np.bincount(votes, minlength=len(BACKGROUND_NAMES))
        winner = int(counts.argmax())
        winners.append(winner)
        shares.append(counts[winner] / len(frame))
        colours.append(np.median(frame[votes == winner], axis=0))
    colours = np.asarray(colours)
    details = {"background_share_min": float(min(shares))}
    name = None
    if len(set(winners)) == 1 and min(shares) >= BACKGROUND_MIN_SHARE:
        index = nearest_with_margin(np.median(colours, axis=0), _BACKGROUND_RGB, BACKGROUND_MAX_DISTANCE)
        if index == winners[0]:
            name = BACKGROUND_NAMES[index]
    return name, colours, details


# ---------------------------------------------------------------------------------------------- blobs


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a ``bool (H, W)`` mask (all False when the mask is empty).

    Vectorised union-find: neighbouring foreground pixels hook the larger root onto the smaller one, then paths
    are compressed, until every neighbour pair shares a root. Ties in size go to the region found first in
    row-major order.
    """
    if not mask.any():
        return np.zeros_like(mask)
    height, width = mask.shape
    index = np.arange(mask.size).reshape(mask.shape)
    right = mask[:, :-1] & mask[:, 1:]
    down = mask[:-1, :] & mask[1:, :]
    first = np.concatenate([index[:, :-1][right], index[:-1, :][down]])
    second = np.concatenate([index[:, 1:][right], index[1:, :][down]])
    parent = np.arange(mask.size)
    while True:
        root_a, root_b = parent[first], parent[second]
        if np.array_equal(root_a, root_b):
            break
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    roots = parent[mask.reshape(-1)]
    counts = np.bincount(roots, minlength=mask.size)
    return (parent == int(counts.argmax())).reshape(height, width) & mask


def shape_masks(frames: np.ndarray, background_colours: np.ndarray) -> np.ndarray:
    """``bool (F, H, W)``: per frame, the largest blob of pixels nearer to a shape colour than to the background."""
    masks = []
    for frame, background in zip(frames.astype(np.float64), background_colours):
        palette = np.concatenate([background[None], _COLOUR_RGB])
        nearest = _nearest(frame.reshape(-1, 3), palette).reshape(frame.shape[:2])
        masks.append(largest_component(nearest > 0))
    return np.stack(masks)


def blob_features(mask: np.ndarray) -> Optional[Dict[str, float]]:
    """Centroid, bounding box size and how full the box's top and bottom corners are; None if the mask is empty.

    ``top_corners`` / ``bottom_corners``: the filled share of the two square regions (30% of the box's side) in
    the box's upper / lower corners. A square fills all four, a circle little of any, an up-pointing triangle
    its bottom corners only; blur rounds a square's corners but leaves the three far apart.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[top:bottom, left:right].astype(np.float64)
    corner_h = max(1, int(round(CORNER_FRACTION * box.shape[0])))
    corner_w = max(1, int(round(CORNER_FRACTION * box.shape[1])))
    upper, lower = box[:corner_h], box[-corner_h:]
    return {
        "x": float(xs.mean() + 0.5),
        "y": float(ys.mean() + 0.5),
        "box_height": float(bottom - top),
        "box_width": float(right - left),
        "top_corners": float((upper[:, :corner_w].mean() + upper[:, -corner_w:].mean()) / 2),
        "bottom_corners": float((lower[:, :corner_w].mean() + lower[:, -corner_w:].mean()) / 2),
    }


@functools.lru_cache(maxsize=None)
def shape_prototypes(height: int = world.HEIGHT, width: int = world.WIDTH) -> Dict[str, Tuple[float, float]]:
    """Mean ``(top_corners, bottom_corners)`` of each shape rendered at 64 positions: what a perfect blob measures."""
    rng = np.random.default_rng(0)
    prototypes = {}
    half = world.shape_size(height) / 2
    for shape in world.SHAPES:
        features = []
        for _ in range(64):
            centre = (rng.uniform(half, width - half), rng.uniform(half, height - half))
            feats = blob_features(world.shape_mask(shape, centre, height, width))
            features.append((feats["top_corners"], feats["bottom_corners"]))
        prototypes[shape] = tuple(np.mean(features, axis=0).tolist())
    return prototypes


def classify_blob(features: Optional[Dict[str, float]], height: int, width: int) -> Optional[str]:
    """The shape a blob is, or None (wrong size, or not clearly nearest one prototype)."""
    if features is None:
        return None
    size = world.shape_size(height)
    for side in (features["box_height"], features["box_width"]):
        if not SIZE_RANGE[0] * size <= side <= SIZE_RANGE[1] * size:
            return None
    point = np.asarray([features["top_corners"], features["bottom_corners"]])
    names = list(world.SHAPES)
    prototypes = shape_prototypes(height, width)
    distances = np.asarray([np.linalg.norm(point - np.asarray(prototypes[name])) for name in names])
    order = np.argsort(distances)
    if distances[order[0]] <= SHAPE_MARGIN_RATIO * distances[order[1]]:
        return names[order[0]]
    return None


# ---------------------------------------------------------------------------------------------- readings


def read_colour(frames: np.ndarray, masks: np.ndarray) -> Tuple[Optional[str], Dict[str, Any]]:
    pixels = frames[masks].astype(np.float64)
    if len(pixels) == 0:
        return None, {"colour_share": 0.0}
    votes = np.bincount(_nearest(pixels, _COLOUR_RGB), minlength=len(COLOUR_NAMES))
    winner = int(votes.argmax())
    share = float(votes[winner] / len(pixels))
    details = {"colour_share": share}
    if share < COLOUR_MIN_SHARE:
        return None, details
    index = nearest_with_margin(np.median(pixels[_nearest(pixels, _COLOUR_RGB) == winner], axis=0), _COLOUR_RGB, COLOUR_MAX_DISTANCE)
    return (COLOUR_NAMES[index] if index == winner else None), details


def read_shape(features: Sequence[Optional[Dict[str, float]]], height: int, width: int) -> Tuple[Optional[str], Dict[str, Any]]:
    shapes = [classify_blob(f, height, width) for f in features]
    known = [s for s in shapes if s is not None]
    details = {"frame_shapes": shapes}
    if not known:
        return None, details
    values, counts = np.unique(known, return_counts=True)
    winner = str(values[counts.argmax()])
    agree = counts.max() / len(shapes)
    return (winner if agree >= SHAPE_MIN_FRAMES - 1e-9 else None), details


def read_direction(features: Sequence[Optional[Dict[str, float]]], height: int, width: int) -> Tuple[Optional[str], Dict[str, Any]]:
    track = [(index, f["x"], f["y"]) for index, f in enumerate(features) if f is not None]
    if len(track) < MIN_TRACK_FRAMES:
        return None, {"track_frames": len(track)}
    t, x, y = (np.asarray(column, dtype=np.float64) for column in zip(*track))
    span = max(len(features) - 1, 1)
    design = np.stack([t, np.ones_like(t)], axis=1)
    (slope_x, icpt_x), *_ = np.linalg.lstsq(design, x, rcond=None)
    (slope_y, icpt_y), *_ = np.linalg.lstsq(design, y, rcond=None)
    dx, dy = slope_x * span, slope_y * span
    residual = float(np.sqrt(np.mean((x - design @ [slope_x, icpt_x]) ** 2 + (y - design @ [slope_y, icpt_y]) ** 2)))
    details = {"displacement": [float(dx), float(dy)], "track_residual": residual, "track_frames": len(track)}
    horizontal = abs(dx) >= abs(dy)
    along, across = (dx, dy) if horizontal else (dy, dx)
    expected = world.travel("left" if horizontal else "up", height, width)
    if not MIN_TRAVEL * expected <= abs(along) <= MAX_TRAVEL * expected:
        return None, details
    if abs(across) > MAX_CROSS_RATIO * abs(along) or residual > MAX_RESIDUAL * expected:
        return None, details
    if horizontal:
        return ("right" if along > 0 else "left"), details
    return ("down" if along > 0 else "up"), details


def _as_frames(frames: Any) -> np.ndarray:
    from ..video_io import to_uint8_frames

    array = to_uint8_frames(frames)
    if len(array) < 1:
        raise ValueError("`frames` must hold at least one frame.")
    return array


def read_scene(frames: Any) -> SceneReading:
    """Read background, shape colour, shape and direction of one scene ``(F, H, W, 3)`` (uint8, or float in [0, 1])."""
    frames = _as_frames(frames)
    height, width = frames.shape[1:3]
    background, background_colours, details = read_background(frames)
    masks = shape_masks(frames, background_colours)
    features = [blob_features(mask) for mask in masks]
    colour, colour_details = read_colour(frames, masks)
    shape, shape_details = read_shape(features, height, width)
    direction, direction_details = (None, {}) if len(frames) < 2 else read_direction(features, height, width)
    details.update(colour_details, **shape_details, **direction_details)
    return SceneReading(background, colour, shape, direction, details)


# ---------------------------------------------------------------------------------------------- metrics


def score_video(scenes: Sequence[Any], prompts: Sequence[str]) -> Dict[str, Any]:
    """Prompt accuracy and identity consistency of one multi-scene video (one frames array per scene).

    Returns ``{"prompt_accuracy": share of scenes right, "identity_consistency": share of scene pairs with the
    same known background (None for one scene), "scenes": [reading dicts], "correct": [bool], "same_background":
    [bool per pair (i, j), i < j]}``.
    """
    if len(scenes) != len(prompts):
        raise ValueError(f"`prompts` must hold one prompt per scene: {len(prompts)} prompts for {len(scenes)} scenes.")
    readings = [read_scene(frames) for frames in scenes]
    correct = [reading.matches(prompt) for reading, prompt in zip(readings, prompts)]
    pairs = [
        readings[i].background is not None and readings[i].background == readings[j].background
        for i, j in combinations(range(len(readings)), 2)
    ]
    return {
        "prompt_accuracy": float(np.mean(correct)),
        "identity_consistency": float(np.mean(pairs)) if pairs else None,
        "scenes": [reading.to_dict() for reading in readings],
        "prompts": list(prompts),
        "correct": correct,
        "same_background": pairs,
    }


def keeps_background(context_scenes: Sequence[Any], new_scene: Any) -> bool:
    """True when a new scene's background is read and equals that of every context scene (scene extension)."""
    new = read_scene(new_scene).background
    return new is not None and all(read_scene(scene).background == new for scene in context_scenes)


# ---------------------------------------------------------------------------------------------- encoder


class ShapesEncoder:
    """The scorer as a video/text encoder for `diffusers_mask2dit.evaluation` (``encode_video``, ``encode_text``,
    ``encode_frames``), so ``mask2dit evaluate --encoder shapes`` scores world videos with known meaning.

    A scene embeds as four one-hot blocks, ``[background / sqrt(2), colour / sqrt(6), shape / sqrt(6),
    direction / sqrt(6)]`` (each block has an extra "unknown" slot, so the vector always has unit norm); a
    prompt embeds as ``[0, colour / sqrt(3), shape / sqrt(3), direction / sqrt(3)]``. Therefore:

    - visual consistency = 100 x mean over scene pairs of ``(1/2) [same background] + (1/6) #(shared colour,
      shape, direction)``: 50 points measure the hidden identity, 50 how alike the contents are;
    - semantic consistency = ``100 / sqrt(18)`` x matched prompt attributes, i.e. ``70.7 x`` the share of the
      prompt's colour, shape and direction that the scene shows (70.7 is a perfect score);
    - sequence consistency is their mean, as in the paper. An unknown reading matches no prompt word; two
      unknown readings of the same block count as alike in visual consistency.
    """

    blocks = (BACKGROUND_NAMES, COLOUR_NAMES, world.SHAPES, world.DIRECTIONS)
    video_weights = (1 / np.sqrt(2), 1 / np.sqrt(6), 1 / np.sqrt(6), 1 / np.sqrt(6))
    text_weights = (0.0, 1 / np.sqrt(3), 1 / np.sqrt(3), 1 / np.sqrt(3))

    def _embed(self, values: Sequence[Optional[str]], weights: Sequence[float]) -> np.ndarray:
        parts = []
        for names, value, weight in zip(self.blocks, values, weights):
            block = np.zeros(len(names) + 1, dtype=np.float32)
            block[names.index(value) if value is not None else len(names)] = weight
            parts.append(block)
        return np.concatenate(parts)

    def encode_video(self, frames: Any) -> np.ndarray:
        reading = read_scene(frames)
        return self._embed((reading.background, reading.colour, reading.shape, reading.direction), self.video_weights)

    def encode_frames(self, frames: Any) -> np.ndarray:
        """Per frame: background, colour and shape of that frame alone (a single frame has no direction)."""
        return np.stack([self.encode_video(frame[None]) for frame in _as_frames(frames)])

    def encode_text(self, text: str) -> np.ndarray:
        colour, shape, direction = world.parse_prompt(text, "text")
        return self._embed((None, colour, shape, direction), self.text_weights)
