"""Loading the authors' released layout (Hub ``qth/Mask2DiT``): component folders without ``model_index.json``.

`Mask2DiTPipeline.from_pretrained` sends folders and repos without ``model_index.json`` here
(`has_model_index`); `load_official_components` loads each component with its own library's loader.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Optional, Union

import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import T5EncoderModel, T5Tokenizer

from .transformer import Mask2DiTTransformer3DModel

OFFICIAL_MODEL_ID = "qth/Mask2DiT"
COMPONENT_NAMES = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
# Download options every component loader accepts.
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")

# Recent diffusers renamed `torch_dtype` to `dtype` and warn on the old name: pass the name it takes.
DIFFUSERS_DTYPE_KWARG = (
    "dtype"
    if hasattr(importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype")
    else "torch_dtype"
)


def load_official_components(
    pretrained_model_name_or_path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None, **kwargs
) -> Dict[str, Any]:
    """The five components of the authors' layout: ``transformer/ vae/ text_encoder/ tokenizer/ scheduler/``, the
    transformer config naming the authors' class (and ``attn_msk_version``).

    Components passed by name (``vae=...``) are used as they are; download options go to every component's loader,
    other keyword arguments to the diffusers models' ``from_pretrained``.
    """
    import diffusers
    from diffusers.utils import is_transformers_version

    path = os.fspath(pretrained_model_name_or_path)
    components = {name: kwargs.pop(name) for name in COMPONENT_NAMES if name in kwargs}
    hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    dtype = dtype or kwargs.pop("torch_dtype", None)
    diffusers_kwargs, text_kwargs = dict(kwargs), dict(hub_kwargs)
    if dtype is not None:
        diffusers_kwargs[DIFFUSERS_DTYPE_KWARG] = dtype
        text_kwargs["dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype"] = dtype

    if "tokenizer" not in components:
        components["tokenizer"] = T5Tokenizer.from_pretrained(path, subfolder="tokenizer", **hub_kwargs)
    if "text_encoder" not in components:
        components["text_encoder"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", **text_kwargs)
    if "vae" not in components:
        components["vae"] = AutoencoderKLCogVideoX.from_pretrained(
            path, subfolder="vae", **pickled_shards_kwargs(path, "vae", diffusers_kwargs)
        )
    if "transformer" not in components:
        components["transformer"] = Mask2DiTTransformer3DModel.from_pretrained(
            path, subfolder="transformer", **pickled_shards_kwargs(path, "transformer", diffusers_kwargs)
        )
    if "scheduler" not in components:
        scheduler_config = diffusers.CogVideoXDDIMScheduler.load_config(path, subfolder="scheduler", **hub_kwargs)
        # The release uses CogVideoXDDIMScheduler; honour another diffusers scheduler its config names.
        scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
            scheduler_class = diffusers.CogVideoXDDIMScheduler
        components["scheduler"] = scheduler_class.from_config(scheduler_config)
    return components


def pickled_shards_kwargs(path: str, subfolder: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` plus ``use_safetensors=False`` for a local model folder whose only weights are sharded ``.bin`` files.

    diffusers looks for a sharded index only in the format it prefers (safetensors) and falls back to a
    single ``.bin`` file, so sharded ``.bin`` weights (as in the authors' release) must be asked for; they
    are still read with ``torch.load(weights_only=True)``.
    """
    folder = os.path.join(path, subfolder)
    if "use_safetensors" in kwargs or not os.path.isdir(folder) or any(n.endswith(".safetensors") for n in os.listdir(folder)):
        return kwargs
    if not os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.bin.index.json")):
        return kwargs
    return {**kwargs, "use_safetensors": False}


def has_model_index(pretrained_model_name_or_path: Union[str, os.PathLike], kwargs: Dict[str, Any]) -> bool:
    """Whether a local folder or Hub repo holds ``model_index.json`` (the authors' release may not)."""
    path = os.fspath(pretrained_model_name_or_path)
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, subfolder, "model_index.json"))
    try:
        from huggingface_hub import file_exists, try_to_load_from_cache
        from huggingface_hub.file_download import _CACHED_NO_EXIST

        filename = "/".join(p for p in (subfolder, "model_index.json") if p)
        cached = try_to_load_from_cache(
            path, filename, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
        )
        if isinstance(cached, str):
            return True
        if cached is _CACHED_NO_EXIST:
            return False
        offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        if kwargs.get("local_files_only") or offline:
            # Offline: a cached transformer config without a cached model_index.json is the authors' layout.
            transformer_config = "/".join(p for p in (subfolder, "transformer", "config.json") if p)
            cached = try_to_load_from_cache(
                path, transformer_config, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
            )
            return not isinstance(cached, str)
        return file_exists(path, filename, revision=kwargs.get("revision"), token=kwargs.get("token"))
    except Exception:  # offline or unknown repo: diffusers' own loader gives the clearer error
        return True
