"""Video/text encoders for the metrics.

Any object with ``encode_video(frames) -> (D,)`` and ``encode_text(str) -> (D,)`` works (:class:`VideoTextEncoder`);
``frames`` is ``uint8 (F, H, W, 3)``. An encoder may also offer ``encode_frames(frames) -> (F, D)`` for the
per-frame metrics (CSCV, smoothness); without it each frame is encoded as a one-frame video.

:class:`CLIPVideoEncoder` is the built-in choice: a ``transformers`` CLIP model standing in for ViCLIP (which the
Mask²DiT paper uses). A scene's video embedding is the L2-normalised mean of the L2-normalised image embeddings of
``frames_per_scene`` (default 8) frames sampled evenly over the scene, as ViCLIP-style evaluation samples 8 frames.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, List, Optional, Protocol, runtime_checkable

import numpy as np

from ..video_io import to_uint8_frames


@runtime_checkable
class VideoTextEncoder(Protocol):
    """Embeds a scene's frames ``uint8 (F, H, W, 3)`` and a prompt into the same ``D``-dimensional space."""

    def encode_video(self, frames: np.ndarray) -> Any:
        """``(D,)`` embedding (NumPy array, torch tensor or list) of one scene."""
        ...

    def encode_text(self, text: str) -> Any:
        """``(D,)`` embedding of one prompt."""
        ...


@runtime_checkable
class FrameEncoder(Protocol):
    """Optional extra for per-frame metrics: ``encode_frames(frames (F, H, W, 3)) -> (F, D)``."""

    def encode_frames(self, frames: np.ndarray) -> Any:
        ...


# Encoders other packages provide by name (e.g. the Shapes world's exact scorer, "shapes-scorer"): a factory
# taking no arguments. The provider registers itself; this package never imports it.
ENCODERS: Dict[str, Callable[[], Any]] = {}


def register_encoder(name: str, factory: Callable[[], Any]) -> None:
    """Make ``factory()`` the encoder called ``name`` (see :func:`registered_encoder`)."""
    ENCODERS[name] = factory


def registered_encoder(name: str) -> Any:
    """A new encoder of the registered ``name``; a ValueError lists the registered names."""
    if name not in ENCODERS:
        raise ValueError(f"No encoder named {name!r} is registered; registered: {sorted(ENCODERS) or 'none'}.")
    return ENCODERS[name]()


def check_encoder(encoder: Any) -> None:
    """Raise ``ValueError`` unless ``encoder`` has callable ``encode_video`` and ``encode_text``."""
    missing = [name for name in ("encode_video", "encode_text") if not callable(getattr(encoder, name, None))]
    if missing:
        raise ValueError(
            f"`encoder` must provide encode_video(frames) -> (D,) and encode_text(str) -> (D,) "
            f"(e.g. CLIPVideoEncoder); {type(encoder).__name__} lacks {', '.join(missing)}."
        )


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def encode_frame_embeddings(encoder: Any, frames: np.ndarray) -> np.ndarray:
    """Per-frame embeddings ``(F, D)`` of ``frames`` ``(F, H, W, 3)``: ``encode_frames`` if the encoder has it,
    otherwise ``encode_video`` on each single frame."""
    if callable(getattr(encoder, "encode_frames", None)):
        embeddings = _to_numpy(encoder.encode_frames(frames))
    else:
        embeddings = np.stack([_to_numpy(encoder.encode_video(frames[k : k + 1])).reshape(-1) for k in range(len(frames))])
    if embeddings.ndim != 2 or embeddings.shape[0] != len(frames):
        raise ValueError(
            f"`encoder` returned frame embeddings of shape {embeddings.shape}; expected ({len(frames)}, D)."
        )
    return embeddings


def sample_frame_indices(num_frames: int, num_samples: int) -> np.ndarray:
    """``num_samples`` frame indices spread evenly over ``[0, num_frames - 1]`` (first and last included);
    every frame when ``num_frames <= num_samples``."""
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1; got {num_frames}.")
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1; got {num_samples}.")
    if num_frames <= num_samples:
        return np.arange(num_frames)
    return np.linspace(0, num_frames - 1, num=num_samples).round().astype(np.int64)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(path_or_id: str) -> bool:
    """True unless ``path_or_id`` has the shape of a Hub id (``name`` or ``owner/name``)."""
    return os.path.exists(path_or_id) or not _HUB_ID.match(path_or_id)


class CLIPVideoEncoder:
    """CLIP (``transformers.CLIPModel``) as a video/text encoder; a stand-in for ViCLIP.

    * ``encode_frames(frames (F, H, W, 3))`` -> ``(F, D)`` L2-normalised image embeddings.
    * ``encode_video(frames)`` -> ``(D,)``: normalise(mean of the normalised embeddings of
      ``frames_per_scene`` evenly sampled frames).
    * ``encode_text(str)`` -> ``(D,)`` L2-normalised text embedding (truncated to the model's context length).
    """

    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        device: Optional[str] = None,
        frames_per_scene: int = 8,
        batch_size: int = 32,
    ) -> None:
        import torch

        if not isinstance(frames_per_scene, int) or frames_per_scene < 1:
            raise ValueError(f"`frames_per_scene` must be an integer >= 1; got {frames_per_scene!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.frames_per_scene = frames_per_scene
        self.batch_size = batch_size
        self.dtype = next(self.model.parameters()).dtype
        context = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)
        tokenizer_max = getattr(tokenizer, "model_max_length", context) or context
        self.max_text_length = int(min(context, tokenizer_max))

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        device: Optional[str] = None,
        frames_per_scene: int = 8,
        batch_size: int = 32,
        dtype: Optional[Any] = None,
        local_files_only: bool = False,
    ) -> "CLIPVideoEncoder":
        """Load model, image processor and tokenizer from a local folder or a Hub id.

        ``device`` defaults to CUDA when available; ``dtype`` (e.g. ``torch.float16``) is applied after loading.
        Raises ``ValueError`` naming ``path_or_id`` if nothing loadable is found there.
        """
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if not isinstance(frames_per_scene, int) or frames_per_scene < 1:
            raise ValueError(f"`frames_per_scene` must be an integer >= 1; got {frames_per_scene!r}.")
        if not isinstance(path_or_id, str) or not path_or_id.strip():
            raise ValueError(f"`path_or_id` must be a CLIP model folder or Hub id; got {path_or_id!r}.")
        expanded = os.path.expanduser(path_or_id)
        if _looks_like_path(path_or_id) and not os.path.isdir(expanded):
            raise ValueError(
                f"`path_or_id`: no CLIP model folder at {path_or_id!r}; pass a folder saved with "
                "CLIPModel.save_pretrained (with its tokenizer and image processor) or a Hub id."
            )
        source = expanded if os.path.isdir(expanded) else path_or_id
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=local_files_only)
            image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                f"`path_or_id`: could not load a CLIP model, tokenizer and image processor from {path_or_id!r} "
                f"({type(error).__name__}: {error})."
            ) from error
        if dtype is not None:
            model = model.to(dtype=dtype)
        return cls(model, image_processor, tokenizer, device=device, frames_per_scene=frames_per_scene, batch_size=batch_size)

    @staticmethod
    def _features(output: Any) -> Any:
        # transformers < 5 returns the projected tensor; >= 5 a BaseModelOutputWithPooling.
        if hasattr(output, "pooler_output"):
            return output.pooler_output
        return output

    def encode_frames(self, frames: Any) -> np.ndarray:
        """``(F, D)`` float32 L2-normalised CLIP image embeddings of ``frames`` ``(F, H, W, 3)``."""
        import torch

        array = to_uint8_frames(frames)
        chunks: List[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(array), self.batch_size):
                batch = list(array[start : start + self.batch_size])
                pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                pixels = pixels.to(self.device, dtype=self.dtype)
                features = self._features(self.model.get_image_features(pixel_values=pixels)).float()
                features = torch.nn.functional.normalize(features, dim=-1)
                chunks.append(features.cpu().numpy())
        return np.concatenate(chunks, axis=0)

    def encode_video(self, frames: Any) -> np.ndarray:
        """``(D,)``: normalise(mean of normalised embeddings of ``frames_per_scene`` evenly sampled frames)."""
        array = to_uint8_frames(frames)
        picks = sample_frame_indices(len(array), self.frames_per_scene)
        mean = self.encode_frames(array[picks]).astype(np.float64).mean(axis=0)
        return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)

    def encode_text(self, text: str) -> np.ndarray:
        """``(D,)`` float32 L2-normalised CLIP text embedding of ``text``."""
        import torch

        if not isinstance(text, str):
            raise ValueError(f"`text` must be a string; got {type(text).__name__}.")
        tokens = self.tokenizer(
            [text], padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        tokens = {key: value.to(self.device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            features = self._features(self.model.get_text_features(**tokens)).float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features[0].cpu().numpy()


# --------------------------------------------------------------------------------------------------
# A tiny random CLIP, built offline, for trying the metrics and the command without a download
# --------------------------------------------------------------------------------------------------

TINY_CLIP_SIZE = 32  # pixels the tiny CLIP's image processor resizes and crops frames to
TINY_CLIP_DIM = 16  # embedding width
_TINY_CLIP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-"


def save_tiny_clip(path: "str | os.PathLike", seed: int = 0) -> str:
    """Save a tiny random-weight CLIP (model, character-level tokenizer, image processor) to ``path``.

    It loads with :meth:`CLIPVideoEncoder.from_pretrained` like a real CLIP folder and embeds into
    ``TINY_CLIP_DIM`` dimensions. Its weights are random (seeded by ``seed``; the global torch RNG is left as it
    was): scores computed with it exercise the machinery and mean nothing. Returns ``path`` as a string.
    """
    import json

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _TINY_CLIP_CHARS:  # every character alone and as a word end: no merges needed
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_SIZE}, crop_size={"height": TINY_CLIP_SIZE, "width": TINY_CLIP_SIZE}
    ).save_pretrained(path)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, **common
        ),
        vision_config=dict(image_size=TINY_CLIP_SIZE, patch_size=8, **common),
        projection_dim=TINY_CLIP_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(path)
    return path
