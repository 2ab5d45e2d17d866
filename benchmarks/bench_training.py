"""Training cost: step time and peak memory of Mask²DiT (mask v2) vs the same model with full attention.

One sample of n=3 scenes per step, v-prediction loss (the package's `training.loss`),
AdamW, for LoRA (peft, rank 64 on to_q/to_k/to_v/to_out.0) and for full fine-tuning. The only
difference between the two columns of a mode is the attention mask: "v2" (ours) vs "full" (no mask).

Memory: ``peak`` is the high-water of everything a fresh training step allocates on top of the weights
(activations, gradients, AdamW state, which is created in that first step); ``total`` adds the weights.

    python benchmarks/bench_training.py                 # CPU, mid-size random model
    python benchmarks/bench_training.py --quick         # tiny, seconds
    python benchmarks/bench_training.py --device cuda --dtype bfloat16 --model cogvideox-5b   # 480x720, 49 frames/scene
    python benchmarks/bench_training.py --device cuda --dtype bfloat16 --model cogvideox-2b

Without a GPU, ``--estimate-memory`` gives the peak memory a CUDA run would allocate, without computing
anything: the step runs on fake tensors (``torch._subclasses.FakeTensorMode``, shapes and dtypes only)
and :class:`common.LiveBytes` adds up the tensors it creates, exactly as it does for a real CPU run.

    python benchmarks/bench_training.py --estimate-memory                        # 5b size, bf16, checkpointing
    python benchmarks/bench_training.py --estimate-memory --model cogvideox-2b

On CUDA gradient checkpointing is on by default (``--no-gradient-checkpointing`` turns it off); on CPU it
is off unless ``--gradient-checkpointing`` is given. Precision is the trainer's (its ``setup_finetuning``
prepares the model): with bf16, LoRA keeps the frozen weights in bf16 and the adapters in fp32, full
fine-tuning keeps fp32 master weights, gradients and AdamW state, and the forward is autocast to bf16.
A mode that runs out of memory is recorded as "OOM".
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from diffusers_mask2dit import Mask2DiTTransformer3DModel  # noqa: E402
from diffusers_mask2dit.training.loss import prepare_diffusion_batch, training_loss  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GPU_MEMORY_GOAL_GB = 80.0
def prepare_model(size: str, device: torch.device, dtype: torch.dtype, mode: str, lora_rank: int,
                  checkpointing: bool) -> torch.nn.Module:
    """A random Mask²DiT transformer of ``size`` set up for ``mode`` by the trainer's own ``setup_finetuning``:
    "lora" = frozen weights in ``dtype`` + fp32 adapters; "full" = fp32 master weights (the forward is
    autocast to ``dtype``, see :func:`optimizer_step`), as `mask2dit train` runs them."""
    from diffusers_mask2dit.training.config import TrainingConfig
    from diffusers_mask2dit.training.trainer import setup_finetuning

    if mode not in ("lora", "full"):
        raise SystemExit(f"--modes takes lora and/or full, got {mode!r}")
    transformer = common.build_random_transformer(size, device, dtype, **common.model_overrides(size))
    model = Mask2DiTTransformer3DModel.from_cogvideox(transformer)
    config = TrainingConfig(finetune=mode, lora_rank=lora_rank, lora_alpha=float(lora_rank),
                            lora_target_modules=list(LORA_TARGETS), gradient_checkpointing=checkpointing)
    setup_finetuning(model, config, dtype)
    return model.train()


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any,
                   prompt_embeds: torch.Tensor, mask: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One training update as the trainer makes it: the forward autocast to ``dtype`` (accelerate's mixed
    precision; nothing for fp32), v-prediction loss, backward, AdamW step. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    with autocast:
        loss = training_loss(model, batch, prompt_embeds, mask, dtype)
    loss.backward()
    optimizer.step()
    return loss


def step_peak_memory(
    size: str,
    mode: str,
    mask: str,
    *,
    dtype: torch.dtype,
    scenes: int = 3,
    lora_rank: int = 64,
    checkpointing: bool = True,
    fake: bool = True,
    gpu_kernels: bool = True,
    conditional: bool = False,
) -> Dict[str, int]:
    """Weights and peak extra bytes of one fresh training step (the AdamW state is created in it), 1 sample.

    ``fake=True`` runs the step on fake tensors: shapes and dtypes only, no compute, no memory, so a
    5b-sized step is "run" on a laptop. ``gpu_kernels`` routes it as on an sm80+ GPU: attention through the
    varlen FlashAttention backend and AdamW's multi-tensor (foreach) update, CUDA's default; it needs
    ``fake`` (the CPU has neither). ``fake=False, gpu_kernels=False`` measures the same step for real on
    CPU, which is how the tests check the estimate. ``conditional``: the SFT sample whose first scenes are
    clean context at timestep 0; it needs real tensors (the model tests whether the scenes' timesteps differ).
    """
    import dataclasses
    from unittest import mock

    from diffusers import CogVideoXDPMScheduler
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffusers_mask2dit import attention
    from diffusers_mask2dit.tiny import build_tiny_components

    if gpu_kernels and not fake:
        raise ValueError("`gpu_kernels` needs `fake`: this CPU has no FlashAttention kernels to run.")
    if conditional and fake:
        raise ValueError("`conditional` needs `fake=False`: the model reads the per-scene timesteps' values.")
    config = common.transformer_config(size, **common.model_overrides(size))
    height, width, frames = common.VIDEO_SIZES[size]
    latent_frames = (frames - 1) // 4 + 1
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, scenes * latent_frames, config["in_channels"], height // 8, width // 8, generator=generator)
    prompt_embeds = torch.randn(1, scenes * config["max_text_seq_length"], config["text_embed_dim"],
                                generator=generator).to(dtype)
    scheduler = CogVideoXDPMScheduler.from_config(build_tiny_components("5b")["scheduler"].config)
    batch = prepare_diffusion_batch(latents, None, [latent_frames] * scenes, torch.tensor([0]), scheduler,
                                    cond_prob=1.0 if conditional else 0.0)
    if bool((batch.timesteps == batch.timesteps[:, :1]).all()):
        # The model's first step turns equal per-scene timesteps into one per sample; that test reads
        # tensor values, which fake tensors do not have, so it is made here on the real batch.
        batch = dataclasses.replace(batch, timesteps=batch.timesteps[:, 0])

    model = prepare_model(size, torch.device("meta" if fake else "cpu"), dtype, mode, lora_rank, checkpointing)
    with contextlib.ExitStack() as stack:
        if fake:
            fake_mode = stack.enter_context(FakeTensorMode())
            common.materialize_fake(model)
            # inputs exist before the step, as fake tensors too (so that views of them are not counted)
            prompt_embeds = fake_mode.from_tensor(prompt_embeds)
            batch = dataclasses.replace(batch, **{
                field.name: fake_mode.from_tensor(value) for field in dataclasses.fields(batch)
                if isinstance(value := getattr(batch, field.name), torch.Tensor)
            })
        if gpu_kernels:
            stack.enter_context(mock.patch.object(attention, "resolve_backend", lambda backend, query: "flash"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True if gpu_kernels else None)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())

        cpu = torch.device("cpu")
        extra = common.measure_memory(lambda: optimizer_step(model, optimizer, batch, prompt_embeds, mask, dtype, cpu), cpu)
    return {"weights_bytes": weights, "peak_extra_bytes": extra, "peak_total_bytes": weights + extra}


def estimate(args, size: str, dtype: torch.dtype, checkpointing: bool) -> Dict[str, Any]:
    """``--estimate-memory``: the fake-tensor peak memory of each mode and mask, against the 80 GB goal."""
    info = common.machine_info(torch.device("cpu"))
    height, width, frames = common.VIDEO_SIZES[size]
    print(f"training memory estimate (fake tensors, GPU kernels): {size} random model, {args.scenes} scenes x "
          f"{frames} frames at {height}x{width}, {str(dtype)[6:]}, checkpointing {'on' if checkpointing else 'off'}, "
          f"LoRA rank {args.lora_rank}, {info['date']}", flush=True)
    results: Dict[str, Any] = {}
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        results[mode] = {}
        for label, mask in (("v2", "v2"), ("full_attention", "full")):
            figures = step_peak_memory(size, mode, mask, dtype=dtype, scenes=args.scenes, lora_rank=args.lora_rank,
                                       checkpointing=checkpointing)
            results[mode][label] = figures
            rows.append([mode, label, common.fmt_bytes(figures["weights_bytes"]),
                         common.fmt_bytes(figures["peak_extra_bytes"]), common.fmt_bytes(figures["peak_total_bytes"]),
                         f"{figures['peak_total_bytes'] / 1e9:.1f} GB"])
    common.print_table(f"-- estimated peak memory of one training step, 1 sample of {args.scenes} scenes ({size})",
                       ["mode", "attention", "weights", "peak extra", "total", "total (1e9 B)"], rows)
    goals: Dict[str, Any] = {}
    if size == "cogvideox-5b" and "lora" in results:
        goals["5b_lora_fits_80GB_estimated"] = results["lora"]["v2"]["peak_total_bytes"] < GPU_MEMORY_GOAL_GB * 1e9
        print("   goals:  " + ", ".join(f"{k}={'met' if ok else 'MISSED'}" for k, ok in goals.items()), flush=True)
    payload = {
        "benchmark": "training_memory_estimate",
        "method": "FakeTensorMode step with GPU kernel routing; common.LiveBytes high-water of created tensors",
        "machine": info,
        "dtype": str(dtype)[6:],
        "model": {"size": size, "config": common.transformer_config(size, **common.model_overrides(size))},
        "video": {"height": height, "width": width, "scenes": args.scenes, "pixel_frames_per_scene": frames},
        "gradient_checkpointing": checkpointing,
        "lora_rank": args.lora_rank,
        "results": results,
        "goals_met": goals,
    }
    common.save_json(payload, f"training_{size}", args, device_label="estimate")
    return payload


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def compare_with_estimate(results: Dict[str, Any], path: str) -> None:
    """Add ``measured_over_estimate`` (peak total bytes, measured / the ``--estimate-memory`` figure at ``path``) to
    every measured run of ``results`` and print it."""
    import json

    with open(path) as handle:
        estimated = json.load(handle)["results"]
    for mode, entry in results.items():
        for label, run in entry.get("runs", {}).items():
            figures = estimated.get(mode, {}).get(label)
            if run["memory"] == "OOM" or not figures:
                continue
            run["memory"]["estimated_peak_total_bytes"] = figures["peak_total_bytes"]
            run["memory"]["measured_over_estimate"] = common.ratio(run["memory"]["peak_total_bytes"], figures["peak_total_bytes"])
            print(f"   {mode} {label}: measured {common.fmt_bytes(run['memory']['peak_total_bytes'])} vs estimated "
                  f"{common.fmt_bytes(figures['peak_total_bytes'])} ({common.fmt_ratio(run['memory']['measured_over_estimate'])})",
                  flush=True)


def measure_training_mode(entry: Dict[str, Any], mode: str, make_step, saver, args, size: str, device: torch.device,
                          dtype: torch.dtype, checkpointing: bool, warmup: int, repeats: int) -> None:
    """One training mode (``lora`` or ``full``) into ``entry``: peak memory of a step with each mask (a fresh
    optimizer each, so AdamW's state is counted), then round-robin timings; ``saver`` saves after each figure.
    An out-of-memory is recorded as ``"OOM"``, any other error raised."""
    model: Optional[torch.nn.Module] = None
    params: list = []
    runnable: Dict[str, Callable[[], float]] = {}
    state: Dict[str, Any] = {}
    masks = {"v2": "v2", "full_attention": "full"}
    try:
        model = prepare_model(size, device, dtype, mode, args.lora_rank, checkpointing)
        params = [p for p in model.parameters() if p.requires_grad]
        entry.update(trainable_parameters=sum(p.numel() for p in params), parameters=common.parameter_count(model),
                     weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()), runs={})
        memory: Dict[str, Any] = {}
        for label, mask in masks.items():
            state["optimizer"] = torch.optim.AdamW(params, lr=1e-5)
            common.free_memory(device)
            try:
                extra = common.measure_memory(make_step(model, state, mask), device)
                memory[label] = {"peak_extra_bytes": extra, "peak_total_bytes": extra + entry["weights_bytes"]}
                if device.type == "cuda":
                    memory[label]["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated(device))
            except RuntimeError as error:
                if not is_oom(error):
                    raise
                memory[label] = "OOM"
            state["optimizer"] = None
            for p in params:
                p.grad = None
            common.free_memory(device)
            entry["runs"][label] = {"memory": memory[label]}
            saver.save()
        state["optimizer"] = torch.optim.AdamW(params, lr=1e-5)
        runnable = {label: make_step(model, state, mask) for label, mask in masks.items()
                    if memory[label] != "OOM" and not args.memory_only}

        def record(timings: Dict[str, Any]) -> None:
            entry["runs"] = {label: {**timings.get(label, {}), "memory": memory[label]} for label in masks}
            saver.save()

        timings = common.time_round_robin(runnable, device, warmup, repeats, on_round=record) if runnable else {}
        record(timings)
        t = {label: timings[label]["median_s"] for label in timings}
        mem = {label: memory[label]["peak_extra_bytes"] for label in masks if memory[label] != "OOM"}
        entry["ratios"] = {
            "time_v2_over_full_attention": common.ratio(t.get("v2"), t.get("full_attention")),
            "mem_v2_over_full_attention": common.ratio(mem.get("v2"), mem.get("full_attention")),
        }
    except RuntimeError as error:
        if not is_oom(error):
            raise
        entry["error"] = "OOM"
    finally:
        # drop every reference to this mode's model before the next one is built
        state.clear()
        runnable.clear()
        params.clear()
        model = None
        common.free_memory(device)
        saver.save()


def main(argv=None) -> Dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=sorted(common.MODEL_SIZES),
                        help="random model size (default: quick / cpu-mid / cogvideox-5b)")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", dest="checkpointing", action="store_true", default=None)
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="no GPU needed: estimate the peak memory of a CUDA training step with fake tensors")
    parser.add_argument("--memory-only", action="store_true", help="measure each step's peak memory, no timing")
    parser.add_argument("--compare-estimate", default=None, metavar="JSON",
                        help="an --estimate-memory result (e.g. benchmarks/results/training_cogvideox-5b_estimate.json): "
                             "report measured / estimated peak memory")
    args = parser.parse_args(argv)
    if args.estimate_memory:
        dtype = common.setup_estimate(args)
        size = args.model or ("quick" if args.quick else "cogvideox-5b")
        checkpointing = args.checkpointing if args.checkpointing is not None else True
        return estimate(args, size, dtype, checkpointing)
    env = common.setup(args)
    device, dtype = env["device"], env["dtype"]
    size = args.model or ("quick" if args.quick else ("cogvideox-5b" if device.type == "cuda" else "cpu-mid"))
    checkpointing = args.checkpointing if args.checkpointing is not None else device.type == "cuda"
    repeats = args.repeats or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    n = args.scenes
    height, width, frames = common.VIDEO_SIZES[size]

    from diffusers import CogVideoXDPMScheduler

    from diffusers_mask2dit.tiny import build_tiny_components

    scheduler = CogVideoXDPMScheduler.from_config(build_tiny_components("5b")["scheduler"].config)
    config = common.transformer_config(size, **common.model_overrides(size))
    latent_frames = (frames - 1) // 4 + 1
    scene_frames = [latent_frames] * n
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, n * latent_frames, config["in_channels"], height // 8, width // 8, generator=generator).to(device)
    prompt_embeds = torch.randn(1, n * config["max_text_seq_length"], config["text_embed_dim"], generator=generator).to(device, dtype)
    video_tokens = latent_frames * (height // 16) * (width // 16)

    info = common.machine_info(device)
    print(f"training benchmark: {size} random model, {n} scenes x {frames} frames at {height}x{width} "
          f"({video_tokens} video tokens/scene), {str(dtype)[6:]}, checkpointing {'on' if checkpointing else 'off'}, "
          f"{info['cpu'] if device.type == 'cpu' else info.get('gpu')}, {info['date']}", flush=True)

    name = "training" if size in ("quick", "cpu-mid") else f"training_{size}"
    results: Dict[str, Any] = {}
    # saved after every measurement: a time limit on a lent GPU keeps what was measured before it
    saver = common.ProgressSaver({
        "benchmark": "training", "machine": info, "dtype": str(dtype)[6:], "quick": args.quick,
        "model": {"size": size, "config": config},
        "video": {"height": height, "width": width, "scenes": n, "pixel_frames_per_scene": frames,
                  "latent_frames_per_scene": latent_frames, "video_tokens_per_scene": video_tokens},
        "gradient_checkpointing": checkpointing, "lora_rank": args.lora_rank,
        "loss": "diffusers_mask2dit.training.loss (v-prediction)",
        "repeats": 0 if args.memory_only else repeats, "warmup": warmup, "estimate": args.compare_estimate,
        "results": results,
    }, name, args)

    def make_step(model, state, mask: str, seed: int = 0) -> Callable[[], float]:
        def step():
            batch = prepare_diffusion_batch(latents, None, scene_frames, torch.tensor([seed]), scheduler, cond_prob=0.0)
            loss = optimizer_step(model, state["optimizer"], batch, prompt_embeds, mask, dtype, device)
            return float(loss.detach())
        return step

    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        results[mode] = {}
        measure_training_mode(results[mode], mode, make_step, saver, args, size, device, dtype, checkpointing,
                              warmup, repeats)

    rows = []
    for mode, entry in results.items():
        if "runs" not in entry:
            rows.append([mode, "-", entry.get("error", "?"), "-", "-", "-"])
            continue
        for label, run in entry["runs"].items():
            mem = run["memory"]
            rows.append([mode, label, common.fmt_time(run.get("median_s")),
                         common.fmt_ratio(entry["ratios"]["time_v2_over_full_attention"]) if label == "v2" else "",
                         "OOM" if mem == "OOM" else common.fmt_bytes(mem["peak_extra_bytes"]),
                         "OOM" if mem == "OOM" else common.fmt_bytes(mem["peak_total_bytes"])])
    common.print_table(f"-- training step, 1 sample of {n} scenes ({size}, {str(dtype)[6:]})",
                       ["mode", "attention", f"median/step ({common.time_basis(device)})", "v2 / full", "peak extra mem", "total (with weights)"], rows)

    goals: Dict[str, Any] = {}
    if device.type == "cuda" and size == "cogvideox-5b" and "lora" in results:
        run = results["lora"].get("runs", {}).get("v2")
        fits = run is not None and run["memory"] != "OOM" and run["memory"]["cuda_max_memory_allocated"] < GPU_MEMORY_GOAL_GB * 1e9
        goals["5b_lora_fits_80GB"] = bool(fits)
        print("   goals:  " + ", ".join(f"{k}={'met' if ok else 'MISSED'}" for k, ok in goals.items()), flush=True)
    for mode, entry in results.items():
        if "ratios" in entry:
            print(f"   {mode}: " + ", ".join(f"{k}={common.fmt_ratio(v)}" for k, v in entry["ratios"].items()), flush=True)

    if args.compare_estimate:
        compare_with_estimate(results, args.compare_estimate)
    return saver.finish(results=results, goals_met=goals)


if __name__ == "__main__":
    main()
