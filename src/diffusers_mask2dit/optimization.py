"""Memory and speed recipes for a `Mask2DiTPipeline`: compile, quantization, offload and step caches.

Everything here is diffusers', torchao's or PyTorch's own machinery, chosen and configured for Mask²DiT:

- ``compile``: ``"off"``, ``"blocks"`` (regional: `compile_repeated_blocks`, every `CogVideoXBlock` compiled
  once and reused) or ``"full"`` (the whole transformer, ``fullgraph=True``). The forward has no graph break for
  shared or per-scene timesteps, so ``extend`` and ``generate_long`` run one graph per sequence shape.
- ``quantize``: ``"none"``; ``"int8"`` / ``"fp8"`` (torchao int8 / float8 weight-only on the transformer's
  linear layers); ``"fp8-layerwise"`` (weights stored in float8_e4m3fn, computed in the pipeline's dtype:
  diffusers' layerwise casting); ``"nf4"`` / ``"int8-bnb"`` (bitsandbytes, CUDA only, applied while loading:
  see `pipeline_quantization_config`). Norms, including the scene-aware ones this package swaps in, embeddings
  and the output projection keep their dtype (`SKIP_MODULE_PATTERNS`).
- ``offload``: ``"none"``, ``"model"`` / ``"sequential"`` (accelerate CPU offload) or ``"group"`` (diffusers'
  group offloading, one block at a time, CUDA streams when on CUDA). All need an accelerator, as in diffusers.
- ``cache``: ``"none"``, ``"first-block[:threshold]"`` (FirstBlockCache, default threshold 0.2),
  ``"pab"`` (Pyramid Attention Broadcast), ``"faster"`` (FasterCache) or ``"taylorseer"``.

`apply_optimizations` applies them in the order that composes (quantize, VAE, cache, offload, compile);
`add_optimization_arguments` / `optimizations_from_args` give command-line tools the same switches.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Callable, Dict, Optional, Tuple

import torch

COMPILE_MODES = ("off", "blocks", "full")
QUANTIZE_MODES = ("none", "int8", "fp8", "fp8-layerwise", "nf4", "int8-bnb")
OFFLOAD_MODES = ("none", "model", "sequential", "group")
CACHE_MODES = ("none", "first-block", "pab", "faster", "taylorseer")
DEFAULT_FIRST_BLOCK_THRESHOLD = 0.2
TAYLORSEER_ATTENTION_PATTERN = r"transformer_blocks\.\d+\.attn1"  # re.fullmatch on module names

# Modules kept in their dtype by the quantization and casting recipes, by name (any module whose dotted name has
# one of these as a part): every norm (the scene-aware `SceneLayerNormZero` norm1/norm2 and `SceneAdaLayerNorm`
# norm_out this package swaps in, with their modulation linears; the QK norms), the patch and time embeddings and
# the output projection: small, and where precision matters most.
SKIP_MODULE_PATTERNS = (
    "patch_embed", "time_embedding", "ofs_embedding", "norm1", "norm2", "norm_q", "norm_k", "norm_final", "norm_out",
    "proj_out",
)

_BNB_MODES = ("nf4", "int8-bnb")
_TORCHAO_MODES = ("int8", "fp8")


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _check_choice(value: Any, choices: Tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def _parse_cache(cache: str, name: str = "`cache`") -> Tuple[str, Optional[float]]:
    """``"first-block:0.1"`` -> ``("first-block", 0.1)``; other modes take no parameter."""
    accepted = f"{name} must be one of {', '.join(CACHE_MODES)} (first-block:THRESHOLD sets its threshold)"
    if not isinstance(cache, str):
        raise ValueError(f"{accepted}; got {cache!r}.")
    mode, _, parameter = cache.partition(":")
    if mode not in CACHE_MODES or (parameter and mode != "first-block"):
        raise ValueError(f"{accepted}; got {cache!r}.")
    if not parameter:
        return mode, DEFAULT_FIRST_BLOCK_THRESHOLD if mode == "first-block" else None
    try:
        threshold = float(parameter)
    except ValueError:
        threshold = -1.0
    if not threshold > 0:
        raise ValueError(f"{name} {cache!r}: the first-block threshold must be a positive number, e.g. first-block:0.2.")
    return mode, threshold


def check_optimizations(
    compile: str = "off", quantize: str = "none", offload: str = "none", cache: str = "none", cli: bool = False
) -> None:
    """Raise a `ValueError` naming the parameter (``--option`` when ``cli``) for a value no recipe has or this
    machine cannot run."""
    names = {key: f"--{key}" if cli else f"`{key}`" for key in ("compile", "quantize", "offload", "cache")}
    _check_choice(compile, COMPILE_MODES, names["compile"])
    _check_choice(quantize, QUANTIZE_MODES, names["quantize"])
    _check_choice(offload, OFFLOAD_MODES, names["offload"])
    _parse_cache(cache, names["cache"])
    if quantize in _BNB_MODES and not torch.cuda.is_available():
        raise ValueError(
            f"{names['quantize']} {quantize} needs bitsandbytes on a CUDA GPU and this machine has none; "
            "int8, fp8 and fp8-layerwise run without one."
        )
    if quantize in _TORCHAO_MODES and importlib.util.find_spec("torchao") is None:
        raise ValueError(
            f"{names['quantize']} {quantize} needs torchao: pip install 'diffusers-mask2dit[quantization]' "
            "(fp8-layerwise runs without it)."
        )
    if offload != "none" and not _accelerator_available():
        hint = "--offload none" if cli else "offload='none'"
        raise ValueError(
            f"{names['offload']} {offload} moves weights between the CPU and an accelerator and this machine has "
            f"none (diffusers refuses too); use {hint}."
        )


# --------------------------------------------------------------------------------------------------
# Quantization and casting
# --------------------------------------------------------------------------------------------------


def _skipped(name: str) -> bool:
    """The rule of diffusers' ``modules_to_not_convert``: a pattern followed by a dot, or the whole name."""
    return any(f"{pattern}." in f"{name}." for pattern in SKIP_MODULE_PATTERNS)


def _torchao_config(quantize: str):
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError:
        raise ValueError(f"`quantize={quantize!r}` needs torchao: pip install torchao.") from None
    return Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig()


def quantize_transformer(transformer: torch.nn.Module, quantize: str, compute_dtype: Optional[torch.dtype] = None) -> None:
    """Quantize or cast ``transformer`` in place with one of the post-load recipes (int8, fp8, fp8-layerwise)."""
    _check_choice(quantize, QUANTIZE_MODES, "quantize")
    if quantize == "none":
        return
    if quantize in _BNB_MODES:
        raise ValueError(
            f"`quantize={quantize!r}` (bitsandbytes) is applied while loading: pass "
            f"`quantization_config=pipeline_quantization_config({quantize!r})` to `Mask2DiTPipeline.from_pretrained`."
        )
    if quantize == "fp8-layerwise":
        compute_dtype = compute_dtype or transformer.dtype
        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
            skip_modules_pattern=tuple(rf"(^|\.){pattern}(\.|$)" for pattern in SKIP_MODULE_PATTERNS),
        )
        return
    from torchao.quantization import quantize_

    def is_quantized(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not _skipped(name)

    quantize_(transformer, _torchao_config(quantize), filter_fn=is_quantized)


def pipeline_quantization_config(quantize: str, compute_dtype: torch.dtype = torch.bfloat16):
    """A diffusers `PipelineQuantizationConfig` that quantizes the transformer while it loads (int8, fp8 with
    torchao; nf4, int8-bnb with bitsandbytes on CUDA), the same modules skipped as by `quantize_transformer`."""
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig, TorchAoConfig

    check_optimizations(quantize=quantize)
    if quantize in ("none", "fp8-layerwise"):
        raise ValueError(f"`quantize={quantize!r}` is not a load-time quantization; use `apply_optimizations`.")
    skip = list(SKIP_MODULE_PATTERNS)
    if quantize in _BNB_MODES:
        four_bit = quantize == "nf4"
        config = BitsAndBytesConfig(
            load_in_4bit=four_bit, load_in_8bit=not four_bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
        )
    else:
        config = TorchAoConfig(_torchao_config(quantize), modules_to_not_convert=skip)
    return PipelineQuantizationConfig(quant_mapping={"transformer": config})


# --------------------------------------------------------------------------------------------------
# Caches, offload, compile
# --------------------------------------------------------------------------------------------------


def cache_config(pipe, cache: str):
    """The diffusers cache config for ``cache`` (see the module docstring), or None for ``"none"``."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    mode, threshold = _parse_cache(cache)
    current_timestep = lambda: pipe.current_timestep  # noqa: E731  (read at every step by the hooks)
    builders: Dict[str, Callable[[], Any]] = {
        "none": lambda: None,
        "first-block": lambda: FirstBlockCacheConfig(threshold=threshold),
        "pab": lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=current_timestep,
        ),
        "faster": lambda: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=current_timestep, attention_weight_callback=lambda _: 0.3,
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
            tensor_format="BFCHW",
        ),
        # diffusers' default patterns full-match names ending in "attn", so CogVideoX's `attn1` was never hooked
        # (nothing cached, nothing saved): name the blocks' attention modules instead.
        "taylorseer": lambda: TaylorSeerCacheConfig(cache_identifiers=[TAYLORSEER_ATTENTION_PATTERN]),
    }
    return builders[mode]()


def _offload(pipe, offload: str, device: Optional[torch.device]) -> None:
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload == "group":
        onload = torch.device(device) if device is not None else torch.device(torch.accelerator.current_accelerator())
        streams = onload.type == "cuda"
        pipe.transformer.enable_group_offload(
            onload_device=onload, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=streams,
        )
        for name in ("text_encoder", "vae"):
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(
                getattr(pipe, name), onload_device=onload, offload_device=torch.device("cpu"),
                offload_type="leaf_level", use_stream=streams,
            )


def _compile(transformer: torch.nn.Module, mode: str, **compile_kwargs) -> None:
    if mode == "blocks":
        transformer.compile_repeated_blocks(fullgraph=True, **compile_kwargs)
    elif mode == "full":
        transformer.compile(fullgraph=True, **compile_kwargs)  # in place: `pipe.transformer` keeps its class


def apply_optimizations(
    pipe,
    compile: str = "off",
    quantize: str = "none",
    offload: str = "none",
    cache: str = "none",
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    device: Optional[torch.device] = None,
    compile_kwargs: Optional[Dict[str, Any]] = None,
):
    """Apply the chosen recipes to ``pipe`` (a `Mask2DiTPipeline`, loaded, not yet offloaded) in place.

    Args:
        compile, quantize, offload, cache: see the module docstring; every value is checked first and a bad or
            impossible one (bitsandbytes or offload without an accelerator) raises a `ValueError` naming it.
        vae_tiling, vae_slicing: diffusers' VAE tiling / slicing (less memory while decoding).
        device: the accelerator offloading moves weights to (default: the current one).
        compile_kwargs: more `torch.compile` arguments (``backend``, ``mode``, ``dynamic``).

    Returns:
        ``pipe``. Without offloading, move it to its device yourself (before or after).
    """
    check_optimizations(compile, quantize, offload, cache)
    quantize_transformer(pipe.transformer, quantize)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    config = cache_config(pipe, cache)
    if config is not None:
        pipe.transformer.enable_cache(config)
    _offload(pipe, offload, device)
    _compile(pipe.transformer, compile, **(compile_kwargs or {}))
    return pipe


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_optimization_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--compile --quantize --offload --cache --vae-tiling --vae-slicing`` to a command's parser."""
    group = parser.add_argument_group("memory and speed (docs/performance.md)")
    group.add_argument("--compile", default="off", choices=COMPILE_MODES, help="torch.compile the transformer: blocks (regional) or full")
    group.add_argument("--quantize", default="none", choices=QUANTIZE_MODES, help="transformer weights: int8/fp8 (torchao), fp8-layerwise, nf4/int8-bnb (CUDA)")
    group.add_argument("--offload", default="none", choices=OFFLOAD_MODES, help="CPU offload: model, sequential or group (needs a GPU)")
    group.add_argument("--cache", default="none", metavar="{" + ",".join(CACHE_MODES) + "}", help="step cache; first-block:THRESHOLD sets its threshold (default 0.2)")
    group.add_argument("--vae-tiling", action="store_true", help="decode the video tile by tile")
    group.add_argument("--vae-slicing", action="store_true", help="decode one video of a batch at a time")
    return parser


def optimizations_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of `apply_optimizations` from parsed arguments, checked (`ValueError` naming the
    option for a bad value or one this machine cannot run)."""
    check_optimizations(args.compile, args.quantize, args.offload, args.cache, cli=True)
    return dict(
        compile=args.compile, quantize=args.quantize, offload=args.offload, cache=args.cache,
        vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing,
    )
