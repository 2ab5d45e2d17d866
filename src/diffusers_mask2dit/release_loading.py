"""Loading the authors' released layout (Hub ``qth/Mask2DiT``): component folders without ``model_index.json``.

`Mask2DiTPipeline.from_pretrained` sends folders and repos without ``model_index.json`` here
(`has_model_index`); `load_official_components` loads each component with its own library's loader.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from transformers import T5EncoderModel, T5Tokenizer

from .transformer import Mask2DiTTransformer3DModel

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

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


# --------------------------------------------------------------------------------------------------
# What a folder carries beyond its components
# --------------------------------------------------------------------------------------------------

# A model folder's own sampling defaults (e.g. the Shapes model's 20 steps / guidance 3), which `__call__`, `extend`
# and `generate_long` use for the arguments a caller leaves at None. Written by `save_pretrained` when set.
GENERATION_DEFAULTS_FILE = "generation_defaults.json"
GENERATION_DEFAULT_KEYS = ("num_inference_steps", "guidance_scale", "num_frames", "height", "width", "scene_mask")


def check_generation_defaults(defaults: Any, source: str) -> Dict[str, Any]:
    """``defaults`` as a dict of known keys, or a ValueError naming ``source`` and the keys it accepts (the values
    are checked as the arguments they stand for, when they are used)."""
    if not isinstance(defaults, dict) or not set(defaults) <= set(GENERATION_DEFAULT_KEYS):
        unknown = sorted(set(defaults) - set(GENERATION_DEFAULT_KEYS)) if isinstance(defaults, dict) else defaults
        raise ValueError(
            f"{source} must be a JSON object with keys among {list(GENERATION_DEFAULT_KEYS)}; got {unknown!r}."
        )
    return dict(defaults)


def load_generation_defaults(pretrained_model_name_or_path: Union[str, os.PathLike], kwargs: Dict[str, Any]) -> Dict:
    """The ``generation_defaults.json`` of a local folder or Hub repo (download options from ``kwargs``); ``{}``
    when it has none."""
    import json

    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(path):
        file = os.path.join(path, GENERATION_DEFAULTS_FILE)
        file = file if os.path.isfile(file) else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        try:
            options = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs and key != "proxies"}
            file = hf_hub_download(path, GENERATION_DEFAULTS_FILE, **options)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            file = None
    if file is None:
        return {}
    with open(file, encoding="utf-8") as handle:
        try:
            defaults = json.load(handle)
        except ValueError as error:
            raise ValueError(f"{file} is not valid JSON ({error}).") from error
    return check_generation_defaults(defaults, file)


class _OwnConfigKeysFilter:
    """Drops diffusers' "config attributes {...} will be ignored" when the only keys are the Mask²DiT ones a folder
    saved by this pipeline records on its (stock-class) transformer: the pipeline reads them back, so the warning
    would tell a reader that the scene mask is ignored when it is not."""

    OWN_KEYS = ("attn_mask_variant", "attn_msk_version")

    def filter(self, record: Any) -> bool:  # a logging.Filter: `Logger.addFilter` takes any object with `filter`
        message = record.getMessage()
        if "were passed to CogVideoXTransformer3DModel, but are not expected" not in message:
            return True
        return not all(key in self.OWN_KEYS for key in re.findall(r"'(\w+)':", message.split("}")[0]))


@contextlib.contextmanager
def own_config_keys_quiet():
    """While loading a saved Mask²DiT folder: no warning about its own transformer config keys."""
    diffusers_logger = logging.get_logger("diffusers.configuration_utils")
    quiet = _OwnConfigKeysFilter()
    diffusers_logger.addFilter(quiet)
    try:
        yield
    finally:
        diffusers_logger.removeFilter(quiet)


class Mask2DiTLoadingMixin:
    """How `Mask2DiTPipeline` loads and saves: diffusers folders and Hub ids, the authors' released layout (no
    ``model_index.json``), and the folder's `generation_defaults`. Put before the diffusers pipeline class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "DiffusionPipeline":
        """Load from a diffusers folder or Hub id; folders without ``model_index.json`` go to `from_official`.

        ``dtype`` and ``torch_dtype`` are the same option, passed on under the name the installed diffusers takes.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        if not has_model_index(pretrained_model_name_or_path, kwargs):
            return cls.from_official(pretrained_model_name_or_path, dtype=dtype, **kwargs)
        if dtype is not None:
            kwargs[DIFFUSERS_DTYPE_KWARG] = dtype
        with own_config_keys_quiet():
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.generation_defaults = load_generation_defaults(pretrained_model_name_or_path, kwargs)
        return pipe

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, plus ``generation_defaults.json`` when the pipeline has defaults."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.generation_defaults:
            with open(os.path.join(save_directory, GENERATION_DEFAULTS_FILE), "w", encoding="utf-8") as handle:
                json.dump(check_generation_defaults(self.generation_defaults, "generation_defaults"), handle, indent=2)

    @classmethod
    def from_official(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike] = OFFICIAL_MODEL_ID,
        dtype: Optional[torch.dtype] = None,
        **kwargs,
    ) -> "DiffusionPipeline":
        """Load the authors' released layout (no ``model_index.json``); see `load_official_components`.

        ``dtype`` (or ``torch_dtype``) sets the models' dtype; download options (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``, ...) go to every component's loader; components passed by name are used.
        """
        return cls(**load_official_components(pretrained_model_name_or_path, dtype=dtype, **kwargs))
