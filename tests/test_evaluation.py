"""Evaluation metrics, encoders and the ``mask2dit evaluate`` command (offline, tiny random CLIP)."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest

from diffusers_mask2dit.evaluation import (
    METRIC_KEYS,
    CLIPVideoEncoder,
    VideoTextEncoder,
    cscv,
    evaluate_scenes,
    evaluate_video,
    load_scenes,
    mean_interval,
    pixel_smoothness,
    sample_frame_indices,
    semantic_consistency,
    sequence_consistency,
    smoothness,
    summarize,
    t_critical_975,
    visual_consistency,
)
from diffusers_mask2dit.evaluation.cli import register_cli
from diffusers_mask2dit.video_io import write_video

SQ2 = math.sqrt(2.0)
RED, GREEN, YELLOW, BLUE = (200, 0, 0), (0, 200, 0), (200, 200, 0), (0, 0, 200)


def solid(colors, size=4):
    """Frames (F, size, size, 3), frame k filled with colors[k]."""
    return np.stack([np.full((size, size, 3), c, dtype=np.uint8) for c in colors])


class ColorEncoder:
    """Hand-made encoder: a video's embedding is its mean RGB; prompts map to fixed vectors."""

    TEXT = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "yellow": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0)}

    def encode_video(self, frames):
        return np.asarray(frames, dtype=np.float64).reshape(-1, 3).mean(axis=0)

    def encode_text(self, text):
        return np.asarray(self.TEXT[text])


class ColorFrameEncoder(ColorEncoder):
    calls = 0

    def encode_frames(self, frames):
        ColorFrameEncoder.calls += 1
        return np.asarray(frames, dtype=np.float64).mean(axis=(1, 2))


# ------------------------------------------------------------------------------------------------- formulas


def test_visual_consistency_identical_orthogonal_and_by_hand():
    assert visual_consistency(np.array([[0.3, 0.4], [0.3, 0.4], [3.0, 4.0]])) == pytest.approx(100.0)
    assert visual_consistency(np.eye(3)) == pytest.approx(0.0, abs=1e-12)
    assert visual_consistency([[1.0, 0.0], [-1.0, 0.0]]) == pytest.approx(-100.0)
    # red, green, yellow: pairs 0, 1/sqrt2, 1/sqrt2 -> 100 * sqrt2 / 3
    assert visual_consistency([[1, 0, 0], [0, 1, 0], [1, 1, 0]]) == pytest.approx(100 * SQ2 / 3)


def test_semantic_and_sequence_consistency_by_hand():
    videos = np.array([[1.0, 0.0], [1.0, 1.0]])
    texts = np.array([[2.0, 0.0], [0.0, 1.0]])
    assert semantic_consistency(videos, texts) == pytest.approx(100 * (1 + 1 / SQ2) / 2)
    assert sequence_consistency(70.0, 20.0) == pytest.approx(45.0)
    # the paper's Table 1 row: (70.95 + 23.94) / 2 = 47.445 -> 47.45 after rounding
    assert sequence_consistency(70.95, 23.94) == pytest.approx(47.445)


def test_cscv_and_smoothness_by_hand():
    angles = np.deg2rad([0.0, 0.0, 60.0])  # consecutive similarities 1 and 0.5
    frames = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert cscv(frames) == pytest.approx(0.25 / 0.75)
    assert smoothness(frames) == pytest.approx(75.0)
    steady = np.tile([[1.0, 2.0]], (5, 1))
    assert cscv(steady) == pytest.approx(0.0, abs=1e-12)
    assert smoothness(steady) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="CSCV is undefined"):
        cscv(np.array([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="frame_embeddings"):
        cscv(np.array([[1.0, 0.0]]))


def test_pixel_smoothness_by_hand():
    assert pixel_smoothness(solid([(0, 0, 0), (51, 51, 51)])) == pytest.approx(80.0)
    assert pixel_smoothness(solid([(0, 0, 0), (51, 51, 51), (51, 51, 51)])) == pytest.approx(90.0)
    assert pixel_smoothness(solid([(9, 9, 9)] * 3)) == pytest.approx(100.0)


def test_intervals():
    stats = mean_interval([1.0, 2.0, 3.0])
    assert stats["mean"] == pytest.approx(2.0) and stats["std"] == pytest.approx(1.0)
    assert stats["half_width"] == pytest.approx(4.3027 / math.sqrt(3))
    assert stats["low"] == pytest.approx(2.0 - stats["half_width"])
    assert mean_interval([1.0, 2.0, 3.0], method="normal")["half_width"] == pytest.approx(1.96 / math.sqrt(3))
    assert mean_interval([5.0])["low"] is None
    assert t_critical_975(31) == pytest.approx(2.039513, abs=1e-4)
    assert t_critical_975(200) == pytest.approx(1.971896, abs=1e-4)
    summary = summarize([{"cscv": 0.1, "smoothness": 90.0}, {"cscv": 0.3, "smoothness": None}])
    assert summary["cscv"]["n"] == 2 and summary["cscv"]["mean"] == pytest.approx(0.2)
    assert summary["smoothness"]["n"] == 1 and "visual_consistency" not in summary
    with pytest.raises(ValueError, match="method"):
        mean_interval([1.0, 2.0], method="bootstrap")


# ----------------------------------------------------------------------------------------- evaluate_scenes


def test_evaluate_scenes_hand_made_encoder_exact():
    scenes = [solid([RED, RED, YELLOW]), solid([GREEN, GREEN]), solid([YELLOW, YELLOW, YELLOW])]
    prompts = ["red", "green", "yellow"]
    result = evaluate_scenes(scenes, prompts, ColorEncoder())
    assert isinstance(ColorEncoder(), VideoTextEncoder)

    v = np.array([[600, 200, 0], [0, 600, 0], [600, 600, 0]], dtype=float) / 3
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pairs = [v[0] @ v[1], v[0] @ v[2], v[1] @ v[2]]
    expected_visual = 100 * np.mean(pairs)
    expected_semantic = 100 * np.mean([v[0][0], 1.0, 1 / SQ2])
    assert result["visual_consistency"] == pytest.approx(expected_visual)
    assert result["semantic_consistency"] == pytest.approx(expected_semantic)
    assert result["sequence_consistency"] == pytest.approx((expected_visual + expected_semantic) / 2)

    # per-scene consecutive similarities: [1, 1/sqrt2], [1], [1, 1]
    scene0_cscv = (1 - 1 / SQ2) / (1 + 1 / SQ2)  # = 3 - 2 sqrt2
    assert scene0_cscv == pytest.approx(3 - 2 * SQ2)
    assert [s["cscv"] for s in result["per_scene"]] == pytest.approx([scene0_cscv, 0.0, 0.0], abs=1e-12)
    assert result["cscv_within_scene"] == pytest.approx(scene0_cscv / 3)
    # whole video: frames R R Y | G G | Y Y Y -> sims 1, 1/sqrt2, 1/sqrt2, 1, 1/sqrt2, 1, 1
    whole = np.array([1, 1 / SQ2, 1 / SQ2, 1, 1 / SQ2, 1, 1])
    assert result["cscv"] == pytest.approx(whole.std() / whole.mean())
    assert result["smoothness"] == pytest.approx(100 * np.mean([(1 + 1 / SQ2) / 2, 1.0, 1.0]))
    assert result["pixel_smoothness"] == pytest.approx(np.mean([100 * (1 - (200 / 3) / 255 / 2), 100, 100]))
    assert result["num_scenes"] == 3 and result["scene_frames"] == [3, 2, 3]
    assert result["visual_pairwise"][0][0] == pytest.approx(100.0)
    assert set(METRIC_KEYS) <= set(result)


def test_evaluate_scenes_identical_and_orthogonal():
    same = evaluate_scenes([solid([RED] * 3), solid([RED] * 4)], ["red", "red"], ColorEncoder())
    assert same["visual_consistency"] == pytest.approx(100.0)
    assert same["semantic_consistency"] == pytest.approx(100.0)
    assert same["sequence_consistency"] == pytest.approx(100.0)
    assert same["cscv"] == pytest.approx(0.0, abs=1e-12) and same["smoothness"] == pytest.approx(100.0)
    orth = evaluate_scenes([solid([RED] * 2), solid([GREEN] * 2), solid([BLUE] * 2)], ["green", "blue", "red"], ColorEncoder())
    assert orth["visual_consistency"] == pytest.approx(0.0, abs=1e-12)
    assert orth["semantic_consistency"] == pytest.approx(0.0, abs=1e-12)
    assert orth["sequence_consistency"] == pytest.approx(0.0, abs=1e-12)


def test_evaluate_scenes_uses_encode_frames_and_stride():
    ColorFrameEncoder.calls = 0
    scenes = [solid([RED, YELLOW, RED, YELLOW, RED]), solid([GREEN] * 5)]
    full = evaluate_scenes(scenes, ["red", "green"], ColorFrameEncoder())
    assert ColorFrameEncoder.calls == 2
    assert full["smoothness"] == pytest.approx(100 * (1 / SQ2 + 1) / 2)
    strided = evaluate_scenes(scenes, ["red", "green"], ColorFrameEncoder(), frame_stride=2)  # R R R | G G G
    assert strided["smoothness"] == pytest.approx(100.0) and strided["frame_stride"] == 2


@pytest.mark.parametrize(
    "scenes, prompts, encoder, kwargs, name",
    [
        ([solid([RED] * 2)] * 2, ["red"], ColorEncoder(), {}, "prompts"),
        ([solid([RED] * 2)] * 2, "red", ColorEncoder(), {}, "prompts"),
        ([solid([RED] * 2)] * 2, ["red", " "], ColorEncoder(), {}, "prompts"),
        ([solid([RED] * 2), np.zeros((0, 4, 4, 3), np.uint8)], ["red", "red"], ColorEncoder(), {}, "scenes_frames"),
        ([solid([RED] * 2), solid([RED])], ["red", "red"], ColorEncoder(), {}, "scenes_frames"),
        ([solid([RED] * 2)], ["red"], ColorEncoder(), {}, "scenes_frames"),
        (solid([RED] * 4), ["red"] * 4, ColorEncoder(), {}, "scenes_frames"),
        ([solid([RED] * 2)] * 2, ["red", "red"], object(), {}, "encoder"),
        ([solid([RED] * 2)] * 2, ["red", "red"], ColorEncoder(), {"frame_stride": 0}, "frame_stride"),
        ([solid([RED] * 2)] * 2, ["red", "red"], ColorEncoder(), {"frame_stride": 2}, "frame_stride"),
    ],
)
def test_evaluate_scenes_bad_input(scenes, prompts, encoder, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        evaluate_scenes(scenes, prompts, encoder, **kwargs)


def test_sample_frame_indices():
    assert sample_frame_indices(49, 8).tolist() == [0, 7, 14, 21, 27, 34, 41, 48]
    assert sample_frame_indices(5, 8).tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------- files and CLI


def test_load_scenes_files_and_errors(tmp_path):
    out = tmp_path / "out"
    for i, color in enumerate([RED, GREEN]):
        write_video(solid([color] * 3, size=16), str(out / f"scene_{i:02d}.mp4"))
    write_video(solid([RED] * 3 + [GREEN] * 2, size=16), str(out / "video.mp4"))
    assert [len(s) for s in load_scenes(str(out))] == [3, 3]
    assert [len(s) for s in load_scenes(str(out), "3,2")] == [3, 2]
    assert [len(s) for s in load_scenes(str(out / "video.mp4"), [2, 3])] == [2, 3]
    with pytest.raises(ValueError, match="`scene_frames`"):
        load_scenes(str(out / "video.mp4"), "3,3")
    with pytest.raises(ValueError, match="`scene_frames`"):
        load_scenes(str(out / "video.mp4"))
    with pytest.raises(ValueError, match="`scene_frames`"):
        load_scenes(str(out / "video.mp4"), "3,x")
    with pytest.raises(ValueError, match="`video`"):
        load_scenes(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="`video`"):
        load_scenes(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="`prompts`"):  # no prompts.txt in the folder
        evaluate_video(str(out), ColorEncoder())
    (out / "prompts.txt").write_text("red\n\ngreen\n")
    result = evaluate_video(str(out), ColorEncoder())
    assert result["visual_consistency"] == pytest.approx(0.0, abs=2.0)  # h264 leaves a little colour bleed
    assert result["semantic_consistency"] == pytest.approx(100.0, abs=1.0)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("torch")
    from diffusers_mask2dit.evaluation.encoders import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def smooth_scene(seed, frames=6, size=32):
    """A slowly drifting random picture: consecutive frames are similar."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (size, size, 3))
    drift = rng.uniform(-40, 40, (size, size, 3))
    return np.stack([np.clip(base + drift * k / frames, 0, 255) for k in range(frames)]).astype(np.uint8)


def test_tiny_clip_encoder(tiny_clip):
    encoder = CLIPVideoEncoder.from_pretrained(tiny_clip, device="cpu", frames_per_scene=8)
    scene = smooth_scene(0, frames=12)
    frames = encoder.encode_frames(scene)
    assert frames.shape == (12, 16)
    assert np.linalg.norm(frames, axis=1) == pytest.approx(np.ones(12), abs=1e-5)
    video = encoder.encode_video(scene)
    picked = frames[sample_frame_indices(12, 8)].mean(axis=0)
    assert video.shape == (16,) and video == pytest.approx(picked / np.linalg.norm(picked), abs=1e-5)
    text = encoder.encode_text("a red car driving at night " * 10)  # longer than the context: truncated
    assert text.shape == (16,) and np.linalg.norm(text) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(encoder.encode_text("a cat"), encoder.encode_text("a dog"))

    same = evaluate_scenes([scene, scene.copy()], ["a cat", "a dog"], encoder)
    assert same["visual_consistency"] == pytest.approx(100.0, abs=1e-3)
    mixed = evaluate_scenes([scene, smooth_scene(1), smooth_scene(2)], ["a cat", "a dog", "a bird"], encoder)
    for key in METRIC_KEYS:
        assert np.isfinite(mixed[key])
    assert -100 <= mixed["visual_consistency"] <= 100 and mixed["cscv"] >= 0

    with pytest.raises(ValueError, match="`path_or_id`"):
        CLIPVideoEncoder.from_pretrained(os.path.join(tiny_clip, "missing"))
    with pytest.raises(ValueError, match="`frames_per_scene`"):
        CLIPVideoEncoder.from_pretrained(tiny_clip, frames_per_scene=0)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="mask2dit")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def write_sample(folder, seeds, prompts, frames=6):
    for i, seed in enumerate(seeds):
        write_video(smooth_scene(seed, frames=frames), str(folder / f"scene_{i:02d}.mp4"))
    if prompts is not None:
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")


def test_cli_single_folder_and_file(tiny_clip, tmp_path, capsys):
    out = tmp_path / "out"
    write_sample(out, [0, 1], ["a cat walks", "a cat sleeps"])
    assert run_cli(["evaluate", "--video", str(out), "--clip", tiny_clip, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "visual_consistency" in printed and "cscv" in printed and "a cat sleeps" in printed
    data = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(data) and data["num_scenes"] == 2 and data["scene_frames"] == [6, 6]
    assert data["sequence_consistency"] == pytest.approx((data["visual_consistency"] + data["semantic_consistency"]) / 2)

    whole = np.concatenate([smooth_scene(0, 5), smooth_scene(1, 4), smooth_scene(2, 5)])
    write_video(whole, str(tmp_path / "one.mp4"))
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    argv = ["evaluate", "--video", str(tmp_path / "one.mp4"), "--scene-frames", "5,4,5", "--prompts", str(tmp_path / "p.txt")]
    assert run_cli(argv + ["--clip", tiny_clip, "--output", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["scene_frames"] == [5, 4, 5]
    capsys.readouterr()

    # bad inputs: exit code 2 and a message naming the parameter
    assert run_cli(["evaluate", "--video", str(tmp_path / "nope"), "--clip", tiny_clip]) == 2
    assert "`--video`" in capsys.readouterr().err
    assert run_cli(["evaluate", "--video", str(tmp_path / "one.mp4"), "--scene-frames", "5,5", "--clip", tiny_clip]) == 2
    assert "`--scene-frames`" in capsys.readouterr().err
    assert run_cli(argv[:-2] + ["--prompts", str(out / "prompts.txt"), "--clip", tiny_clip]) == 2
    assert "`--prompts`" in capsys.readouterr().err
    assert run_cli(["evaluate", "--video", str(out), "--clip", str(tmp_path / "no_clip")]) == 2
    assert "`--clip`" in capsys.readouterr().err


def test_cli_batch(tiny_clip, tmp_path, capsys):
    root = tmp_path / "samples"
    write_sample(root / "s0", [0, 1], ["a cat", "a dog"])
    write_sample(root / "s1", [2, 3], ["a cat", "a dog"])
    write_sample(root / "s2", [4, 5], ["only one prompt"])  # fails: 1 prompt for 2 scenes
    (root / "notes").mkdir()  # no mp4: not a sample
    code = run_cli(["evaluate", "--batch", str(root), "--clip", tiny_clip, "--interval", "normal"])
    captured = capsys.readouterr()
    assert code == 1  # one sample failed
    assert "s2" in captured.err and "95% CI (normal)" in captured.out
    data = json.loads((root / "metrics_summary.json").read_text())
    assert [s["sample"] for s in data["samples"]] == ["s0", "s1"] and len(data["failed"]) == 1
    values = [s["visual_consistency"] for s in data["samples"]]
    stats = data["summary"]["visual_consistency"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(values))
    assert stats["half_width"] == pytest.approx(1.96 * np.std(values, ddof=1) / math.sqrt(2))
    assert stats["low"] <= stats["mean"] <= stats["high"]
    assert set(data["summary"]) == set(METRIC_KEYS)
    assert run_cli(["evaluate", "--batch", str(root / "notes"), "--clip", tiny_clip]) == 2
