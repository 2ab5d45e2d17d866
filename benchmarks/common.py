"""Shared helpers for the benchmark scripts: arguments, timing, peak memory, machine info, tables, JSON.

Memory is measured the same way for every method of one run:

- CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated when the measurement started.
- CPU: :class:`LiveBytes`, a ``TorchDispatchMode`` that sees every tensor an ATen op returns, counts the
  bytes of each new storage while it is alive (a weakref finalizer subtracts them when it is freed) and
  keeps the high-water mark. Tensors that exist before the measurement starts (the inputs, the model's
  weights) are not counted, so the figure is the *extra* memory the measured call needs. Scratch space
  a fused kernel allocates inside C++ without returning it is invisible; it is small (per-thread tiles)
  and the same kernel is shared by the methods compared.

Timing runs methods round-robin (one repeat of each, then the next repeat), so that a neighbour's load
on a shared machine drifts over all of them alike, and reports the median: of the wall time on CUDA, of
the process CPU time on CPU (see :func:`time_round_robin`); both are kept in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

MiB = float(1 << 20)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test, seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per method")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/<name>_<device>[_quick].json)")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    return parser


def setup(args: argparse.Namespace) -> Dict[str, Any]:
    """Resolve device/dtype/threads from the parsed arguments; returns them as a dict."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available.")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # dtype-cast notices from diffusers (and prompt-truncation notices: benchmark prompts are filler)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except Exception:
        pass
    logging.getLogger("diffusers_mask2dit").setLevel(logging.ERROR)
    if args.dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        if args.dtype not in DTYPES:
            raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
        dtype = DTYPES[args.dtype]
    return {"device": device, "dtype": dtype}


def setup_estimate(args: argparse.Namespace) -> torch.dtype:
    """``--estimate-memory``: what :func:`setup` does, for fake tensors on the CPU standing in for CUDA ones;
    returns the dtype, bf16 unless ``--dtype`` says otherwise (CUDA's default here)."""
    if args.device != "cpu":
        raise SystemExit("--estimate-memory runs on fake tensors; leave --device out.")
    dtype = setup(args)["dtype"]
    return dtype if args.dtype else torch.bfloat16


# --------------------------------------------------------------------------------------------------
# Machine information
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> Dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "accelerate", "flash_attn"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:
            pass
    return versions


def machine_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": _versions(),
    }
    try:
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
    reset: Optional[Callable[[], None]] = None,
    on_round: Optional[Callable[[Dict[str, Dict[str, Any]]], None]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Median time (seconds) of each callable, run round-robin.

    ``median_s`` is the figure the ratios use: on CUDA the wall time (synchronised); on CPU the process's
    CPU time (``time.process_time``), which other jobs on a shared machine do not inflate the way they
    inflate wall time (the work is compute-bound, nothing waits on I/O). Both are recorded.
    ``reset`` (optional) runs before each call, untimed. ``on_round`` (optional) receives the figures so far
    after every round (one timed call of each callable), e.g. to save them before a time limit can cut a run.
    """
    for name, fn in fns.items():
        for _ in range(warmup):
            if reset:
                reset()
            fn()
            synchronize(device)
    wall: Dict[str, List[float]] = {name: [] for name in fns}
    cpu: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if reset:
                reset()
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        if on_round:
            on_round(_timing_summary(wall, cpu, device))
    return _timing_summary(wall, cpu, device)


def _timing_summary(wall: Dict[str, List[float]], cpu: Dict[str, List[float]], device: torch.device) -> Dict[str, Dict[str, Any]]:
    """Median, min and max per callable of the recorded times (see :func:`time_round_robin`)."""
    basis = "wall" if device.type == "cuda" else "cpu"
    out: Dict[str, Dict[str, Any]] = {}
    for name in wall:
        chosen = wall[name] if basis == "wall" else cpu[name]
        if not chosen:
            continue
        out[name] = {
            "median_s": statistics.median(chosen),
            "min_s": min(chosen),
            "max_s": max(chosen),
            "basis": "wall time" if basis == "wall" else "process CPU time",
            "wall_median_s": statistics.median(wall[name]),
            "cpu_median_s": statistics.median(cpu[name]),
            "repeats": len(chosen),
        }
    return out


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of CPU tensor storages created while active; ``peak`` is the high-water mark.

    A storage is counted once, when an op first returns it, and subtracted when it is freed. Outputs
    that share storage with one of the op's inputs (views, in-place ops) are not new allocations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: Dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._sizes.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for item in tree_flatten((args, kwargs))[0]:
            if isinstance(item, torch.Tensor):
                try:
                    inputs.add(item.untyped_storage()._cdata)
                except (RuntimeError, NotImplementedError):
                    pass
        for item in tree_flatten(out)[0]:
            if not isinstance(item, torch.Tensor) or item.device.type != "cpu":
                continue
            try:
                storage = item.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            # keyed by the storage object itself (its C++ address), which fake tensors have too
            key, nbytes = storage._cdata, storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._sizes:
                continue
            self._sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


@contextlib.contextmanager
def peak_extra_memory(device: torch.device):
    """Context manager yielding a dict whose ``"peak_bytes"`` is set on exit: peak bytes allocated
    inside the block beyond what was allocated when it was entered."""
    result: Dict[str, int] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            yield result
        finally:
            synchronize(device)
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
    else:
        mode = LiveBytes()
        with mode:
            try:
                yield result
            finally:
                result["peak_bytes"] = int(mode.peak)


def measure_memory(fn: Callable[[], Any], device: torch.device, reset: Optional[Callable[[], None]] = None) -> int:
    """Peak extra bytes of one call of ``fn`` (its results are dropped before returning)."""
    if reset:
        reset()
    with peak_extra_memory(device) as result:
        out = fn()
        del out
    return result["peak_bytes"]


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def time_basis(device: torch.device) -> str:
    """What the reported medians measure on ``device`` (see :func:`time_round_robin`)."""
    return "wall time" if device.type == "cuda" else "CPU time"


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def fmt_bytes(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "-"
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    return f"{nbytes / MiB:.1f} MiB"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}x"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    lines = [title, "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def default_output(name: str, args: argparse.Namespace, device_label: Optional[str] = None) -> Path:
    suffix = "_quick" if args.quick else ""
    return RESULTS_DIR / f"{name}_{device_label or torch.device(args.device).type}{suffix}.json"


_RUN_PATHS: Dict[Path, Path] = {}  # default result path -> the file this run writes instead (saved again per figure)


def _unrecorded_path(default: Path) -> Path:
    """``default``, or when a result is already there (not written by this run), a new file beside it named with
    the time: a run without ``--output`` never replaces a recorded result."""
    if default not in _RUN_PATHS:
        chosen = default
        if default.exists():
            chosen = default.with_name(f"{default.stem}_{time.strftime('%Y%m%d-%H%M%S')}.json")
            print(f"{default} exists and is kept (pass --output {default} to replace it)", flush=True)
        _RUN_PATHS[default] = chosen
    return _RUN_PATHS[default]


def save_json(payload: Dict[str, Any], name: str, args: argparse.Namespace,
              device_label: Optional[str] = None, quiet: bool = False) -> Optional[Path]:
    """Write ``payload`` (plus the command line) to ``--output`` or ``results/<name>_<device_label>.json``,
    atomically (a temporary file renamed over it): a process killed while writing leaves the last whole copy.

    Without ``--output`` an existing result (the recorded ones are tracked files) is never replaced: the new one goes
    beside it, named with the time; pass ``--output`` with the recorded file's path to replace it on purpose.
    """
    if args.no_save:
        return None
    path = Path(args.output) if args.output else _unrecorded_path(default_output(name, args, device_label))
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    if isinstance(payload.get("machine"), dict):
        try:
            payload["machine"] = dict(payload["machine"], load_average_1min_at_end=round(os.getloadavg()[0], 2))
        except OSError:
            pass
    payload["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else ""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(temporary, path)
    if not quiet:
        print(f"results written to {path}", flush=True)
    return path


class ProgressSaver:
    """A benchmark's JSON, saved as it grows: a run stopped part-way (a time limit on a lent GPU, a crash) keeps
    every figure measured so far. ``save(**fields)`` merges ``fields`` into the payload and writes it with
    ``"complete": False``; ``finish(**fields)`` writes it with ``"complete": True``."""

    def __init__(self, payload: Dict[str, Any], name: str, args: argparse.Namespace,
                 device_label: Optional[str] = None) -> None:
        self.payload = dict(payload, complete=False)
        self.name, self.args, self.device_label = name, args, device_label

    def save(self, **fields: Any) -> None:
        self.payload.update(fields)
        save_json(self.payload, self.name, self.args, self.device_label, quiet=True)

    def finish(self, **fields: Any) -> Dict[str, Any]:
        self.payload.update(fields, complete=True)
        save_json(self.payload, self.name, self.args, self.device_label)
        return self.payload


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Random models for the pipeline and training benchmarks
# --------------------------------------------------------------------------------------------------

# Transformer sizes. The text projection takes the tiny T5's 32-dim embeddings and the patch embedding the
# tiny VAE's 4 latent channels (the real models: 4096 and 16): both are far below 0.1% of the FLOPs.
MODEL_SIZES: Dict[str, Dict[str, Any]] = {
    "quick": dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, time_embed_dim=32),
    # CPU: wide enough that attention and the linear layers dominate a step.
    "cpu-mid": dict(num_attention_heads=8, attention_head_dim=64, num_layers=2, time_embed_dim=128),
    "cogvideox-2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, time_embed_dim=512,
                         use_rotary_positional_embeddings=False),
    "cogvideox-5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, time_embed_dim=512,
                         use_rotary_positional_embeddings=True),
}

# Video size per scene for each model size: (height, width, pixel frames per scene).
VIDEO_SIZES: Dict[str, Any] = {
    "quick": (64, 64, 9),
    "cpu-mid": (256, 256, 17),
    "cogvideox-2b": (480, 720, 49),
    "cogvideox-5b": (480, 720, 49),
}


# Where no VAE or text encoder runs (training, a transformer step), the 2b/5b-sized models take the real
# models' latent channels and T5 width (the pipeline benchmark keeps the tiny ones its tiny VAE and T5 produce).
REAL_MODEL_IO = {"in_channels": 16, "out_channels": 16, "text_embed_dim": 4096}


def model_overrides(size: str) -> Dict[str, Any]:
    """Config overrides for a transformer run without VAE and text encoder: the real I/O widths at 2b/5b size."""
    return dict(REAL_MODEL_IO) if size.startswith("cogvideox-") else {}


def transformer_config(size: str, **overrides: Any) -> Dict[str, Any]:
    from diffusers_mask2dit.tiny import MAX_SEQUENCE_LENGTH, TINY_LATENT_CHANNELS, TINY_TEXT_DIM

    height, width, frames = VIDEO_SIZES[size]
    config = dict(
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        text_embed_dim=TINY_TEXT_DIM,
        sample_height=height // 8,
        sample_width=width // 8,
        sample_frames=frames,
        patch_size=2,
        max_text_seq_length=MAX_SEQUENCE_LENGTH,
        use_rotary_positional_embeddings=True,
    )
    config.update(MODEL_SIZES[size])
    config.update(overrides)
    return config


def build_random_transformer(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides: Any):
    """A `CogVideoXTransformer3DModel` of ``size`` (config ``overrides`` applied) with random weights,
    created directly on ``device`` (``"meta"``: shapes only)."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = CogVideoXTransformer3DModel(**transformer_config(size, **overrides))
    return model.to(dtype=dtype).eval()


def materialize_fake(module: torch.nn.Module) -> None:
    """Replace ``module``'s parameters and buffers (e.g. on the meta device) by CPU tensors of the same shapes
    and dtypes; called inside a ``FakeTensorMode`` they are fake tensors (no memory, no data)."""
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None:
                submodule._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad
                )
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def transformer_step_flops(config: Dict[str, Any], text_tokens: int, video_tokens: int, pair_fraction: float = 1.0) -> float:
    """Rough forward FLOPs of one transformer call on one sample: projections, feed-forward and attention
    (2 FLOPs per multiply-add). Used only to say what ratio the sequence lengths alone imply."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    length = text_tokens + video_tokens
    linear = 2 * length * (4 * width * width + 2 * width * 4 * width)  # q, k, v, out + feed-forward 4x
    attention = 4 * pair_fraction * length * length * width  # scores and weighted sum
    return float(config["num_layers"] * (linear + attention))
