"""Tiny random-weight CogVideoX components, built fully offline in about a second on CPU.

They have the real models' structure (T5 encoder, CogVideoX VAE with 4x temporal and 8x spatial
compression, CogVideoX transformer, the CogVideoX-5b scheduler) at toy widths, so tests, the demo and
benchmarks can run every code path without downloading anything. Their output is noise: they show the
machinery, not quality.

Sizes (fp32): videos of 64x64 pixels and 4k+1 frames -> latents ``(k+1, 4, 8, 8)`` (8k+1 frames decode
back exactly, e.g. 9 -> 3 latent frames -> 9);
2x2 patches -> 16 video tokens per latent frame; prompts padded to 226 tokens like the real model.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Dict

import torch

STYLES = ("5b", "2b", "1.5")

# Pixel size of the tiny models' native video (the transformer's `sample_height/width` * 8).
TINY_HEIGHT = 64
TINY_WIDTH = 64
TINY_FRAMES = 9  # pixel frames -> 3 latent frames
TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 4
MAX_SEQUENCE_LENGTH = 226

# A small English corpus in the style of video captions, so that prompts in tests tokenize into real
# pieces rather than unknown tokens. Letters, digits and common punctuation all appear at least once.
_CORPUS = """\
A cat walks slowly along the beach at sunset, waves rolling in behind it.
A man in a red jacket rides a bicycle through a busy city street.
The camera pans across a snowy mountain range under a clear blue sky.
A woman reads a book in a quiet library, sunlight falling on the pages.
Two children play with a yellow ball in a green park.
A dog runs through tall grass and jumps over a wooden fence.
Close-up of a chef chopping vegetables on a kitchen counter.
An old car drives down an empty desert road at noon.
Rain falls on the window of a small cafe; people hurry past outside.
A bird flies over the ocean, then lands on a rocky cliff.
The same man opens the door and walks into a dark room.
She turns around and smiles at the camera.
Wide shot of a forest in autumn, orange and brown leaves on the ground.
A boat sails across a calm lake in the early morning fog.
A panda sits on a stool and plays a small guitar.
The astronaut floats inside the space station, looking out at the Earth.
A train crosses a long bridge over a river valley.
Night falls over the city; lights turn on in the tall buildings.
A girl in a white dress dances in a field of flowers.
The horse gallops along the shore, its mane blowing in the wind.
Scene 1: a knight rides to the castle. Scene 2: he fights a dragon. Scene 3: he returns home.
Fireworks explode above the harbor at midnight, 2024.
A robot walks through a factory and picks up a metal box.
Slow motion shot of water drops splashing into a glass bowl.
The old man feeds pigeons in the square while a bus drives by.
A young woman with long black hair looks out of a train window.
Aerial view of a village with red roofs and narrow streets.
A fox hunts quietly in the snow, its ears turned forward.
The waves crash against the lighthouse during a storm!
Is this the end? No, the hero stands up again and keeps fighting.
Quick zoom into the eyes of a tiger hiding in the jungle.
Jazz musicians play on a stage with blue and purple lights.
THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG; VIEW 0123456789 (WIDE) - "ZOOM" / PAN: 50% & more? #1 @ 8:30 [cut] +x = y*z <end> ~ _ ' | { } $ ^ `
"""


def build_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 256):
    """Train a ~``vocab_size``-piece SentencePiece unigram model on a built-in corpus, save a T5 tokenizer.

    The vocabulary keeps T5's layout (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2). The trained
    ``spiece.model`` is saved beside the tokenizer files in ``path``.

    Returns:
        A ``transformers.T5Tokenizer``, also saved with ``save_pretrained(path)``.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    os.makedirs(path, exist_ok=True)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,  # the corpus is small: take at most `vocab_size` pieces
        num_threads=1,  # one thread keeps training deterministic
        minloglevel=2,
    )
    spm_path = os.path.join(path, "spiece.model")
    with open(spm_path, "wb") as handle:
        handle.write(model_bytes.getvalue())

    processor = spm.SentencePieceProcessor(model_file=spm_path)
    vocab = [(processor.id_to_piece(i), float(processor.get_score(i))) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)
    tokenizer.save_pretrained(path)
    return tokenizer


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"`style` must be one of {list(STYLES)} (CogVideoX-5b, -2b, 1.5), got {style!r}.")
    return style


def _tiny_text_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as in CogVideoX's t5-v1_1-xxl
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _tiny_vae(style: str):
    from diffusers import AutoencoderKLCogVideoX

    # Four blocks: spatial compression 2**3 = 8 and, with ratio 4, temporal compression 4, as the real VAE.
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=TINY_LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=TINY_HEIGHT,
        sample_width=TINY_WIDTH,
        scaling_factor=1.15258426 if style == "2b" else 0.7,
    )


def _tiny_transformer(style: str):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        time_embed_dim=32,
        text_embed_dim=TINY_TEXT_DIM,
        num_layers=2,
        sample_width=TINY_WIDTH // 8,
        sample_height=TINY_HEIGHT // 8,
        sample_frames=TINY_FRAMES,
        patch_size=2,
        patch_size_t=2 if style == "1.5" else None,
        temporal_compression_ratio=4,
        max_text_seq_length=MAX_SEQUENCE_LENGTH,
        use_rotary_positional_embeddings=style != "2b",
        patch_bias=style != "1.5",
    )


def tiny_scheduler(style: str):
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=3.0 if style == "2b" else 1.0,
    )


def build_tiny_components(style: str = "5b", seed: int = 0) -> Dict[str, Any]:
    """Build tiny random CogVideoX components, deterministic in ``seed``, in fp32.

    Args:
        style: ``"5b"`` (3D RoPE, like CogVideoX-5b and the released Mask²DiT), ``"2b"`` (sincos positional
            embeddings) or ``"1.5"`` (RoPE and ``patch_size_t=2``).
        seed: seeds the weights; the global torch RNG state is left untouched.

    Returns:
        ``dict(tokenizer, text_encoder, vae, transformer, scheduler)``, ready for ``CogVideoXPipeline(**components)``.
    """
    style = _check_style(style)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)

    with torch.random.fork_rng(devices=[]):
        # One seed per model, so that changing one model's size leaves the others' weights as they were.
        torch.manual_seed(seed)
        text_encoder = _tiny_text_encoder(tokenizer)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(style)
        torch.manual_seed(seed + 2)
        transformer = _tiny_transformer(style)

    for model in (text_encoder, vae, transformer):
        model.eval()  # built in fp32 (torch default dtype); eval() only turns dropout off
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": tiny_scheduler(style),
    }


def save_tiny_cogvideox(path: str | os.PathLike, style: str = "5b", seed: int = 0) -> str:
    """Save a standard CogVideoX folder (``model_index.json`` + component subfolders) of tiny random models.

    Loadable with ``CogVideoXPipeline.from_pretrained(path)`` or ``Mask2DiTPipeline.from_pretrained(path)``.
    Returns ``path`` as a string.
    """
    from diffusers import CogVideoXPipeline

    path = os.fspath(path)
    CogVideoXPipeline(**build_tiny_components(style=style, seed=seed)).save_pretrained(path)
    return path
