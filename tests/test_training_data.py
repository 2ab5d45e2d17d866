"""Training data: the authors' formats and JSONL, frame sampling, datasets, and bad data skipped with a count."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from diffusers_mask2dit.training.data import (
    Clip,
    EpochShuffleSampler,
    MultiSceneDataset,
    TooShortError,
    VideoSource,
    collate_scenes,
    frame_indices,
    load_training_records,
    read_pretrain_clips,
    read_sft_videos,
    resize_center_crop,
)
from test_training_fixtures import write_clip, write_pretrain_jsonl, write_sft_jsonl


def test_reads_authors_pretraining_csv(tmp_path):
    (tmp_path / "pretrain.csv").write_text(
        "fps,width,height,caption,path,num_frame\n"
        '24.0,1280,720,"A man, seated, holds a sneaker.",asset/pretrain/1.mp4,429\n'
        "24.0,1280,720,,asset/pretrain/2.mp4,420\n"
    )
    clips, skips = read_pretrain_clips(str(tmp_path / "pretrain.csv"), video_root="/data")
    assert clips == [Clip("/data/asset/pretrain/1.mp4", "A man, seated, holds a sneaker.", 429)]
    assert skips.total == 1  # the row without a caption


def test_reads_authors_sft_json(tmp_path):
    records = [
        {
            "prefix": "example",
            "values": [
                {"vid": "s1", "width": 1676, "height": 954, "duration": 3.12, "fps": 25.0, "url": "asset/sft/s1.mp4", "caption": "First."},
                {"vid": "s2", "width": 1674, "height": 954, "duration": 4.4, "fps": 25.0, "url": "asset/sft/s2.mp4", "caption": "Second."},
            ],
        },
        {"prefix": "broken", "values": [{"url": "x.mp4"}]},
    ]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    videos, skips = read_sft_videos(str(tmp_path / "sft.json"))
    assert len(videos) == 1 and skips.total == 1
    first, second = videos[0]
    assert first.video == str(tmp_path / "asset/sft/s1.mp4") and first.caption == "First."
    assert (first.num_frames, second.num_frames) == (78, 110)


def test_reads_jsonl_and_skips_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"scenes": [{"video": "a.mp4", "caption": "A."}, {"video": "b.mp4", "caption": "B."}]}\nnot json\n{"scenes": []}\n')
    videos, skips = read_sft_videos(str(path))
    assert [[c.caption for c in v] for v in videos] == [["A.", "B."]]
    assert skips.total == 2


def test_wrong_extension_is_a_clear_error(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("")
    with pytest.raises(ValueError, match="data_file"):
        read_sft_videos(str(path))


def test_pretraining_frames_spread_over_145_frame_window_inside_5_to_95_percent():
    rng = np.random.default_rng(0)
    for _ in range(20):
        indices = frame_indices(429, 49, "pretrain", rng)
        assert len(indices) == 49
        assert indices[-1] - indices[0] == 144
        assert np.all(np.diff(indices) == 3)
        assert indices[0] >= int(429 * 0.05) and indices[-1] < int(np.ceil(429 * 0.95))
    # A short clip: the window shrinks to what fits, frames stay in order and inside the clip.
    short = frame_indices(60, 49, "pretrain", rng)
    assert len(short) == 49 and np.all(np.diff(short) >= 0) and short[-1] < 60


def test_sft_frames_take_largest_stride_up_to_3():
    rng = np.random.default_rng(0)
    assert np.all(np.diff(frame_indices(78, 49, "sft", rng)) == 1)
    assert np.all(np.diff(frame_indices(97, 49, "sft", rng)) == 2)
    assert np.all(np.diff(frame_indices(400, 49, "sft", rng)) == 3)
    assert frame_indices(49, 49, "sft", rng).tolist() == list(range(49))


def test_too_short_clip_raises_too_short():
    with pytest.raises(TooShortError):
        frame_indices(30, 49, "sft", np.random.default_rng(0))


def test_resize_center_crop_covers_target_and_scales_to_minus_one_one():
    frames = np.zeros((3, 48, 80, 3), dtype=np.uint8)
    frames[:, :, 40:] = 255  # right half white
    out = resize_center_crop(frames, 64, 64)
    assert out.shape == (3, 3, 64, 64)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out[0, 0, 32, 5] == -1.0 and out[0, 0, 32, 60] == 1.0  # centre crop keeps left/right halves


def test_sft_dataset_loads_consecutive_shots(tmp_path):
    data = write_sft_jsonl(str(tmp_path), num_videos=2, shots=3, frames=12)
    records = load_training_records(data, "sft", num_scenes=2, scene_frames=[9, 9])
    dataset = MultiSceneDataset(records, VideoSource(32, 32, "sft"), "sft", 2, [9, 9], seed=0)
    item = dataset[1]
    assert [p.shape for p in item["pixels"]] == [(9, 3, 32, 32)] * 2
    shots = [int(c.split("shot ")[1][0]) for c in item["captions"]]
    assert shots[1] == shots[0] + 1  # consecutive
    assert item["skipped"] == []
    again = dataset[1]
    assert torch.equal(item["pixels"][0], again["pixels"][0]) and item["sample_seed"] == again["sample_seed"]


def test_pretrain_dataset_regroups_unrelated_clips_each_epoch(tmp_path):
    clips = [[Clip(f"/v/{i}.mp4", f"caption {i}")] for i in range(12)]

    class NoPixels(VideoSource):
        def load(self, clip, num_frames, rng):
            return {"pixels": torch.zeros(num_frames, 3, 2, 2)}

    dataset = MultiSceneDataset(clips, NoPixels(2, 2, "pretrain"), "pretrain", 3, [9, 17, 9], seed=0)
    assert len(dataset) == 4
    epoch0 = [tuple(dataset[i]["captions"]) for i in range(4)]
    assert sorted(c for group in epoch0 for c in group) == sorted(f"caption {i}" for i in range(12))
    assert [p.shape[0] for p in dataset[0]["pixels"]] == [9, 17, 9]  # unequal scene lengths
    dataset.start_epoch(1)
    assert [tuple(dataset[i]["captions"]) for i in range(4)] != epoch0
    dataset.start_epoch(0)
    assert [tuple(dataset[i]["captions"]) for i in range(4)] == epoch0


def test_sampler_order_depends_only_on_seed_and_epoch():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.start_epoch(1)
    assert list(sampler) != first


def test_bad_data_is_skipped_with_a_count_never_a_crash(tmp_path, caplog):
    root = str(tmp_path)
    write_clip(os.path.join(root, "good0.mp4"), 12, seed=0)
    write_clip(os.path.join(root, "good1.mp4"), 12, seed=1)
    write_clip(os.path.join(root, "short.mp4"), 5, seed=2)  # fewer than 9 frames, not stated in the file
    (tmp_path / "corrupt.mp4").write_bytes(b"this is not a video")
    lines = [
        {"video": "good0.mp4", "caption": "good zero"},
        {"video": "good1.mp4", "caption": "good one"},
        {"video": "short.mp4", "caption": "short"},
        {"video": "corrupt.mp4", "caption": "corrupt"},
        {"video": "missing.mp4", "caption": "missing"},
        {"video": "stated_short.mp4", "caption": "x", "num_frames": 3},
        {"caption": "no path"},
    ]
    write_clip(os.path.join(root, "stated_short.mp4"), 12, seed=3)
    data = tmp_path / "pretrain.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    with caplog.at_level(logging.WARNING):
        records = load_training_records(str(data), "pretrain", num_scenes=1, scene_frames=[9])
    assert len(records) == 4  # good0, good1, short, corrupt: found on disk, not yet decoded
    assert "Skipped 3 records" in caplog.text  # missing file, stated too short, no path

    dataset = MultiSceneDataset(records, VideoSource(32, 32, "pretrain"), "pretrain", 1, [9], seed=0)
    batch = collate_scenes([dataset[i] for i in range(len(dataset))])
    assert batch["pixels"][0].shape == (4, 9, 3, 32, 32)  # every item is a good clip
    assert set(batch["captions"][0]) <= {"good zero", "good one"}
    # Each failed load (the short and the corrupt video, also when tried as a replacement) is reported.
    assert len(batch["skipped"]) >= 2
    assert all("short.mp4" in m or "corrupt.mp4" in m for m in batch["skipped"])
    assert any("fewer than the 9" in m for m in batch["skipped"]) and any("Could not decode" in m for m in batch["skipped"])


def test_sft_videos_with_too_few_shots_are_skipped(tmp_path, caplog):
    data = write_sft_jsonl(str(tmp_path), num_videos=2, shots=2, frames=12)
    with caplog.at_level(logging.WARNING):
        records = load_training_records(data, "sft", num_scenes=3, scene_frames=[9])
    assert records == [] and "fewer than 3 shots" in caplog.text
    with pytest.raises(ValueError, match="No training samples"):
        MultiSceneDataset(records, VideoSource(32, 32, "sft"), "sft", 3, [9, 9, 9], seed=0)


def test_pretrain_file_of_clips(tmp_path):
    data = write_pretrain_jsonl(str(tmp_path), num_clips=3, frames=12)
    records = load_training_records(data, "pretrain", num_scenes=2, scene_frames=[9])
    assert len(records) == 3
