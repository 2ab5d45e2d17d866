"""Memory per GPU of full fine-tuning under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on 1-8 GPUs (an estimate).

No GPU needed. Two figures are measured on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and
dtypes only) with the trainer's own step, as ``bench_training.py --estimate-memory`` does:

- the whole single-GPU step of full fine-tuning (fp32 weights, gradients and AdamW state, bf16 autocast):
  the 1-GPU row, and the base of DDP (which adds its gradient buckets, a second fp32 copy of the gradients);
- the activations of the same forward and backward (a rank-1 LoRA step: frozen bf16 weights, so its peak
  is the activations plus a negligible adapter), which every engine keeps whole on each GPU.

What each engine keeps of the weights, gradients and AdamW state is then counted per GPU from the model's
parameter count (``P``; ``B`` the largest CogVideoX block, ``R`` the parameters outside the blocks; N GPUs):

- DDP: the 1-GPU step + 4P (reducer buckets);
- ZeRO-2: bf16 weights 2P + (fp32 master 4P + fp32 gradients 4P + AdamW 8P) / N + reduce buckets
  (2 x 5e8 elements in bf16, DeepSpeed's default with overlap; at most 2P) + activations;
- ZeRO-3: bf16 weights 2P / N + the same 16P / N + gathered weights (at most 1e9 parameters in bf16,
  ``stage3_max_live_parameters``) + reduce buckets + activations;
- FSDP2 (accelerate's bf16 policy: bf16 all-gather and reduce-scatter, fp32 shards): (4P + 4P + 8P) / N +
  the root's weights unsharded in bf16 (2R) + two blocks gathered in bf16 (2 x 2B, current and prefetched) +
  one block's unsharded bf16 gradients (2B) + activations.

A configuration "fits" an 80 GB GPU when its tensors plus 10% (the caching allocator's overhead) plus
0.5 GB (the CUDA context) stay within 80 GB, i.e. below 72.3 GB of tensors. The engine terms are arithmetic from the engines' documented layouts and defaults, not a run of them:
the table is an estimate to choose an engine, checked against a GPU when one is at hand.

    python benchmarks/bench_training_engines.py                     # cogvideox-5b, 3 x 49 frames at 480x720
    python benchmarks/bench_training_engines.py --model cogvideox-2b --gpus 1,2,4,8
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from bench_training import GPU_MEMORY_GOAL_GB, prepare_model, step_peak_memory  # noqa: E402

ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
DEEPSPEED_BUCKET_ELEMENTS = 5e8  # reduce_bucket_size / allgather_bucket_size defaults
DEEPSPEED_MAX_LIVE_PARAMETERS = 1e9  # stage3_max_live_parameters default
BF16, FP32 = 2, 4
# What no tensor count sees: the CUDA context, and the caching allocator's rounding and fragmentation
# (reserved memory typically runs 5-20% above allocated; the middle of that range is taken).
CUDA_CONTEXT_GB, ALLOCATOR_OVERHEAD = 0.5, 0.10


def fit_limit_bytes() -> float:
    """The most tensor bytes that :func:`fits` an 80 GB GPU (72.3 GB)."""
    return (GPU_MEMORY_GOAL_GB - CUDA_CONTEXT_GB) * 1e9 / (1 + ALLOCATOR_OVERHEAD)


def fits(nbytes: int) -> bool:
    """Whether ``nbytes`` of tensors fit an 80 GB GPU with the CUDA context and the allocator's overhead."""
    return nbytes <= fit_limit_bytes()


def parameter_layout(size: str, dtype: torch.dtype) -> Dict[str, int]:
    """``P`` (all parameters), ``B`` (the largest block) and ``R`` (outside the blocks), counted on the meta device."""
    model = prepare_model(size, torch.device("meta"), dtype, "full", lora_rank=1, checkpointing=True)
    total = common.parameter_count(model)
    blocks = [common.parameter_count(block) for block in model.transformer_blocks]
    return {"P": total, "B": max(blocks), "R": total - sum(blocks)}


def engine_bytes(engine: str, gpus: int, layout: Dict[str, int], single_step: int, activations: int) -> int:
    """Estimated peak bytes per GPU of one full fine-tuning step under ``engine`` on ``gpus`` GPUs."""
    P, B, R = layout["P"], layout["B"], layout["R"]
    sharded_states = (FP32 * P + FP32 * P + 2 * FP32 * P) / gpus  # fp32 master weights, gradients, AdamW m and v
    buckets = 2 * min(P, DEEPSPEED_BUCKET_ELEMENTS) * BF16
    if engine == "ddp":
        return int(single_step + (FP32 * P if gpus > 1 else 0))
    if engine == "zero2":
        return int(BF16 * P + sharded_states + buckets + activations)
    if engine == "zero3":
        live = min(P, DEEPSPEED_MAX_LIVE_PARAMETERS) * BF16
        return int(BF16 * P / gpus + sharded_states + live + buckets + activations)
    if engine == "fsdp2":
        return int(sharded_states + BF16 * R + 2 * BF16 * B + BF16 * B + activations)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def estimate_table(size: str, gpus: List[int], scenes: int, dtype: torch.dtype) -> Dict[str, Any]:
    """The measured figures, the parameter layout and ``{engine: {gpus: bytes}}``."""
    single = step_peak_memory(size, "full", "v2", dtype=dtype, scenes=scenes, checkpointing=True)
    lora = step_peak_memory(size, "lora", "v2", dtype=dtype, scenes=scenes, lora_rank=1, checkpointing=True)
    layout = parameter_layout(size, dtype)
    activations = lora["peak_extra_bytes"]
    per_gpu = {engine: {n: engine_bytes(engine, n, layout, single["peak_total_bytes"], activations) for n in gpus}
               for engine in ENGINES}
    return {"single_gpu_step": single, "activations_bytes": activations, "layout": layout, "per_gpu_bytes": per_gpu}


def markdown_table(per_gpu: Dict[str, Dict[int, int]], gpus: List[int]) -> str:
    """The table of docs/training.md: GB (1e9 bytes) per GPU, ✓ where it fits an 80 GB GPU (see :func:`fits`)."""
    lines = ["| engine | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpus) + " |",
             "|---|" + "---:|" * len(gpus)]
    for engine, row in per_gpu.items():
        cells = [f"{row[n] / 1e9:.1f}{' ✓' if fits(row[n]) else ''}" for n in gpus]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> Dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=sorted(common.MODEL_SIZES),
                        help="random model size (default: cogvideox-5b; quick with --quick)")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--gpus", default="1,2,4,8", help="comma list of GPU counts")
    args = parser.parse_args(argv)
    dtype = common.setup_estimate(args)
    size = args.model or ("quick" if args.quick else "cogvideox-5b")
    try:
        gpus = [int(n) for n in args.gpus.split(",") if n.strip()]
        assert gpus and min(gpus) >= 1
    except (ValueError, AssertionError):
        raise SystemExit(f"--gpus takes a comma list of positive GPU counts, got {args.gpus!r}") from None
    height, width, frames = common.VIDEO_SIZES[size]
    info = common.machine_info(torch.device("cpu"))
    print(f"engine memory estimate: {size} full fine-tuning, {args.scenes} scenes x {frames} frames at {height}x{width}, "
          f"{str(dtype)[6:]}, gradient checkpointing, 1 sample per GPU, {info['date']}", flush=True)
    table = estimate_table(size, gpus, args.scenes, dtype)
    layout = table["layout"]
    print(f"   parameters P={layout['P']:,} (largest block {layout['B']:,}, outside the blocks {layout['R']:,}); "
          f"measured on fake tensors: 1-GPU step {common.fmt_bytes(table['single_gpu_step']['peak_total_bytes'])}, "
          f"activations {common.fmt_bytes(table['activations_bytes'])}", flush=True)
    rows = [[engine] + [f"{row[n] / 1e9:.1f} GB" for n in gpus] for engine, row in table["per_gpu_bytes"].items()]
    common.print_table(f"-- estimated peak memory per GPU (fits {GPU_MEMORY_GOAL_GB:.0f} GB: up to {fit_limit_bytes() / 1e9:.1f} GB)", ["engine"] + [str(n) for n in gpus], rows)
    print(markdown_table(table["per_gpu_bytes"], gpus), flush=True)
    payload = {
        "benchmark": "training_engine_memory_estimate",
        "method": "fake-tensor step (1 GPU, activations) + per-engine state layout arithmetic; an estimate",
        "machine": info,
        "dtype": str(dtype)[6:],
        "model": {"size": size},
        "video": {"height": height, "width": width, "scenes": args.scenes, "pixel_frames_per_scene": frames},
        "gpus": gpus,
        **table,
        "fit_rule": {"cuda_context_GB": CUDA_CONTEXT_GB, "allocator_overhead": ALLOCATOR_OVERHEAD},
        "fits_80GB": {e: {n: fits(b) for n, b in row.items()} for e, row in table["per_gpu_bytes"].items()},
    }
    common.save_json(payload, f"training_engines_{size}", args, device_label="estimate")
    return payload


if __name__ == "__main__":
    main()
