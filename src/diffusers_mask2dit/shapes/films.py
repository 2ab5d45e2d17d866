"""Shapes-world "films": long videos of several shots with hard cuts, for testing ``mask2dit prepare-data``.

A film follows a *story*: one background and one cast shape (the film's character), each shot with its own
random colour, direction and start (a world scene rendered over ``8k + 1`` frames, so that sampling 9 frames
with a stride of ``k`` gives exactly the world's 9-frame render). At each cut, with probability
``unrelated_fraction``, the film switches to an unrelated story (another background *and* another shape, as if
an unrelated film had been spliced in) and stays with it. The ground truth (every cut's frame, every shot's
story) is written beside the videos, so detection and the relevance filter can be checked exactly.

Why a cast shape: with the evaluation's :class:`~diffusers_mask2dit.shapes.score.ShapesEncoder` two shots of one
story have a cosine of at least 1/2 + 1/6 (same background, same shape) and two shots of unrelated stories at
most 2/6 (colour and direction may agree). The mean pairwise similarity of a 3-shot group is therefore at least
0.667 when all its shots share a story and at most (1 + 2 x 1/3) / 3 = 0.556 when one does not: any threshold
in between keeps exactly the related groups.

The data tool reaches this module by injection, never by import: ``--encoder
diffusers_mask2dit.shapes.films:encoder --captioner diffusers_mask2dit.shapes.films:captioner``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import world

SHOT_STRIDES = (2, 3)  # a shot spans (9 - 1) * stride + 1 frames: 17 or 25


@dataclass(frozen=True)
class Story:
    """What related shots share: the background and the cast shape."""

    background: str
    shape: str


def _other_story(rng: np.random.Generator, story: Story) -> Story:
    backgrounds = [b for b in world.BACKGROUNDS if b != story.background]
    shapes = [s for s in world.SHAPES if s != story.shape]
    return Story(str(rng.choice(backgrounds)), str(rng.choice(shapes)))


def sample_film(rng: np.random.Generator, num_shots: int, unrelated_fraction: float) -> List[Dict[str, Any]]:
    """The shots of one film: ``[{"scene": world.Scene, "frames": int, "story": int}, ...]`` in order."""
    story = Story(str(rng.choice(list(world.BACKGROUNDS))), str(rng.choice(list(world.SHAPES))))
    story_index = 0
    shots = []
    for index in range(num_shots):
        if index and rng.random() < unrelated_fraction:
            story, story_index = _other_story(rng, story), story_index + 1
        colour = str(rng.choice(list(world.SHAPE_COLOURS)))
        if shots and colour == shots[-1]["scene"].colour and story_index == shots[-1]["story"]:
            # Consecutive shots of one story differ in colour, so every cut changes pixels a detector can see.
            colour = str(rng.choice([c for c in world.SHAPE_COLOURS if c != colour]))
        direction = str(rng.choice(list(world.DIRECTIONS)))
        prompt = world.PROMPT_TEMPLATE.format(colour=colour, shape=story.shape, direction=direction)
        scene = world.sample_scene(rng, story.background, prompt)
        frames = (world.FRAMES - 1) * int(rng.choice(SHOT_STRIDES)) + 1
        shots.append({"scene": scene, "frames": frames, "story": story_index})
    return shots


def write_films(
    folder: str, num_films: int, num_shots: int = 8, unrelated_fraction: float = 0.3, seed: int = 0, progress: bool = True
) -> str:
    """Write ``num_films`` lossless mp4 films into ``folder`` and their ground truth ``folder/truth.jsonl``.

    ``truth.jsonl``: one line per film, ``{"video": name, "cuts": [frame, ...], "shots": [{"start_frame",
    "end_frame", "story", "prompt", "background", ...}, ...]}``; a cut is the first frame of a new shot. Films
    already written are kept. Returns the truth file's path.
    """
    from tqdm.auto import tqdm

    if num_films < 1 or num_shots < 1:
        raise ValueError(f"`num_films` and `num_shots` must be at least 1; got {num_films} and {num_shots}.")
    if not 0.0 <= unrelated_fraction <= 1.0:
        raise ValueError(f"`unrelated_fraction` must be in [0, 1]; got {unrelated_fraction}.")
    os.makedirs(folder, exist_ok=True)
    lines = []
    for film in tqdm(range(num_films), desc="shapes films", disable=not progress):
        shots = sample_film(world.scene_rng(seed, film), num_shots, unrelated_fraction)
        name = f"film_{film:05d}.mp4"
        records, start = [], 0
        for shot in shots:
            records.append({"start_frame": start, "end_frame": start + shot["frames"], "story": shot["story"], **shot["scene"].to_dict()})
            start += shot["frames"]
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            frames = np.concatenate([world.render_scene(s["scene"], s["frames"]) for s in shots])
            world.write_lossless_mp4(frames, path)
        lines.append(json.dumps({"video": name, "cuts": [r["start_frame"] for r in records[1:]], "shots": records}))
    truth = os.path.join(folder, "truth.jsonl")
    tmp = truth + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, truth)
    return truth


def read_truth(folder: str) -> Dict[str, Dict[str, Any]]:
    """``{video name: truth record}`` of a films folder written by :func:`write_films`."""
    with open(os.path.join(folder, "truth.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return {record["video"]: record for record in records}


# --------------------------------------------------------------------------- injected into the data tool


def encoder() -> Any:
    """The world's exact scorer as the data tool's shot encoder (``encode_video``)."""
    from .score import ShapesEncoder

    return ShapesEncoder()


class GroundTruthCaptioner:
    """Captions a shot with the world prompt its pixels show, read by the exact scorer; "" when unreadable."""

    def caption(self, frames: np.ndarray, context: Optional[Dict[str, Any]] = None) -> str:
        from .score import read_scene

        reading = read_scene(frames)
        if None in (reading.colour, reading.shape, reading.direction):
            return ""
        return world.PROMPT_TEMPLATE.format(colour=reading.colour, shape=reading.shape, direction=reading.direction)


def captioner() -> GroundTruthCaptioner:
    return GroundTruthCaptioner()


def related_groups(truth: Dict[str, Any], starts: Sequence[int], size: int) -> List[bool]:
    """For groups of ``size`` consecutive shots starting at shot indices ``starts``: whether all share one story."""
    stories = [shot["story"] for shot in truth["shots"]]
    return [len(set(stories[s : s + size])) == 1 for s in starts]
