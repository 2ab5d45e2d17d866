"""Caption dropout (`caption_dropout`): whole samples get the empty prompt, so classifier-free guidance has an
unconditional model to subtract. Off (0.0) by default, where nothing about training changes."""

import os

import pytest
import torch

from diffusers_mask2dit.training import TrainingConfig
from diffusers_mask2dit.training.loss import drop_captions
from test_training_fixtures import tiny_config, write_sft_jsonl


def test_drop_captions_replaces_whole_samples_deterministically():
    embeds = torch.randn(64, 3 * 4, 5)
    null = torch.randn(4, 5)
    seeds = torch.arange(64) * 7919
    assert torch.equal(drop_captions(embeds, seeds, null, 0.0), embeds)
    assert torch.equal(drop_captions(embeds, seeds, null, 1.0), null.repeat(3, 1).expand(64, -1, -1))
    half = drop_captions(embeds, seeds, null, 0.5)
    assert torch.equal(half, drop_captions(embeds, seeds, null, 0.5))  # a function of the sample seeds only
    dropped = [torch.equal(half[b], null.repeat(3, 1)) for b in range(64)]
    kept = [torch.equal(half[b], embeds[b]) for b in range(64)]
    assert all(d != k for d, k in zip(dropped, kept))  # each sample entirely dropped or entirely kept
    assert 16 <= sum(dropped) <= 48
    with pytest.raises(ValueError, match="does not fit"):
        drop_captions(embeds, seeds, torch.randn(5, 5), 0.5)
    with pytest.raises(ValueError, match="caption_dropout"):
        drop_captions(embeds, seeds, null, 1.5)
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainingConfig(caption_dropout=-0.1)


def test_training_with_caption_dropout_from_a_cache(tmp_path):
    from accelerate.state import AcceleratorState

    from diffusers_mask2dit.tiny import save_tiny_cogvideox
    from diffusers_mask2dit.training import precompute, train
    from diffusers_mask2dit.training.precompute import NULL_PROMPT_NAME, load_null_prompt

    model = save_tiny_cogvideox(str(tmp_path / "model"))
    data = write_sft_jsonl(str(tmp_path), num_videos=2, shots=2, frames=9)
    cache = str(tmp_path / "cache")
    config = tiny_config(model, str(tmp_path / "unused"), data_file=data, cache_dir=cache, cache_dtype="float32")
    precompute(config)
    null = load_null_prompt(cache)
    assert os.path.isfile(os.path.join(cache, NULL_PROMPT_NAME)) and null.shape == (226, 32)
    try:
        result = train(tiny_config(model, str(tmp_path / "out"), data_file=data, cache_dir=cache, cache_dtype="float32",
                                   caption_dropout=0.5, max_train_steps=2))
    finally:
        AcceleratorState._reset_state()
    assert result.global_step == 2
    os.remove(os.path.join(cache, NULL_PROMPT_NAME))
    with pytest.raises(ValueError, match="run `mask2dit precompute` again"):
        load_null_prompt(cache)
