"""Training cost: step time and peak memory of Mask²DiT (mask v2) vs the same model with full attention.

One sample of n=3 scenes per step, v-prediction loss (the package's `training.loss` when present),
AdamW, for LoRA (peft, rank 64 on to_q/to_k/to_v/to_out.0) and for full fine-tuning. The only
difference between the two columns of a mode is the attention mask: "v2" (ours) vs "full" (no mask).

Memory: ``peak`` is the high-water of everything a fresh training step allocates on top of the weights
(activations, gradients, AdamW state, which is created in that first step); ``total`` adds the weights.

    python benchmarks/bench_training.py                 # CPU, mid-size random model
    python benchmarks/bench_training.py --quick         # tiny, seconds
    python benchmarks/bench_training.py --device cuda --dtype bfloat16 --model cogvideox-5b   # 480x720, 49 frames/scene
    python benchmarks/bench_training.py --device cuda --dtype bfloat16 --model cogvideox-2b

On CUDA gradient checkpointing is on by default (``--no-gradient-checkpointing`` turns it off); on CPU it
is off unless ``--gradient-checkpointing`` is given. With bf16 the weights, gradients and AdamW state
are bf16 (LoRA adapters are kept in fp32 by peft); a mode that runs out of memory is recorded as "OOM".
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from diffusers_mask2dit import Mask2DiTTransformer3DModel  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GPU_MEMORY_GOAL_GB = 80.0


def _loss_functions():
    """The package's noising + v-prediction loss, or an equivalent written here if it is not available."""
    try:
        from diffusers_mask2dit.training.loss import prepare_diffusion_batch, training_loss

        def make_batch(latents, scene_frames, seed, scheduler):
            return prepare_diffusion_batch(latents, None, scene_frames, torch.tensor([seed]), scheduler, cond_prob=0.0)

        def loss_fn(model, batch, prompt_embeds, mask, dtype):
            return training_loss(model, batch, prompt_embeds, mask, dtype)

        return make_batch, loss_fn, "diffusers_mask2dit.training.loss"
    except ImportError:
        from types import SimpleNamespace

        def make_batch(latents, scene_frames, seed, scheduler):
            generator = torch.Generator().manual_seed(seed)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            flat_t = t.repeat_interleave(latents.shape[1]).to(latents.device)
            noisy = scheduler.add_noise(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)
            target = scheduler.get_velocity(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)
            return SimpleNamespace(noisy_latents=noisy, target=target, timesteps=t.to(latents.device), scene_frames=scene_frames)

        def loss_fn(model, batch, prompt_embeds, mask, dtype):
            out = model(hidden_states=batch.noisy_latents.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                        timestep=batch.timesteps, attention_kwargs={"scene_mask": mask},
                        scene_frames=list(batch.scene_frames), return_dict=False)[0]
            return (out.float() - batch.target.float()).square().mean()

        return make_batch, loss_fn, "benchmarks/bench_training.py (fallback)"


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def main(argv=None) -> Dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=sorted(common.MODEL_SIZES),
                        help="random model size (default: quick / cpu-mid / cogvideox-5b)")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", dest="checkpointing", action="store_true", default=None)
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    args = parser.parse_args(argv)
    env = common.setup(args)
    device, dtype = env["device"], env["dtype"]
    size = args.model or ("quick" if args.quick else ("cogvideox-5b" if device.type == "cuda" else "cpu-mid"))
    checkpointing = args.checkpointing if args.checkpointing is not None else device.type == "cuda"
    repeats = args.repeats or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    n = args.scenes
    height, width, frames = common.VIDEO_SIZES[size]
    make_batch, loss_fn, loss_source = _loss_functions()

    from diffusers import CogVideoXDPMScheduler
    from peft import LoraConfig

    from diffusers_mask2dit.tiny import build_tiny_components

    scheduler = CogVideoXDPMScheduler.from_config(build_tiny_components("5b")["scheduler"].config)
    config = common.transformer_config(size)
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

    results: Dict[str, Any] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("lora", "full"):
            raise SystemExit(f"--modes takes lora and/or full, got {mode!r}")
        common.free_memory(device)
        entry: Dict[str, Any] = {}
        results[mode] = entry
        model: Optional[torch.nn.Module] = None
        params: list = []
        runnable: Dict[str, Callable[[], float]] = {}
        state: Dict[str, Any] = {}
        try:
            model = Mask2DiTTransformer3DModel.from_cogvideox(common.build_random_transformer(size, device, dtype))
            if checkpointing:
                model.enable_gradient_checkpointing()
            if mode == "lora":
                model.requires_grad_(False)
                model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights=True,
                                             target_modules=LORA_TARGETS))
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.data = param.data.float()  # adapters train in fp32
                        param.requires_grad_(True)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            entry["trainable_parameters"] = sum(p.numel() for p in params)
            entry["parameters"] = common.parameter_count(model)
            entry["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())

            def step_fn(mask: str, seed: int = 0) -> Callable[[], float]:
                def step():
                    optimizer_ = state["optimizer"]
                    optimizer_.zero_grad(set_to_none=True)
                    batch = make_batch(latents, scene_frames, seed, scheduler)
                    loss = loss_fn(model, batch, prompt_embeds, mask, dtype)
                    loss.backward()
                    optimizer_.step()
                    return float(loss.detach())
                return step

            masks = {"v2": "v2", "full_attention": "full"}
            # Memory first: a fresh optimizer, so the AdamW state allocated by the first step is counted.
            memory: Dict[str, Any] = {}
            for label, mask in masks.items():
                state["optimizer"] = torch.optim.AdamW(params, lr=1e-5)
                common.free_memory(device)
                try:
                    extra = common.measure_memory(step_fn(mask), device)
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
            state["optimizer"] = torch.optim.AdamW(params, lr=1e-5)
            runnable = {label: step_fn(mask) for label, mask in masks.items() if memory[label] != "OOM"}
            timings = common.time_round_robin(runnable, device, warmup, repeats) if runnable else {}
            entry["runs"] = {label: {**timings.get(label, {}), "memory": memory[label]} for label in masks}
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
    common.print_table(f"-- training step, 1 sample of {n} scenes ({size}, {str(dtype)[6:]}, loss from {loss_source})",
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

    payload = {
        "benchmark": "training",
        "machine": info,
        "dtype": str(dtype)[6:],
        "quick": args.quick,
        "model": {"size": size, "config": config},
        "video": {"height": height, "width": width, "scenes": n, "pixel_frames_per_scene": frames,
                  "latent_frames_per_scene": latent_frames, "video_tokens_per_scene": video_tokens},
        "gradient_checkpointing": checkpointing,
        "lora_rank": args.lora_rank,
        "loss": loss_source,
        "repeats": repeats, "warmup": warmup,
        "results": results,
        "goals_met": goals,
    }
    name = "training" if size in ("quick", "cpu-mid") else f"training_{size}"
    common.save_json(payload, name, args)
    return payload


if __name__ == "__main__":
    main()
