"""The Shapes world's model: a real CogVideoX-5b-style diffusers folder at toy size, and where the shipped one lives.

Components (all real diffusers / transformers classes, saved with ``save_pretrained`` as safetensors):

- ``tokenizer``: a T5 tokenizer whose vocabulary holds every word of the world as one piece (``"▁red"``,
  ``"▁triangle"``, ...) plus single letters, so any lowercase text tokenizes and world prompts take 6 tokens;
- ``text_encoder``: a small `T5EncoderModel` with random weights from a fixed seed, frozen (the transformer
  learns to read its outputs; a pretrained T5 is not needed for a 13-word language);
- ``vae``: `AutoencoderKLCogVideoX` trained on the world (:mod:`diffusers_mask2dit.shapes.vae`);
- ``transformer``: `CogVideoXTransformer3DModel` in the 5b layout (3D RoPE on video tokens only, no positions on
  text), trained with ``mask2dit train`` (pretrain, then SFT with conditional samples, mask v2);
- ``scheduler``: CogVideoX-5b's `CogVideoXDDIMScheduler` (v-prediction, zero terminal SNR, trailing spacing).

Prompts are padded to :data:`MAX_SEQUENCE_LENGTH` (8) tokens, the transformer's ``max_text_seq_length``; pass
``max_sequence_length=8`` to the pipeline (see :func:`generation_kwargs`), as the model was trained with it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from . import world

MAX_SEQUENCE_LENGTH = 8  # "a yellow triangle moves right" + </s> = 6 tokens
TEXT_DIM = 64
# 6x6 latents with 1x1 patches: 36 video tokens per latent frame. With CogVideoX's 2x2 patches (3x3 tokens) a
# pilot run drew several blobs per scene after 2,500 steps where 1x1 patches drew one object.
TRANSFORMER = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    num_layers=4,
    time_embed_dim=128,
    patch_size=1,
)
# Sampling defaults of the shipped model. It was trained with caption dropout 0.1, so it knows the empty prompt and
# classifier-free guidance works; 3.0 was chosen on validation samples 1000-1023 (never the ablation's 0-199):
# prompt accuracy 46% / 86% / 76% / 76% at guidance 1 / 3 / 5 / 7 (identity 81% / 78% / 75% / 75%); 50 steps
# instead of 20 changed neither by more than the sampling noise.
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 3.0
SHIPPED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def generation_kwargs(**overrides: Any) -> Dict[str, Any]:
    """Keyword arguments the pipeline needs for this model (prompt length, size, frames, steps, guidance)."""
    kwargs = dict(
        height=world.HEIGHT,
        width=world.WIDTH,
        num_frames=world.FRAMES,
        num_inference_steps=NUM_INFERENCE_STEPS,
        guidance_scale=GUIDANCE_SCALE,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    kwargs.update(overrides)
    return kwargs


def build_tokenizer():
    """A T5 tokenizer with each world word as one piece (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in T5)."""
    from transformers import T5Tokenizer

    words = [word for slot in world.vocabulary().values() for word in slot]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]  # whole words win over letters
    vocab += [(char, -10.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def build_text_encoder(vocab_size: int, seed: int = 0):
    """A small random `T5EncoderModel` (T5 v1.1 layout, gated GELU), fixed by ``seed``, in eval mode."""
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(
            T5Config(
                vocab_size=vocab_size,
                d_model=TEXT_DIM,
                d_kv=32,
                d_ff=128,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
    return model.eval()


def build_transformer(latent_channels: int, seed: int = 0):
    """A random `CogVideoXTransformer3DModel` in the CogVideoX-5b layout (RoPE), sized for the world's latents."""
    from diffusers import CogVideoXTransformer3DModel

    latent_size = world.HEIGHT // 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CogVideoXTransformer3DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            text_embed_dim=TEXT_DIM,
            sample_width=latent_size,
            sample_height=latent_size,
            sample_frames=world.FRAMES,
            temporal_compression_ratio=4,
            max_text_seq_length=MAX_SEQUENCE_LENGTH,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
            **TRANSFORMER,
        )


def build_scheduler():
    """CogVideoX-5b's scheduler configuration (the same one the tiny 5b-style models get)."""
    from ..tiny import tiny_scheduler

    return tiny_scheduler("5b")


def save_base_model(out: str, vae_path: str, seed: int = 0) -> str:
    """Write a diffusers folder with the trained VAE of ``vae_path``, the tokenizer, the frozen random T5, a random
    transformer and the scheduler: the starting point of ``mask2dit train``. Returns ``out``."""
    from diffusers import AutoencoderKLCogVideoX

    from ..pipeline import Mask2DiTPipeline
    from ..transformer import Mask2DiTTransformer3DModel

    vae = AutoencoderKLCogVideoX.from_pretrained(vae_path)
    tokenizer = build_tokenizer()
    transformer = Mask2DiTTransformer3DModel.from_cogvideox(build_transformer(vae.config.latent_channels, seed + 1))
    pipe = Mask2DiTPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer), seed),
        vae=vae,
        transformer=transformer,
        scheduler=build_scheduler(),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def shipped_model_path() -> str:
    """The folder of the model shipped inside the package; a clear error when the weights are missing."""
    if not os.path.isfile(os.path.join(SHIPPED_MODEL_DIR, "model_index.json")):
        raise FileNotFoundError(
            f"The Shapes model is not in {SHIPPED_MODEL_DIR}; reinstall the package or retrain it with "
            "`python -m diffusers_mask2dit.shapes.retrain --out DIR`."
        )
    return SHIPPED_MODEL_DIR


def load_pipeline(path: Optional[str] = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`Mask2DiTPipeline` of the Shapes model (the shipped one by default) on ``device``."""
    from ..pipeline import Mask2DiTPipeline

    pipe = Mask2DiTPipeline.from_pretrained(path or shipped_model_path(), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
