"""The Shapes world: generator and scorer agree exactly on rendered ground truth, and the scorer is not fooled."""

import csv
import json
import os

import numpy as np
import pytest

from diffusers_mask2dit.shapes import score, world
from diffusers_mask2dit.video_io import read_video, write_video


def _scenes(count, seed=5):
    return [world.sample_scene(world.scene_rng(seed, index)) for index in range(count)]


def _assert_reads(reading, scene):
    assert (reading.background, reading.colour, reading.shape, reading.direction) == (
        scene.background, scene.colour, scene.shape, scene.direction
    ), reading.details


def test_prompt_grammar_and_vocabulary():
    assert len(world.all_prompts()) == 48
    assert world.parse_prompt("a red circle moves left") == ("red", "circle", "left")
    assert world.parse_prompt("  A Blue Square moves UP ") == ("blue", "square", "up")
    with pytest.raises(ValueError, match=r"outside the Shapes world's vocabulary: purple, cat.*colour: red, green, blue, yellow"):
        world.parse_prompt("a purple cat moves left", "prompt")
    with pytest.raises(ValueError, match="not of the form"):
        world.parse_prompt("a circle red moves left")
    with pytest.raises(ValueError, match="not of the form"):
        world.parse_prompt("a red circle moves")


def test_generator_is_deterministic_and_inside_the_frame():
    first = world.sample_video(world.scene_rng(3, 1), 3)
    again = world.sample_video(world.scene_rng(3, 1), 3)
    assert first == again
    assert len({scene.background for scene in first}) == 1
    assert [s.prompt for s in first] != [s.prompt for s in world.sample_video(world.scene_rng(3, 2), 3)]
    half = world.shape_size() / 2
    for scene in _scenes(200, seed=9):
        centres = scene.centres()
        assert centres.min() >= half - 1e-9 and centres[:, 0].max() <= world.WIDTH - half + 1e-9
        assert centres[:, 1].max() <= world.HEIGHT - half + 1e-9
        moved = centres[-1] - centres[0]
        assert np.isclose(np.abs(moved).sum(), world.TRAVEL_FRACTION * world.WIDTH)
        video = world.render_scene(scene)
        assert video.shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3) and video.dtype == np.uint8
        assert set(map(tuple, video.reshape(-1, 3))) == {world.BACKGROUNDS[scene.background], world.SHAPE_COLOURS[scene.colour]}


def test_scorer_reads_rendered_ground_truth_exactly():
    for scene in _scenes(120):
        _assert_reads(score.read_scene(world.render_scene(scene)), scene)


def test_scorer_reads_ground_truth_after_lossy_mp4(tmp_path):
    # The pipeline's outputs are lossy yuv420p mp4 files: colours bleed at the shape's edges.
    for index, scene in enumerate(_scenes(12, seed=6)):
        path = write_video(world.render_scene(scene), str(tmp_path / f"{index}.mp4"))
        _assert_reads(score.read_scene(read_video(path)), scene)


def test_scorer_tolerates_small_colour_noise():
    rng = np.random.default_rng(0)
    for scene in _scenes(12, seed=8):
        noisy = world.render_scene(scene).astype(np.int16) + rng.integers(-12, 13, (world.FRAMES, world.HEIGHT, world.WIDTH, 3))
        _assert_reads(score.read_scene(np.clip(noisy, 0, 255).astype(np.uint8)), scene)


def test_scorer_is_not_fooled():
    scene = world.Scene("navy", "red", "square", "right", (20.0, 30.0))
    video = world.render_scene(scene)
    # A background half-way between two palette colours is unknown, not the nearer one.
    between = video.copy()
    mask = np.all(between == world.BACKGROUNDS["navy"], axis=-1)
    between[mask] = (np.asarray(world.BACKGROUNDS["navy"]) + np.asarray(world.BACKGROUNDS["plum"])) // 2
    assert score.read_scene(between).background is None
    # A shape that stays still has no direction; one that changes colour half-way has no colour.
    still = np.repeat(video[:1], world.FRAMES, axis=0)
    assert score.read_scene(still).direction is None
    assert score.read_scene(still).shape == "square"
    recoloured = video.copy()
    for frame in recoloured[4:]:
        frame[np.all(frame == world.SHAPE_COLOURS["red"], axis=-1)] = world.SHAPE_COLOURS["yellow"]
    assert score.read_scene(recoloured).colour is None
    # An empty frame sequence has no shape, colour or direction; a blurred blob is not a shape.
    empty = np.repeat(video[:, :1, :1], world.HEIGHT, axis=1).repeat(world.WIDTH, axis=2)
    reading = score.read_scene(empty)
    assert (reading.background, reading.colour, reading.shape, reading.direction) == ("navy", None, None, None)
    small = world.render_scene(scene, height=world.HEIGHT, width=world.WIDTH)
    small[:] = world.BACKGROUNDS["navy"]
    small[:, 10:14, 10:30] = world.SHAPE_COLOURS["red"]  # a thin bar moving nowhere
    assert score.read_scene(small).shape is None
    # A diagonal motion is no direction.
    diagonal = world.render_scene(scene)
    for index in range(world.FRAMES):
        diagonal[index] = np.roll(diagonal[index], index, axis=0)
    assert score.read_scene(diagonal).direction is None


def test_score_video_metrics():
    scenes = world.sample_video(world.scene_rng(4, 0), 3)
    frames = world.render_video(scenes)
    result = score.score_video(frames, [s.prompt for s in scenes])
    assert result["prompt_accuracy"] == 1.0 and result["identity_consistency"] == 1.0
    other = world.sample_video(world.scene_rng(4, 1), 1, background=next(b for b in world.BACKGROUNDS if b != scenes[0].background))
    mixed = score.score_video(frames[:2] + world.render_video(other), [s.prompt for s in scenes[:2] + other])
    assert mixed["identity_consistency"] == pytest.approx(1 / 3)
    wrong = score.score_video(frames, [scenes[1].prompt, scenes[0].prompt, scenes[2].prompt])
    assert wrong["prompt_accuracy"] == pytest.approx(np.mean([scenes[1].prompt == scenes[0].prompt] * 2 + [True]))
    assert score.keeps_background(frames[:2], frames[2])
    assert not score.keeps_background(frames[:2], world.render_video(other)[0])


def test_largest_component_matches_a_flood_fill():
    rng = np.random.default_rng(1)
    for _ in range(100):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.uniform(0.2, 0.7)
        ours = score.largest_component(mask)
        # reference: breadth-first flood fill from every unvisited pixel
        seen = np.zeros_like(mask)
        sizes = []
        for start in zip(*np.nonzero(mask)):
            if seen[start]:
                continue
            stack, size = [start], 0
            seen[start] = True
            while stack:
                y, x = stack.pop()
                size += 1
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            sizes.append(size)
        assert ours.sum() == (max(sizes) if sizes else 0)


def test_encoder_gives_the_paper_metrics_a_ground_truth_meaning():
    from diffusers_mask2dit.evaluation import evaluate_scenes

    scenes = world.sample_video(world.scene_rng(4, 0), 3)
    result = evaluate_scenes(world.render_video(scenes), [s.prompt for s in scenes], score.ShapesEncoder())
    shared = [sum(getattr(a, k) == getattr(b, k) for k in ("colour", "shape", "direction")) for a, b in
              [(scenes[0], scenes[1]), (scenes[0], scenes[2]), (scenes[1], scenes[2])]]
    assert result["visual_consistency"] == pytest.approx(100 * np.mean([0.5 + s / 6 for s in shared]), abs=1e-4)
    assert result["semantic_consistency"] == pytest.approx(100 / np.sqrt(2), abs=1e-4)
    assert result["smoothness"] == pytest.approx(100.0, abs=1e-4)


def test_dataset_in_the_trainer_formats(tmp_path):
    from diffusers_mask2dit.training.data import load_training_records

    paths = world.write_dataset(str(tmp_path), num_videos=2, num_scenes=3, seed=1, progress=False)
    with open(paths["pretrain"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["fps", "width", "height", "caption", "path", "num_frame"] and len(rows) == 6
    with open(paths["sft"]) as handle:
        records = json.load(handle)
    assert [len(r["values"]) for r in records] == [3, 3]
    truths = [json.loads(line) for line in open(paths["scenes"])]
    expected = [scene for video in world.dataset_videos(1, 2, 3) for scene in video]
    for truth, scene, row in zip(truths, expected, rows):
        assert truth["prompt"] == scene.prompt == row["caption"]
        frames = read_video(os.path.join(tmp_path, row["path"]))
        assert np.array_equal(frames, world.render_scene(scene))  # lossless: the trainer sees the exact world
    sft = load_training_records(paths["sft"], "sft", 3, [9])
    assert len(sft) == 2 and [c.caption for c in sft[0]] == [s.prompt for s in expected[:3]]
    assert len(load_training_records(paths["pretrain"], "pretrain", 3, [9])) == 6
