"""Loading the pipeline a ``mask2dit generate`` / ``extend`` run asks for: model sources, dtypes, schedulers, a full
fine-tune's transformer, LoRAs, memory and speed options (:mod:`..optimization`) and parallel inference."""

from __future__ import annotations

import argparse
import os
import re
from typing import Dict, List, Optional

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME  # what the trainer writes

from ..cli_utils import check_device, one_line
from ..optimization import apply_optimizations, optimizations_from_args

DTYPES = ("auto", "fp32", "fp16", "bf16")
# The schedulers diffusers' CogVideoX pipelines are made for (both read a CogVideoX scheduler config as it is).
SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
LORA_ADAPTER = "cli_lora"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_source(value: str, option: str = "--model") -> str:
    """A local folder, or a string shaped like a Hub id (``owner/name``); anything else is a missing folder."""
    if os.path.isdir(value):
        if option == "--model" and not any(
            os.path.isfile(os.path.join(value, name)) for name in ("model_index.json", "transformer/config.json")
        ):
            raise ValueError(
                f"`--model`: {value!r} holds neither model_index.json (a diffusers folder) nor transformer/config.json "
                "(the authors' release layout)."
            )
        return value
    if os.path.exists(value):
        raise ValueError(f"`{option}`: {value!r} is a file; pass a model folder or a Hub id (owner/name).")
    if not _HUB_ID.match(value):
        raise ValueError(f"`{option}`: folder {value!r} does not exist (and it is not a Hub id such as owner/name).")
    return value


def wants_parallel(args: argparse.Namespace) -> bool:
    return getattr(args, "ulysses_degree", 1) > 1 or getattr(args, "cfg_parallel", False)


def resolve_device_dtype(device: str, dtype: str):
    """``--device auto`` -> cuda if available else cpu; ``--dtype auto`` -> bf16 on cuda, fp32 elsewhere."""
    import torch

    device = check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in DTYPES:
        raise ValueError(f"`--dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if dtype == "auto":
        dtype = "bf16" if str(device).startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def transformer_folder(path: str) -> "tuple[str, Optional[str]]":
    """``--transformer``: ``(folder, subfolder)`` of a transformer saved with ``save_pretrained`` (a trainer's full
    fine-tune: its output folder, which has ``transformer/``, or that folder itself)."""
    for subfolder in ("transformer", None):
        if os.path.isfile(os.path.join(path, subfolder or "", "config.json")):
            return path, subfolder
    if not os.path.isdir(path):
        raise ValueError(f"`--transformer`: folder {path!r} does not exist.")
    raise ValueError(
        f"`--transformer`: {path!r} has no config.json nor transformer/config.json; pass the output folder of a full "
        "fine-tune (`mask2dit train` with finetune: full) or a folder written by the transformer's save_pretrained."
    )


def lora_source(path: str) -> "tuple[str, Dict[str, str]]":
    """``--lora``: ``(folder or Hub id, load_lora_weights keyword arguments)`` for a LoRA saved by the trainer
    (a folder with pytorch_lora_weights.safetensors), one .safetensors file, or a Hub id."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"`--lora`: {path!r} is not a .safetensors file; pass the file or the folder holding it.")
        return os.path.dirname(os.path.abspath(path)), {"weight_name": os.path.basename(path)}
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
            raise ValueError(
                f"`--lora`: {path!r} has no {LORA_WEIGHT_NAME}; pass the output folder of a LoRA run of `mask2dit "
                "train` or the .safetensors file itself."
            )
        return path, {}
    check_model_source(path, "--lora")
    return path, {}


def load_transformer(path: str, dtype):
    """The transformer of ``--transformer`` in ``dtype``."""
    from ..release_loading import DIFFUSERS_DTYPE_KWARG  # `dtype` or `torch_dtype`, whichever this diffusers takes
    from ..transformer import Mask2DiTTransformer3DModel

    folder, subfolder = transformer_folder(path)
    try:
        return Mask2DiTTransformer3DModel.from_pretrained(folder, subfolder=subfolder, **{DIFFUSERS_DTYPE_KWARG: dtype})
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"`--transformer`: could not load {path!r}: {one_line(error)}") from error


def _check_transformer_fits(pipe, option: str) -> None:
    """A transformer made for another VAE or text encoder would fail deep inside torch: say so up front."""
    config = pipe.transformer.config
    expected = {
        "in_channels": getattr(getattr(pipe.vae, "config", None), "latent_channels", None),
        "text_embed_dim": getattr(getattr(pipe.text_encoder, "config", None), "d_model", None),
    }
    for key, value in expected.items():
        if value is not None and config.get(key) != value:
            raise ValueError(
                f"`{option}`: the transformer has {key}={config.get(key)} but this model's "
                f"{'VAE' if key == 'in_channels' else 'text encoder'} needs {value}; it was trained for another model."
            )


def apply_loras(pipe, paths: List[str], scales: Optional[List[float]]) -> None:
    """Load each ``--lora`` into the pipeline's transformer as its own adapter, active together with its
    ``--lora-scale`` (default 1 each)."""
    names = [LORA_ADAPTER if index == 0 else f"{LORA_ADAPTER}_{index}" for index in range(len(paths))]
    for name, path in zip(names, paths):
        source, kwargs = lora_source(path)
        try:
            pipe.load_lora_weights(source, adapter_name=name, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"`--lora`: could not apply {path!r} to this model: {one_line(error)}") from error
    pipe.set_adapters(names, list(scales) if scales else [1.0] * len(paths))


def finish_pipeline(pipe, args: argparse.Namespace, device: str, dtype, description: str):
    """What the options add to a loaded pipeline: scheduler, LoRA, dtype, device, memory options, progress bar,
    parallel inference (one process per GPU: this process's device, progress bars on rank 0 only)."""
    import diffusers
    import torch

    from ..parallel import enable_parallel_inference, init_parallel

    if wants_parallel(args):
        device = init_parallel(torch.device(device).type, args.collective_timeout)

    _check_transformer_fits(pipe, "--transformer" if args.transformer else "--model")
    if args.scheduler is not None:
        pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    if pipe.transformer.dtype != dtype:
        pipe.to(dtype=dtype)
    if args.lora:
        apply_loras(pipe, args.lora, args.lora_scale)
    options = optimizations_from_args(args)
    apply_optimizations(pipe, **options, device=torch.device(device))  # quantized on the CPU: less device memory
    if options["offload"] == "none":  # offloading moves each model to the device when it runs
        pipe.to(device)
    pipe.set_progress_bar_config(desc=description)
    if wants_parallel(args):
        enable_parallel_inference(pipe, args.ulysses_degree, args.cfg_parallel)
    return pipe


def load_pipeline(args: argparse.Namespace, description: str = "denoising"):
    """The pipeline of ``--model`` (with ``--transformer``, ``--scheduler``, ``--lora``) on ``--device``."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    pipe = from_pretrained(check_model_source(args.model), args, dtype, f"`--model`: could not load {args.model!r}")
    return finish_pipeline(pipe, args, device, dtype, description)


def from_pretrained(source: str, args: argparse.Namespace, dtype, failure: str):
    """``Mask2DiTPipeline.from_pretrained(source)`` with ``--transformer`` (if given) in place of the folder's own,
    which is then never loaded; a folder that does not load is a ValueError starting with ``failure``."""
    from ..pipeline import Mask2DiTPipeline

    components = {"transformer": load_transformer(args.transformer, dtype)} if args.transformer else {}
    try:
        return Mask2DiTPipeline.from_pretrained(source, dtype=dtype, **components)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{failure}: {one_line(error)}") from error
