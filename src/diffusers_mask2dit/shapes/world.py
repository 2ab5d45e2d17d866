"""The Shapes world: flat-colour backgrounds with one flat-colour shape moving in a straight line.

Everything here is fixed by issue 11 so that results can be checked from pixels by anyone:

- six background colours (the *hidden identity* of a video, never named in a prompt), four shape colours,
  three shapes (circle, square, up-pointing triangle) about 40% of the frame height across, four motions
  (the centre travels 30% of the frame's width or height at constant speed, starting where the shape stays
  inside the frame);
- a scene's prompt is exactly ``a {colour} {shape} moves {direction}``;
- a multi-scene video (the SFT stage) is n scenes sharing one background, each with its own random prompt;
  a pretraining sample is n unrelated single scenes, each with its own background.

Frames are ``48 x 48`` pixels, 9 per scene (3 latent frames of the CogVideoX VAE, ``6 x 6`` latents, ``3 x 3``
patches of the transformer), shown at 8 fps: small enough to train on a 2-core CPU, large enough for a 19-pixel
shape to keep its outline through a lossy mp4 and the VAE (at 32 x 32 a 13-pixel shape is misread even in some
exact renders; 64 x 64 costs the VAE 1.6x more to train than 48 x 48).

Rendering is exact and deterministic: a pixel belongs to the shape when its centre lies inside the shape's
outline (no anti-aliasing), so decoded videos can be scored against the palette without ambiguity. Every
random choice comes from ``numpy.random.default_rng`` seeded with integers, the same on every machine.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# ---------------------------------------------------------------------------------------------- the world

BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "navy": (35, 45, 120),
    "forest": (35, 95, 55),
    "maroon": (115, 40, 50),
    "slate": (85, 90, 100),
    "plum": (95, 50, 115),
    "teal": (35, 105, 115),
}
SHAPE_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (240, 60, 60),
    "green": (80, 220, 90),
    "blue": (90, 150, 255),
    "yellow": (250, 230, 60),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
# Unit steps in image coordinates (x to the right, y downwards).
DIRECTION_VECTORS: Dict[str, Tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

HEIGHT = 48
WIDTH = 48
FRAMES = 9  # per scene: 8k+1, three latent frames of the CogVideoX VAE
FPS = 8
SHAPE_FRACTION = 0.4  # the shape's bounding box is this fraction of the frame height across
TRAVEL_FRACTION = 0.3  # the centre travels this fraction of the width (left/right) or height (up/down)

PROMPT_TEMPLATE = "a {colour} {shape} moves {direction}"


def vocabulary() -> Dict[str, Tuple[str, ...]]:
    """The words a prompt may use, by slot, in prompt order."""
    return {
        "article": ("a",),
        "colour": tuple(SHAPE_COLOURS),
        "shape": SHAPES,
        "verb": ("moves",),
        "direction": DIRECTIONS,
    }


def all_prompts() -> List[str]:
    """The 48 prompts of the world, in a fixed order."""
    return [
        PROMPT_TEMPLATE.format(colour=c, shape=s, direction=d) for c in SHAPE_COLOURS for s in SHAPES for d in DIRECTIONS
    ]


def parse_prompt(prompt: str, name: str = "prompt") -> Tuple[str, str, str]:
    """``(colour, shape, direction)`` of a world prompt such as ``"a red circle moves left"``.

    Case and surrounding spaces are ignored. Raises a ValueError naming ``name``, the words that are not in
    the world's vocabulary and the accepted words of every slot.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"`{name}` must be a string like 'a red circle moves left'; got {type(prompt).__name__}.")
    words = prompt.strip().lower().split()
    slots = vocabulary()
    accepted = "; ".join(f"{slot}: {', '.join(words_)}" for slot, words_ in slots.items())
    known = {word for words_ in slots.values() for word in words_}
    unknown = [word for word in words if word not in known]
    if unknown:
        raise ValueError(
            f"`{name}` {prompt!r} uses words outside the Shapes world's vocabulary: {', '.join(unknown)}. "
            f"A prompt is '{PROMPT_TEMPLATE}' with {accepted}."
        )
    if len(words) != len(slots) or any(word not in slot_words for word, slot_words in zip(words, slots.values())):
        raise ValueError(
            f"`{name}` {prompt!r} is not of the form '{PROMPT_TEMPLATE}' (e.g. 'a red circle moves left'); {accepted}."
        )
    return words[1], words[2], words[4]


def shape_size(height: int = HEIGHT) -> float:
    """Side of the shape's bounding box in pixels."""
    return SHAPE_FRACTION * height


def travel(direction: str, height: int = HEIGHT, width: int = WIDTH) -> float:
    """Distance in pixels the centre travels over a scene moving in ``direction``."""
    return TRAVEL_FRACTION * (width if direction in ("left", "right") else height)


@dataclass(frozen=True)
class Scene:
    """One scene: background, shape colour, shape, direction and the centre ``(x, y)`` in the first frame (pixels)."""

    background: str
    colour: str
    shape: str
    direction: str
    start: Tuple[float, float]

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(colour=self.colour, shape=self.shape, direction=self.direction)

    def centres(self, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
        """``(frames, 2)`` centre ``(x, y)`` of every frame: constant speed from ``start``."""
        dx, dy = DIRECTION_VECTORS[self.direction]
        steps = np.arange(frames, dtype=np.float64) / max(frames - 1, 1)
        distance = travel(self.direction, height, width) * steps
        return np.stack([self.start[0] + dx * distance, self.start[1] + dy * distance], axis=1)

    def to_dict(self) -> Dict[str, object]:
        return {
            "background": self.background,
            "colour": self.colour,
            "shape": self.shape,
            "direction": self.direction,
            "start": [float(self.start[0]), float(self.start[1])],
            "prompt": self.prompt,
        }


def _start_range(direction: str, axis: int, height: int, width: int) -> Tuple[float, float]:
    """Where the first centre may be along ``axis`` (0 = x, 1 = y) so the shape stays inside for the whole scene."""
    half = shape_size(height) / 2
    extent = width if axis == 0 else height
    low, high = half, extent - half
    step = DIRECTION_VECTORS[direction][axis]
    if step < 0:
        low += travel(direction, height, width)
    elif step > 0:
        high -= travel(direction, height, width)
    return low, high


def sample_scene(
    rng: np.random.Generator,
    background: Optional[str] = None,
    prompt: Optional[str] = None,
    height: int = HEIGHT,
    width: int = WIDTH,
) -> Scene:
    """A random scene; ``background`` and ``prompt`` fix those parts (the start position stays random)."""
    background = background if background is not None else str(rng.choice(list(BACKGROUNDS)))
    if background not in BACKGROUNDS:
        raise ValueError(f"`background` must be one of {list(BACKGROUNDS)}; got {background!r}.")
    if prompt is None:
        colour = str(rng.choice(list(SHAPE_COLOURS)))
        shape = str(rng.choice(list(SHAPES)))
        direction = str(rng.choice(list(DIRECTIONS)))
    else:
        colour, shape, direction = parse_prompt(prompt)
    start = tuple(float(rng.uniform(*_start_range(direction, axis, height, width))) for axis in (0, 1))
    return Scene(background, colour, shape, direction, start)


def sample_video(
    rng: np.random.Generator,
    num_scenes: int,
    prompts: Optional[Sequence[str]] = None,
    background: Optional[str] = None,
    height: int = HEIGHT,
    width: int = WIDTH,
) -> List[Scene]:
    """``num_scenes`` scenes sharing one (random unless given) background, each with its own prompt."""
    if prompts is not None and len(prompts) != num_scenes:
        raise ValueError(f"`prompts` must hold {num_scenes} prompts (one per scene); got {len(prompts)}.")
    background = background if background is not None else str(rng.choice(list(BACKGROUNDS)))
    return [
        sample_scene(rng, background, None if prompts is None else prompts[i], height, width) for i in range(num_scenes)
    ]


# ---------------------------------------------------------------------------------------------- rendering


def shape_mask(shape: str, centre: Tuple[float, float], height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """``bool (height, width)``: pixels whose centre lies inside the shape centred at ``centre``."""
    if shape not in SHAPES:
        raise ValueError(f"`shape` must be one of {list(SHAPES)}; got {shape!r}.")
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5 - centre[1]
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5 - centre[0]
    half = shape_size(height) / 2
    if shape == "circle":
        return xs * xs + ys * ys <= half * half
    if shape == "square":
        return (np.abs(xs) <= half) & (np.abs(ys) <= half)
    # Up-pointing triangle in the bounding box: apex at the top centre, base along the bottom edge.
    depth = ys + half  # distance below the apex
    return (depth >= 0) & (ys <= half) & (2 * np.abs(xs) <= depth)


def render_scene(scene: Scene, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """The scene's frames as ``uint8 (frames, height, width, 3)``."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[scene.background]
    colour = np.asarray(SHAPE_COLOURS[scene.colour], dtype=np.uint8)
    for index, centre in enumerate(scene.centres(frames, height, width)):
        video[index][shape_mask(scene.shape, tuple(centre), height, width)] = colour
    return video


def render_video(scenes: Sequence[Scene], frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> List[np.ndarray]:
    """One ``uint8 (frames, height, width, 3)`` array per scene."""
    return [render_scene(scene, frames, height, width) for scene in scenes]


# ---------------------------------------------------------------------------------------------- datasets


def scene_rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator of one item of a dataset: a function of ``(seed, keys)`` only, not of what came before."""
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def write_lossless_mp4(frames: np.ndarray, path: str, fps: int = FPS) -> str:
    """Write ``uint8 (F, H, W, 3)`` frames as a lossless RGB H.264 mp4 (decodes back bit for bit); returns ``path``.

    Training clips are lossless so that what the VAE and the trainer see is exactly the rendered world
    (``video_io.write_video``, used for generated videos, is a lossy yuv420p mp4).
    """
    from ..data.writers import write_clip  # the same lossless RGB encoding as `mask2dit prepare-data` clips

    return write_clip(frames, path, fps, codec="lossless")


def dataset_videos(seed: int, num_videos: int, num_scenes: int) -> Iterator[List[Scene]]:
    """The multi-scene videos of a dataset: video ``i`` is drawn from ``(seed, i)`` alone."""
    for index in range(num_videos):
        yield sample_video(scene_rng(seed, index), num_scenes)


def write_dataset(
    folder: str,
    num_videos: int,
    num_scenes: int = 3,
    seed: int = 0,
    frames: int = FRAMES,
    progress: bool = True,
) -> Dict[str, str]:
    """Write a Shapes dataset in the formats the trainer reads; returns ``{"pretrain": csv, "sft": json, "scenes": jsonl}``.

    ``num_videos`` multi-scene videos of ``num_scenes`` shots each (one background per video), every shot a
    lossless mp4 under ``folder/clips/``. The same clips serve both stages:

    - ``pretrain.csv`` (the authors' pretraining CSV, ``fps,width,height,caption,path,num_frame``) lists every
      shot as a single clip; the trainer groups n random clips per sample, so a pretraining sample is n
      unrelated scenes, each with its own background;
    - ``sft.json`` (the authors' SFT JSON) lists each video's shots in order: n consecutive scenes sharing
      one background;
    - ``scenes.jsonl`` records every shot's ground truth (background, colour, shape, direction, start).

    Clips already written are kept, so an interrupted run resumes; everything is a function of ``seed``.
    """
    from tqdm.auto import tqdm

    if num_videos < 1 or num_scenes < 1:
        raise ValueError(f"`num_videos` and `num_scenes` must be at least 1; got {num_videos} and {num_scenes}.")
    os.makedirs(os.path.join(folder, "clips"), exist_ok=True)
    rows, records, truths = [], [], []
    videos = dataset_videos(seed, num_videos, num_scenes)
    for video_index, scenes in enumerate(tqdm(videos, total=num_videos, desc="shapes dataset", disable=not progress)):
        shots = []
        for scene_index, scene in enumerate(scenes):
            relative = os.path.join("clips", f"{video_index:06d}_{scene_index}.mp4")
            path = os.path.join(folder, relative)
            if not os.path.exists(path):
                write_lossless_mp4(render_scene(scene, frames), path)
            rows.append({"fps": FPS, "width": WIDTH, "height": HEIGHT, "caption": scene.prompt, "path": relative, "num_frame": frames})
            shots.append(
                {
                    "vid": f"{video_index:06d}_{scene_index}",
                    "width": WIDTH,
                    "height": HEIGHT,
                    "duration": frames / FPS,
                    "fps": FPS,
                    "url": relative,
                    "caption": scene.prompt,
                }
            )
            truths.append({"path": relative, "video": video_index, "scene": scene_index, **scene.to_dict()})
        records.append({"prefix": f"shapes-{video_index:06d}", "values": shots})
    paths = {
        "pretrain": os.path.join(folder, "pretrain.csv"),
        "sft": os.path.join(folder, "sft.json"),
        "scenes": os.path.join(folder, "scenes.jsonl"),
    }
    with open(paths["pretrain"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["fps", "width", "height", "caption", "path", "num_frame"])
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["sft"], "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1)
    with open(paths["scenes"], "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(truth) + "\n" for truth in truths)
    return paths
