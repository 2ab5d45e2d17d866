"""Encode clips with the VAE and captions with T5 once; training then reads the cache without either model.

Cache layout (``cache_dir``)::

    cache_index.json          settings and the usable records, written last (atomically)
    latents/<key>.safetensors latent_mean, latent_std (F, C, h, w) and prompt_embeds (L, D) of one clip

One file per clip and frame count, each written atomically, so an interrupted ``mask2dit precompute`` picks
up where it stopped. Under ``accelerate launch`` every process encodes its share of the clips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..paths import confined
from ..video_io import VideoReadError
from .config import TrainingConfig
from .data import Clip, SceneSource, SkipReport, derive_seed, load_clip_pixels, load_training_records, stable_key

logger = logging.getLogger(__name__)

CACHE_FORMAT = "mask2dit-latent-cache"
CACHE_VERSION = 1
INDEX_NAME = "cache_index.json"
NULL_PROMPT_NAME = "null_prompt.safetensors"  # the empty prompt's embedding, for caption dropout
LATENT_FOLDER = "latents"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `mixed_precision` -> dtype of frozen weights (and of the VAE and T5 while encoding).
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SceneEncoder:
    """The VAE and T5 encoding that training needs, the same as CogVideoX's pipeline does it.

    Args:
        vae: ``AutoencoderKLCogVideoX``.
        tokenizer, text_encoder: the T5 tokenizer and encoder.
        max_sequence_length: tokens per prompt (CogVideoX: 226, the transformer's ``max_text_seq_length``).
    """

    def __init__(self, vae: Any, tokenizer: Any, text_encoder: Any, max_sequence_length: int = 226) -> None:
        self.vae = vae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_sequence_length = int(max_sequence_length)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pixels ``(B, F, 3, H, W)`` in [-1, 1] -> posterior mean and std ``(B, f, C, h, w)``, times the scaling factor."""
        parameter = next(self.vae.parameters())
        video = pixels.to(device=parameter.device, dtype=parameter.dtype).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
        posterior = self.vae.encode(video).latent_dist
        scale = float(self.vae.config.scaling_factor)
        mean = (posterior.mean * scale).permute(0, 2, 1, 3, 4).float()
        std = (posterior.std * scale).permute(0, 2, 1, 3, 4).float()
        return mean, std

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> T5 embeddings ``(B, max_sequence_length, D)``, padded and truncated like the pipeline."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0].float()


def cache_key(clip: Clip, num_frames: int, height: int, width: int, stage: str) -> str:
    """File stem of one clip's cache entry; changes whenever what is encoded changes."""
    text = f"{os.path.abspath(clip.video)}|{clip.caption}|{num_frames}|{height}x{width}|{stage}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def _atomic_write_json(data: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_save_tensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _model_key(model: str) -> str:
    """How the cache records its model: a local folder by absolute path, a Hub id as it is."""
    return os.path.abspath(model) if os.path.exists(model) else model


def _settings(config: TrainingConfig, scaling_factor: float) -> Dict[str, Any]:
    return {
        "stage": config.stage,
        "height": config.height,
        "width": config.width,
        "frame_counts": sorted(set(config.scene_frames)),
        "scaling_factor": scaling_factor,
        "dtype": config.cache_dtype,
        "model": _model_key(config.pretrained_model_name_or_path),
        "seed": config.seed,
    }


def _check_existing_cache(config: TrainingConfig) -> None:
    """Refuse to add to a cache made from another model, dtype or seed (its files would be mixed with new ones)."""
    path = os.path.join(config.cache_dir, INDEX_NAME)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        settings = json.load(handle).get("settings", {})
    current = {"model": _model_key(config.pretrained_model_name_or_path), "dtype": config.cache_dtype, "seed": config.seed}
    names = {"model": "pretrained_model_name_or_path", "dtype": "cache_dtype", "seed": "seed"}
    for key, value in current.items():
        if key in settings and settings[key] != value:
            raise ValueError(
                f"`{names[key]}` is {value!r} but the cache in {config.cache_dir} was made with {settings[key]!r}; "
                "use another `cache_dir` (or delete this one)."
            )


def precompute_cache(
    config: TrainingConfig, encoder: SceneEncoder, records: Sequence[Sequence[Clip]], process_index: int = 0, num_processes: int = 1
) -> str:
    """Encode this process's share of the clips of ``records`` into ``config.cache_dir``; returns the folder.

    Each clip is encoded once per distinct frame count of ``config.scene_frames``, its frame window drawn
    from ``(seed, video path, frames)``. Clips already in the cache are kept. Call :func:`write_cache_index`
    on one process after all processes finished.
    """
    from tqdm.auto import tqdm

    latent_folder = os.path.join(config.cache_dir, LATENT_FOLDER)
    os.makedirs(latent_folder, exist_ok=True)
    dtype = TORCH_DTYPES[config.cache_dtype]
    tasks = sorted({(clip, frames) for record in records for clip in record for frames in set(config.scene_frames)}, key=lambda t: (t[0].video, t[1]))
    failures = SkipReport()
    for clip, frames in tqdm(tasks[process_index::num_processes], desc="precompute", disable=process_index != 0):
        path = os.path.join(latent_folder, cache_key(clip, frames, config.height, config.width, config.stage) + ".safetensors")
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(derive_seed(config.seed, stable_key(os.path.abspath(clip.video)), frames))
        try:
            pixels = load_clip_pixels(clip, frames, config.height, config.width, config.stage, rng)
        except VideoReadError as error:
            failures.add("unreadable or too short videos", str(error))
            continue
        mean, std = encoder.encode_video(pixels[None])
        embeds = encoder.encode_prompts([clip.caption])
        _atomic_save_tensors(
            {"latent_mean": mean[0].to(dtype).cpu(), "latent_std": std[0].to(dtype).cpu(), "prompt_embeds": embeds[0].to(dtype).cpu()},
            path,
            metadata={"video": clip.video, "caption": clip.caption, "frames": str(frames)},
        )
    failures.warn("clips while precomputing")
    return config.cache_dir


def write_cache_index(config: TrainingConfig, records: Sequence[Sequence[Clip]], scaling_factor: float) -> str:
    """Write ``cache_index.json`` listing the records whose every clip was encoded; returns its path.

    Records with a clip that could not be encoded are left out and counted in one warning.
    """
    latent_folder = os.path.join(config.cache_dir, LATENT_FOLDER)
    skips = SkipReport()
    kept: List[List[Dict[str, Any]]] = []
    for record in records:
        entries = []
        for clip in record:
            files = {
                str(frames): cache_key(clip, frames, config.height, config.width, config.stage) + ".safetensors"
                for frames in sorted(set(config.scene_frames))
            }
            if not all(os.path.exists(os.path.join(latent_folder, name)) for name in files.values()):
                skips.add("records with a clip that could not be encoded", clip.video)  # the clip itself, not the record's first
                break
            entries.append({"video": clip.video, "caption": clip.caption, "files": files})
        if len(entries) == len(record):
            kept.append(entries)
    skips.warn("records from the cache")
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "settings": _settings(config, scaling_factor),
        "records": kept,
    }
    path = os.path.join(config.cache_dir, INDEX_NAME)
    _atomic_write_json(index, path)
    logger.info(f"Cache index with {len(kept)} records written to {path}")
    return path


class CacheSource(SceneSource):
    """Reads one clip's cached tensors: ``{"latent_mean", "latent_std": (f, C, h, w), "prompt_embeds": (L, D)}`` in float32."""

    def __init__(self, cache_dir: str, files: Dict[Tuple[str, str], Dict[str, str]]) -> None:
        self.latent_folder = os.path.join(cache_dir, LATENT_FOLDER)
        self.files = files  # (video path, caption) -> {frames: file name}

    def load(self, clip: Clip, num_frames: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.describe(clip, num_frames)
        try:
            tensors = load_file(path)
        except Exception as error:  # a deleted or damaged cache file is bad data, not a reason to stop
            raise VideoReadError(f"Could not read cache file {path}: {error}") from error
        return {key: tensors[key].float() for key in ("latent_mean", "latent_std", "prompt_embeds")}

    def describe(self, clip: Clip, num_frames: int) -> str:
        return os.path.join(self.latent_folder, self.files[(clip.video, clip.caption)][str(num_frames)])


def open_cache(config: TrainingConfig) -> Tuple[List[List[Clip]], CacheSource]:
    """The records and the scene source of ``config.cache_dir``, after checking it matches ``config``."""
    path = os.path.join(config.cache_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"`cache_dir` {config.cache_dir} has no {INDEX_NAME}; run `mask2dit precompute --config <same config>` first."
        )
    with open(path, encoding="utf-8") as handle:
        index = json.load(handle)
    if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
        raise ValueError(f"{path} is not a version-{CACHE_VERSION} {CACHE_FORMAT} index; run `mask2dit precompute` again.")
    settings = index["settings"]
    for name in ("stage", "height", "width"):
        if settings[name] != getattr(config, name):
            raise ValueError(
                f"`{name}` is {getattr(config, name)!r} but the cache in {config.cache_dir} was made with {settings[name]!r}; "
                "run `mask2dit precompute` with this config or use a matching one."
            )
    missing = sorted(set(config.scene_frames) - set(settings["frame_counts"]))
    if missing:
        raise ValueError(
            f"`frames_per_scene` needs {missing} frames per scene but the cache holds {settings['frame_counts']}; "
            "run `mask2dit precompute` with this config."
        )
    records: List[List[Clip]] = []
    files: Dict[Tuple[str, str], Dict[str, str]] = {}
    latent_folder = os.path.join(config.cache_dir, LATENT_FOLDER)
    for number, entries in enumerate(index["records"]):
        records.append([Clip(entry["video"], entry["caption"]) for entry in entries])
        for entry in entries:
            for frames, name in entry["files"].items():
                # Names read from the index stay inside the cache's latents/ folder.
                confined(latent_folder, name, f"{path}: record {number}, file for {frames} frames")
            files[(entry["video"], entry["caption"])] = entry["files"]
    if config.stage == "sft":
        short = [record for record in records if len(record) < config.num_scenes]
        if short:
            logger.warning(f"Skipped {len(short)} cached videos with fewer than {config.num_scenes} shots.")
            records = [record for record in records if len(record) >= config.num_scenes]
    return records, CacheSource(config.cache_dir, files)


def write_null_prompt(cache_dir: str, encoder: SceneEncoder, cache_dtype: str = "float32") -> str:
    """Save the empty prompt's embedding ``(L, D)`` beside the cache (caption dropout reads it); returns its path."""
    path = os.path.join(cache_dir, NULL_PROMPT_NAME)
    embeds = encoder.encode_prompts([""])[0].to(TORCH_DTYPES[cache_dtype]).cpu()
    _atomic_save_tensors({"prompt_embeds": embeds}, path, metadata={"caption": ""})
    return path


def load_null_prompt(cache_dir: str) -> torch.Tensor:
    """The empty prompt's embedding ``(L, D)`` (float32) saved by :func:`write_null_prompt`."""
    from safetensors.torch import load_file

    path = os.path.join(cache_dir, NULL_PROMPT_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"`caption_dropout` needs the empty prompt's embedding, but the cache in {cache_dir} has no {NULL_PROMPT_NAME}; "
            "run `mask2dit precompute` again (it keeps the clips already encoded)."
        )
    return load_file(path)["prompt_embeds"].float()


def load_encoders(config: TrainingConfig, device: torch.device, dtype: torch.dtype) -> SceneEncoder:
    """The frozen VAE and T5 of ``config.pretrained_model_name_or_path`` on ``device`` in ``dtype``.

    Prompts are padded to the transformer's ``max_text_seq_length`` (226 for CogVideoX), as the pipeline does.
    """
    from diffusers import AutoencoderKLCogVideoX
    from transformers import AutoTokenizer, T5EncoderModel

    from .. import Mask2DiTTransformer3DModel

    path = config.pretrained_model_name_or_path
    if config.transformer_path:
        transformer_config = Mask2DiTTransformer3DModel.load_config(config.transformer_path)
    else:
        transformer_config = Mask2DiTTransformer3DModel.load_config(path, subfolder="transformer")
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    # Loaded as stored, then cast only when needed: the dtype keyword of `from_pretrained` differs across versions.
    text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder").to(device).eval()
    vae = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae").to(device).eval()
    for model in (text_encoder, vae):
        if model.dtype != dtype:
            model.to(dtype=dtype)
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    return SceneEncoder(vae, tokenizer, text_encoder, transformer_config.get("max_text_seq_length", 226))


def precompute(config: TrainingConfig) -> Optional[str]:
    """Encode ``config.data_file`` into ``config.cache_dir``, sharing the clips among the processes of the launch.

    Returns the index path on the main process (None on the others).
    """
    from accelerate import PartialState

    config.require_model()
    if not config.cache_dir:
        raise ValueError("`cache_dir` is required for precompute: the folder the cache is written to.")
    if not config.data_file:
        raise ValueError("`data_file` is required for precompute: the clips to encode.")
    _check_existing_cache(config)
    state = PartialState()
    records = load_training_records(
        config.data_file, config.stage, config.num_scenes, config.scene_frames, config.video_root, warn=state.is_main_process
    )
    # Frozen encoders in the training precision on GPUs; fp32 on CPU, where bf16 convolutions are slow.
    dtype = WEIGHT_DTYPES[config.mixed_precision] if state.device.type != "cpu" else torch.float32
    try:
        encoder = load_encoders(config, state.device, dtype)
    except OSError as error:  # a folder without the CogVideoX components, or a Hub id that cannot be fetched
        raise ValueError(
            f"`pretrained_model_name_or_path` {config.pretrained_model_name_or_path!r} could not be loaded: "
            f"{str(error).strip().splitlines()[0]}"
        ) from None
    precompute_cache(config, encoder, records, state.process_index, state.num_processes)
    if state.is_main_process:
        write_null_prompt(config.cache_dir, encoder, config.cache_dtype)
    state.wait_for_everyone()
    path = write_cache_index(config, records, float(encoder.vae.config.scaling_factor)) if state.is_main_process else None
    state.wait_for_everyone()
    return path
