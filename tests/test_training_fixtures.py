"""Shared helpers of the training tests: tiny synthetic videos, data files, a tiny model and a tiny config.

Imported by the other ``test_training_*`` files; holds no tests itself.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np

TINY_SIZE = 64  # the tiny model's native pixel size
TINY_FRAMES = 9  # 8N+1 frames -> 3 latent frames


def write_clip(path: str, num_frames: int, seed: int = 0, height: int = 48, width: int = 80) -> str:
    """A small mp4 of smooth moving colour blobs (compresses well, decodes fast)."""
    from diffusers_mask2dit.video_io import write_video

    rng = np.random.default_rng(seed)
    base = rng.random(3)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for t in range(num_frames):
        phase = 2 * np.pi * (t / max(num_frames, 1) + base)
        red = 0.5 + 0.5 * np.sin(6 * xx + phase[0])
        green = 0.5 + 0.5 * np.sin(6 * yy + phase[1])
        blue = 0.5 + 0.5 * np.sin(4 * (xx + yy) + phase[2])
        frames.append(np.stack([red, green, blue], axis=-1))
    return write_video(np.stack(frames).astype(np.float32), path, fps=8)


def write_sft_jsonl(root: str, num_videos: int, shots: int = 2, frames: int = 12, name: str = "sft.jsonl") -> str:
    """``num_videos`` multi-shot videos (relative paths) in the JSONL format; returns the file path."""
    lines = []
    for video in range(num_videos):
        scenes = []
        for shot in range(shots):
            clip = f"v{video}_s{shot}.mp4"
            write_clip(os.path.join(root, clip), frames, seed=video * 10 + shot)
            scenes.append({"video": clip, "caption": f"A cat walks on the beach, video {video} shot {shot}."})
        lines.append(json.dumps({"scenes": scenes}))
    path = os.path.join(root, name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def write_pretrain_jsonl(root: str, num_clips: int, frames: int = 12, name: str = "pretrain.jsonl") -> str:
    lines = []
    for index in range(num_clips):
        clip = f"clip{index}.mp4"
        write_clip(os.path.join(root, clip), frames, seed=100 + index)
        lines.append(json.dumps({"video": clip, "caption": f"A dog runs through tall grass, clip {index}."}))
    path = os.path.join(root, name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def tiny_config(model_dir: str, output_dir: str, **overrides: Any):
    """A `TrainingConfig` for the tiny model on CPU: 2 scenes of 9 frames at 64x64, fp32, no trackers."""
    from diffusers_mask2dit.training import TrainingConfig

    values: Dict[str, Any] = dict(
        pretrained_model_name_or_path=model_dir,
        output_dir=output_dir,
        stage="sft",
        num_scenes=2,
        frames_per_scene=[TINY_FRAMES],
        height=TINY_SIZE,
        width=TINY_SIZE,
        mixed_precision="no",
        report_to="none",
        gradient_checkpointing=False,
        checkpointing_steps=0,
        lora_rank=4,
        lora_alpha=8.0,
        learning_rate=1e-3,
        adam_weight_decay=0.0,
        train_batch_size=1,
        max_train_steps=2,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def lora_tensors(path: str) -> Dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))


def assert_tensor_dicts_close(first: Dict[str, Any], second: Dict[str, Any], atol: float = 0.0, rtol: float = 0.0) -> None:
    import torch

    assert sorted(first) == sorted(second)
    for key in first:
        if atol == 0.0 and rtol == 0.0:
            assert torch.equal(first[key], second[key]), key
        else:
            torch.testing.assert_close(first[key], second[key], atol=atol, rtol=rtol, msg=key)


def scene_lengths(values: Sequence[int]) -> List[int]:
    return [int(v) for v in values]
