"""Parallel inference: communication per layer and rank, CPU wall-time scaling, a paper-scale estimate.

    python benchmarks/bench_parallel.py --threads 1      # CPU: 1, 2 and 4 gloo processes, side by side
    python benchmarks/bench_parallel.py --quick          # smoke: a tiny model on 1 and 2 processes
    python benchmarks/bench_parallel.py --estimate       # CogVideoX-5b at 480x720 on 1-8 GPUs, without a GPU

For each layout (``--ulysses`` x CFG: 1, Ulysses 2, CFG 2, Ulysses 4, Ulysses 2 x CFG 2) the script starts
that many processes (gloo on CPU), runs the transformer forward of one denoising step (guidance batch 2,
3 scenes) and prints, side by side: the median wall time, the speed-up over one process, and the bytes
each rank sends per layer in the Ulysses all-to-alls, both computed (:func:`ulysses_bytes_per_layer`) and
counted in the run, and rank 0's own CPU time for the forward (the work one process does, which the load of a
shared machine does not inflate as it does wall time). Every output is checked against the one-process
output (fp32, 1e-5).

``--estimate`` prices one denoising step of CogVideoX-5b (42 layers, 48 heads x 64) at the paper's scale
from FLOPs and the computed all-to-all bytes, with an assumed GPU throughput and all-to-all bandwidth
(``--tflops``, ``--bandwidth``); it is arithmetic, not a measurement.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (ulysses degree, CFG degree) per measured layout; processes = their product.
LAYOUTS: Tuple[Tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (4, 1), (2, 2))
QUICK_LAYOUTS: Tuple[Tuple[int, int], ...] = ((1, 1), (2, 1))
SCENES = 3
TEXT_TOKENS = 16  # per prompt: the real model's text share of a scene (226 / 17,550 = 1.3%), as bench_pipeline
# CogVideoX-5b at 480x720, 49 frames per scene (13 latent frames x 30 x 45 patches); 2 x 2 patches of 16 channels.
PAPER = dict(layers=42, heads=48, head_dim=64, text=226, video_per_scene=17_550, ff_mult=4, patch_values=64)


# --------------------------------------------------------------------------------------------------
# Communication, computed
# --------------------------------------------------------------------------------------------------


def ulysses_bytes_per_layer(
    batch: int, text_tokens: int, video_tokens: int, heads: int, head_dim: int, degree: int, element_size: int
) -> Dict[str, int]:
    """Bytes the busiest rank sends to the others in one layer's two all-to-alls (`SequenceShard`).

    Before attention a rank sends q, k, v of its ``Tl + Vl`` tokens for every other rank's heads; after it,
    the attention output of its own heads for every other rank's tokens. Lengths padded to multiples of the
    degree, heads split by `split_heads`."""
    from diffusers_mask2dit.parallel import padded_length, split_heads

    local = (padded_length(text_tokens, degree) + padded_length(video_tokens, degree)) // degree
    row = batch * local * head_dim * element_size  # one head of one rank's tokens
    per_rank = [(3 * (heads - mine) * row, mine * (degree - 1) * row) for mine in split_heads(heads, degree)]
    before, after = max(per_rank, key=sum)
    return {"before_attention": before, "after_attention": after, "total": before + after}


def gather_bytes_per_step(batch: int, video_tokens: int, patch_values: int, ulysses: int, cfg: int, element_size: int) -> int:
    """Bytes a rank sends per forward in the two gathers (outside the layers): diffusers' all-gather of the
    ``proj_out`` output over the Ulysses group (``patch_values`` numbers per video token) and the CFG gather
    of the transformer output (the same numbers for the rank's share of the batch)."""
    from diffusers_mask2dit.parallel import padded_length

    per_rank_batch = batch // cfg
    ulysses_gather = (ulysses - 1) * per_rank_batch * (padded_length(video_tokens, ulysses) // ulysses) * patch_values
    cfg_gather = (cfg - 1) * per_rank_batch * video_tokens * patch_values
    return (ulysses_gather + cfg_gather) * element_size


def fmt_bytes(nbytes: float) -> str:
    return f"{nbytes / 1024:.1f} KiB" if nbytes < (1 << 20) else common.fmt_bytes(nbytes)


# --------------------------------------------------------------------------------------------------
# One process of a measured layout
# --------------------------------------------------------------------------------------------------


def _model_and_inputs(size: str, seed: int = 0):
    from diffusers_mask2dit import Mask2DiTTransformer3DModel

    model = Mask2DiTTransformer3DModel.from_cogvideox(common.build_random_transformer(size, torch.device("cpu"), torch.float32, seed))
    height, width, frames = common.VIDEO_SIZES[size]
    latent_frames = (frames - 1) // 4 + 1
    generator = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(2, SCENES * latent_frames, model.config.in_channels, height // 8, width // 8, generator=generator)
    text = torch.randn(2, SCENES * TEXT_TOKENS, model.config.text_embed_dim, generator=generator)
    scene_frames = [latent_frames] * SCENES
    rope = model.prepare_rotary_emb(height // 8, width // 8, scene_frames, "cpu")
    kwargs = dict(timestep=torch.tensor([500, 500]), scene_frames=scene_frames, image_rotary_emb=rope,
                  attention_kwargs={"scene_mask": "v2"})
    return model, latents, text, kwargs


def _count_all_to_all(counter: Dict[str, int]) -> None:
    """Count the bytes this rank sends to others in each Ulysses all-to-all (wraps `parallel.all_to_all`)."""
    import torch.distributed as dist

    from diffusers_mask2dit import parallel

    exchange = parallel.all_to_all

    def counted(x, output_split_sizes, input_split_sizes, group, what):
        rank, degree = dist.get_rank(group), dist.get_world_size(group)
        rows = x.shape[0]
        own = input_split_sizes[rank] if input_split_sizes else rows // degree
        counter["bytes"] += (rows - own) * (x.numel() // rows) * x.element_size()
        return exchange(x, output_split_sizes, input_split_sizes, group, what)

    parallel.all_to_all = counted


def worker(size: str, ulysses: int, cfg: int, warmup: int, repeats: int, threads: int, out: str) -> None:
    """One rank: parallelize, check against the one-process output (rank 0 computes it), time the forward."""
    import datetime

    import torch.distributed as dist
    from safetensors.torch import save_file

    from diffusers_mask2dit.parallel import parallelize_transformer

    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(threads)
    diffusers_logging.set_verbosity_error()
    model, latents, text, kwargs = _model_and_inputs(size)
    parallel = ulysses * cfg > 1
    if parallel:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
        parallelize_transformer(model, ulysses, cfg > 1)
    counter = {"bytes": 0}
    if parallel:
        _count_all_to_all(counter)
    barrier = dist.barrier if parallel else (lambda: None)
    times, cpu_times = [], []
    with torch.no_grad():
        for index in range(warmup + repeats):
            counter["bytes"] = 0
            barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            output = model(latents, text, **kwargs).sample
            cpu = time.process_time() - cpu_start  # before the barrier: this process's own work
            barrier()
            if index >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(cpu)
    if not parallel or dist.get_rank() == 0:
        save_file({"output": output.contiguous()}, out + ".safetensors")
        with open(out + ".json", "w") as handle:
            json.dump({"times": times, "cpu_times": cpu_times, "bytes_per_layer": counter["bytes"] / model.config.num_layers},
                      handle)
    if parallel:
        # Every rank done (rank 0's writes included) before gloo is torn down: a rank that destroys its group while
        # another still has collectives in flight can abort with "terminate called without an active exception".
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_layout(size: str, ulysses: int, cfg: int, args, folder: str) -> Dict[str, Any]:
    """Start ``ulysses * cfg`` processes of this script in worker mode (one process: this one); what rank 0 measured."""
    world = ulysses * cfg
    out = os.path.join(folder, f"u{ulysses}_c{cfg}")
    if world == 1:
        worker(size, 1, 1, args.warmup, args.repeats, args.threads or 1, out)
        with open(out + ".json") as handle:
            return json.load(handle)
    command = [sys.executable, os.path.abspath(__file__), "--worker", size, str(ulysses), str(cfg), str(args.warmup),
               str(args.repeats), str(args.threads or 1), out]
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("diffusers_mask2dit").__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS=str(args.threads or 1), PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    processes = [subprocess.Popen(command, env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for rank in range(world)]
    logs = [process.communicate(timeout=1800)[0] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit(f"layout ulysses={ulysses} cfg={cfg} failed:\n" + "\n".join(log[-2000:] for log in logs))
    with open(out + ".json") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------------------------
# Measured run
# --------------------------------------------------------------------------------------------------


def measure(args) -> Dict[str, Any]:
    from safetensors.torch import load_file

    size = "quick" if args.quick else "cpu-mid"
    layouts = QUICK_LAYOUTS if args.quick else LAYOUTS
    config = common.transformer_config(size)
    height, width, frames = common.VIDEO_SIZES[size]
    video = SCENES * ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as folder:
        for ulysses, cfg in layouts:
            measured = run_layout(size, ulysses, cfg, args, folder)
            output = load_file(os.path.join(folder, f"u{ulysses}_c{cfg}.safetensors"))["output"]
            if (ulysses, cfg) == (1, 1):
                reference = output
            error = float((output - reference).abs().max())
            if error > 1e-5:
                raise SystemExit(f"ulysses={ulysses} cfg={cfg}: output differs from one process by {error:.2e}")
            median = sorted(measured["times"])[len(measured["times"]) // 2]
            cpu = sorted(measured["cpu_times"])[len(measured["cpu_times"]) // 2]
            computed = ulysses_bytes_per_layer(2 // cfg, SCENES * TEXT_TOKENS, video, config["num_attention_heads"],
                                               config["attention_head_dim"], ulysses, 4)["total"]
            results.append(dict(ulysses=ulysses, cfg=cfg, processes=ulysses * cfg, wall_s=median, times_s=measured["times"],
                                cpu_s=cpu, cpu_times_s=measured["cpu_times"],
                                bytes_per_layer_computed=computed, bytes_per_layer_counted=measured["bytes_per_layer"],
                                max_abs_error=error))
    base, base_cpu = results[0]["wall_s"], results[0]["cpu_s"]
    for result in results:
        result["speedup"] = base / result["wall_s"]
        result["cpu_fraction"] = result["cpu_s"] / base_cpu
        rows.append([result["processes"], f"{result['ulysses']} x {result['cfg']}", common.fmt_time(result["wall_s"]),
                     f"{result['speedup']:.2f}x", common.fmt_time(result["cpu_s"]), f"{result['cpu_fraction']:.2f}",
                     fmt_bytes(result["bytes_per_layer_computed"]),
                     fmt_bytes(result["bytes_per_layer_counted"]), f"{result['max_abs_error']:.1e}"])
    common.print_table(
        f"Transformer forward, {size} model, 3 scenes, L = {SCENES * TEXT_TOKENS + video} tokens, guidance batch 2, "
        f"fp32, {args.threads or 1} thread(s) per process (wall time, median of {args.repeats})",
        ["processes", "ulysses x cfg", "wall", "speed-up", "CPU time rank 0", "of 1 process", "sent/layer/rank (computed)",
         "(counted)", "max |diff|"],
        rows,
    )
    return {"size": size, "model": {k: config[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers")},
            "tokens": {"text": SCENES * TEXT_TOKENS, "video": video}, "layouts": results}


# --------------------------------------------------------------------------------------------------
# Paper-scale estimate
# --------------------------------------------------------------------------------------------------


def step_flops(batch: int, scenes: int) -> Tuple[float, int, int]:
    """FLOPs of one transformer forward of CogVideoX-5b on ``scenes`` scenes (v2 mask), and the token counts."""
    from diffusers_mask2dit import SceneLayout
    from diffusers_mask2dit.layout import allowed_pair_fraction

    layout = SceneLayout.uniform(scenes, PAPER["text"], PAPER["video_per_scene"])
    width = PAPER["heads"] * PAPER["head_dim"]
    linear = 2 * batch * layout.total * (4 + 2 * PAPER["ff_mult"]) * width * width  # q, k, v, out; feed-forward
    attention = 4 * batch * allowed_pair_fraction(layout, "v2") * layout.total**2 * width  # QK^T and PV
    return PAPER["layers"] * (linear + attention), layout.text_total, layout.video_total


def estimate(args) -> Dict[str, Any]:
    tflops, bandwidth = args.tflops * 1e12, args.bandwidth * 1e9
    rows, results = [], []
    for scenes in (3, 6):
        flops, text, video = step_flops(2, scenes)
        single = flops / tflops
        for ulysses, cfg in ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2)):
            gpus = ulysses * cfg
            per_rank_bytes = ulysses_bytes_per_layer(2 // cfg, text, video, PAPER["heads"], PAPER["head_dim"], ulysses, 2)
            gathers = gather_bytes_per_step(2, video, PAPER["patch_values"], ulysses, cfg, 2)
            compute = flops / gpus / tflops
            communication = (PAPER["layers"] * per_rank_bytes["total"] + gathers) / bandwidth
            step = compute + communication
            results.append(dict(scenes=scenes, ulysses=ulysses, cfg=cfg, gpus=gpus, compute_s=compute,
                                communication_s=communication, step_s=step, speedup=single / step,
                                bytes_per_layer_per_rank=per_rank_bytes["total"], gather_bytes_per_step=gathers))
            rows.append([scenes, gpus, f"{ulysses} x {cfg}", fmt_bytes(per_rank_bytes["total"]), fmt_bytes(gathers),
                         f"{compute:.2f} s", f"{communication * 1e3:.0f} ms", f"{step:.2f} s", f"{single / step:.2f}x"])
    common.print_table(
        f"CogVideoX-5b step (guidance batch 2, 480x720, 49 frames/scene, v2, bf16): estimated at {args.tflops:g} TFLOP/s "
        f"per GPU and {args.bandwidth:g} GB/s all-to-all per GPU, no overlap",
        ["scenes", "GPUs", "ulysses x cfg", "sent/layer/rank", "gathers/step/rank", "compute", "communication", "step",
         "speed-up"], rows,
    )
    return {"assumptions": {"tflops_per_gpu": args.tflops, "all_to_all_gb_per_s": args.bandwidth, "model": PAPER,
                            "overlap": "none: all-to-all time adds to compute time"}, "estimates": results}


def main(argv: Sequence[str] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        size, ulysses, cfg, warmup, repeats, threads, out = argv[1:]
        worker(size, int(ulysses), int(cfg), int(warmup), int(repeats), int(threads), out)
        # The results are written and closed: leave without the interpreter's teardown, where gloo's threads and the
        # functional collectives' pending work objects sometimes abort ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--estimate", action="store_true", help="paper-scale estimate on 1-8 GPUs (arithmetic)")
    parser.add_argument("--tflops", type=float, default=400.0, help="--estimate: achieved bf16 TFLOP/s per GPU")
    parser.add_argument("--bandwidth", type=float, default=300.0, help="--estimate: all-to-all GB/s sent per GPU")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.warmup = 1 if args.warmup is None else args.warmup
    common.setup(args)
    machine = common.machine_info(torch.device("cpu"))  # before the run: its load average is the one at the start
    if args.estimate:
        payload = {"kind": "estimate", **estimate(args), "machine": machine}
        common.save_json(payload, "parallel", args, "estimate")
        return payload
    payload = {"kind": "measured", **measure(args), "machine": machine}
    common.save_json(payload, "parallel", args)
    return payload


if __name__ == "__main__":
    main()
