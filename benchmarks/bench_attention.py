"""Per-layer attention cost: Mask²DiT v2 `scene_attention` vs the alternatives, at the same shapes.

Methods (all computing the v2 mask except `unmasked`):
  ours[sdpa]   scene_attention(backend="sdpa"): fused kernels per block, merged through log-sum-exps
  ours[flash]  scene_attention(backend="flash"): varlen FlashAttention (CUDA only)
  ours[dense]  scene_attention(backend="dense"): builds the L×L mask on every call
  unmasked     SDPA over the whole sequence with no mask (the ceiling: v2 keeps ~98% of its pairs)
  dense_mask   SDPA with a prebuilt L×L boolean mask (its bytes are counted as extra memory)
  authors      the authors' approach (video K/V repeated per scene), see baselines.py

Every method is first checked against the dense-mask result (forward and gradients) at the benchmark
shape, then timed round-robin (median), then its peak extra memory is measured in a separate call.

    python benchmarks/bench_attention.py            # CPU, fp32, the issue's CPU shapes
    python benchmarks/bench_attention.py --quick    # tiny shapes, seconds
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16   # paper scale

Without a GPU, ``--estimate-memory`` gives each method's peak extra memory at the paper's scale (bf16,
batch 1 as in training and 2 as with classifier-free guidance) from a run on fake tensors (shapes and
dtypes only; see bench_training.py), ours[flash] routed as on an sm80+ GPU. The dense-mask method is
represented by its L×L boolean mask alone: what CUDA's SDPA adds for a mask (an additive copy, a
different kernel) depends on the kernel it picks, so that column is a lower bound.

    python benchmarks/bench_attention.py --estimate-memory
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from baselines import authors_scene_attention, check_authors_matches_dense, dense_mask_attention, unmasked_attention  # noqa: E402

from diffusers_mask2dit import SceneLayout, build_dense_mask, scene_attention  # noqa: E402
from diffusers_mask2dit.attention import flash_varlen_available, resolve_backend  # noqa: E402
from diffusers_mask2dit.layout import allowed_pair_fraction  # noqa: E402

# (num_scenes, text tokens per scene, video tokens per scene, heads, head dim)
CPU_SHAPES = [(3, 226, 4096, 2, 64), (6, 226, 1024, 2, 64)]
GPU_SHAPES = [(3, 226, 17550, 48, 64), (6, 226, 17550, 48, 64)]
QUICK_SHAPES = [(3, 16, 192, 2, 32), (6, 16, 64, 2, 32)]

GOALS = {
    "ours_over_unmasked_max": 1.10,
    "dense_over_ours_min": 1.5,
    "authors_over_ours_min": 1.0,
    "mem_ours_over_dense_max": 0.10,
    "mem_ours_over_authors_max": 0.5,
}


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def parse_shape(text: str):
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 5:
        raise SystemExit("--shape takes n,text,video,heads,dim (e.g. 3,226,4096,2,64)")
    return tuple(parts)


def make_methods(layout: SceneLayout, device: torch.device, dtype: torch.dtype, mask: torch.Tensor) -> Dict[str, Callable]:
    methods: Dict[str, Callable] = {
        "ours[sdpa]": lambda q, k, v: scene_attention(q, k, v, layout, "v2", backend="sdpa"),
    }
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_varlen_available(device):
        methods["ours[flash]"] = lambda q, k, v: scene_attention(q, k, v, layout, "v2", backend="flash")
    methods["ours[dense]"] = lambda q, k, v: scene_attention(q, k, v, layout, "v2", backend="dense")
    methods["unmasked"] = lambda q, k, v: unmasked_attention(q, k, v)
    methods["dense_mask"] = lambda q, k, v: dense_mask_attention(q, k, v, mask)
    methods["authors"] = lambda q, k, v: authors_scene_attention(q, k, v, layout)
    return methods


def run_shape(shape, args, device, dtype) -> Dict[str, Any]:
    n, text, video, heads, dim = shape
    layout = SceneLayout.uniform(n, text, video)
    batch = 1
    L = layout.total
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, L, dim, generator=generator).to(device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn(batch, heads, L, dim, generator=generator).to(device=device, dtype=dtype)
    mask = build_dense_mask(layout, "v2").to(device)
    mask_bytes = mask.numel() * mask.element_size()
    methods = make_methods(layout, device, dtype, mask)
    ours_name = "ours[flash]" if "ours[flash]" in methods else "ours[sdpa]"
    auto_backend = resolve_backend("auto", q)
    print(f"\n== n={n} text={text} video={video} heads={heads} dim={dim}: L={L}, v2 keeps "
          f"{allowed_pair_fraction(layout, 'v2') * 100:.2f}% of pairs; auto backend -> {auto_backend}", flush=True)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    check: Dict[str, float] = {}

    def forward_fn(fn):
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        return call

    def fwd_bwd_fn(fn):
        def call():
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves, grad_out)
        return call

    # 1. Correctness at this shape: every method vs the dense-mask result (the calls double as a warm-up).
    #    A method that runs out of GPU memory is recorded as "OOM" and left out of the rest.
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    oom: List[str] = []
    outputs: Dict[str, Any] = {}
    for name in ["dense_mask"] + [m for m in methods if m != "dense_mask"]:
        try:
            out = forward_fn(methods[name])().float()
            grads = [g.float() for g in fwd_bwd_fn(methods[name])()]
        except RuntimeError as error:
            if not is_oom(error):
                raise
            oom.append(name)
            common.free_memory(device)
            continue
        if not outputs:  # the first method that ran is the reference: the dense mask unless it ran out of memory
            outputs["reference"], outputs["reference_name"], outputs["reference_grads"] = out, name, grads
            continue
        ref, ref_grads = outputs["reference"], outputs["reference_grads"]
        if name == "unmasked":
            outputs["unmasked_diff"] = (out - ref).abs().max().item()
            continue
        err = max([(out - ref).abs().max().item() / max(1.0, ref.abs().max().item())]
                  + [(g - r).abs().max().item() / max(1.0, r.abs().max().item()) for g, r in zip(grads, ref_grads)])
        check[name] = err
        if not err <= tol:
            raise AssertionError(f"{name} differs from {outputs['reference_name']} by {err:.3g} (tolerance {tol})")
        del out, grads
    reference_name, unmasked_diff = outputs.get("reference_name"), outputs.get("unmasked_diff", float("nan"))
    outputs.clear()
    common.free_memory(device)
    for name in oom:
        methods.pop(name)
    print(f"   correctness vs {reference_name} (max abs diff, fwd+grads): "
          + ", ".join(f"{k} {v:.1e}" for k, v in check.items()) + f"; unmasked differs by {unmasked_diff:.2f}"
          + (f"; out of memory: {oom}" if oom else ""), flush=True)

    # 2. Timing, round-robin, per mode.
    warmup = max(0, args.warmup - 1)  # the correctness calls were the first warm-up
    timings = {
        "forward": common.time_round_robin({k: forward_fn(f) for k, f in methods.items()}, device, warmup, args.repeats),
        "forward_backward": common.time_round_robin({k: fwd_bwd_fn(f) for k, f in methods.items()}, device, warmup, args.repeats),
    }

    # 3. Peak extra memory, one call each (inputs, and for fwd+bwd the incoming gradient, excluded).
    memory: Dict[str, Dict[str, int]] = {"forward": {}, "forward_backward": {}}
    for name, fn in methods.items():
        for mode, maker in (("forward", forward_fn), ("forward_backward", fwd_bwd_fn)):
            common.free_memory(device)
            extra = common.measure_memory(maker(fn), device)
            if name == "dense_mask":
                extra += mask_bytes  # the prebuilt mask exists only for this method
            memory[mode][name] = extra
    common.free_memory(device)

    result: Dict[str, Any] = {
        "shape": {"num_scenes": n, "text_per_scene": text, "video_per_scene": video, "heads": heads, "head_dim": dim,
                  "batch": batch, "sequence_length": L},
        "v2_pair_fraction": allowed_pair_fraction(layout, "v2"),
        "auto_backend": auto_backend,
        "ours": ours_name,
        "max_abs_diff_vs_dense": check,
        "reference": reference_name,
        "out_of_memory": oom,
        "dense_mask_bytes": mask_bytes,
        "output_bytes": q.numel() * q.element_size(),
        "modes": {},
    }
    for mode in ("forward", "forward_backward"):
        t = {name: timings[mode][name]["median_s"] for name in methods}
        m = memory[mode]
        ratios = {
            "ours_over_unmasked": common.ratio(t.get(ours_name), t.get("unmasked")),
            "dense_over_ours": common.ratio(t.get("dense_mask"), t.get(ours_name)),
            "authors_over_ours": common.ratio(t.get("authors"), t.get(ours_name)),
            "ours_dense_backend_over_ours": common.ratio(t.get("ours[dense]"), t.get(ours_name)),
            "mem_ours_over_dense": common.ratio(m.get(ours_name), m.get("dense_mask")),
            "mem_ours_over_authors": common.ratio(m.get(ours_name), m.get("authors")),
            "mem_ours_over_unmasked": common.ratio(m.get(ours_name), m.get("unmasked")),
        }
        if ours_name == "ours[flash]":
            ratios["sdpa_backend_over_flash"] = common.ratio(t.get("ours[sdpa]"), t.get(ours_name))

        def goal(value, limit, at_most):
            if value is None:
                return None  # a method ran out of memory
            return value <= limit if at_most else value >= limit

        goals = {
            "ours_within_1.10x_of_unmasked": goal(ratios["ours_over_unmasked"], GOALS["ours_over_unmasked_max"], True),
            "at_least_1.5x_faster_than_dense": goal(ratios["dense_over_ours"], GOALS["dense_over_ours_min"], False),
            "not_slower_than_authors": goal(ratios["authors_over_ours"], GOALS["authors_over_ours_min"], False),
            "mem_under_10pct_of_dense": goal(ratios["mem_ours_over_dense"], GOALS["mem_ours_over_dense_max"], True),
            "mem_under_half_of_authors": goal(ratios["mem_ours_over_authors"], GOALS["mem_ours_over_authors_max"], True),
        }
        result["modes"][mode] = {
            "methods": {name: {**timings[mode][name], "peak_extra_bytes": m[name]} for name in methods},
            "ratios": ratios,
            "goals_met": goals,
        }
        rows = []
        for name in methods:
            rows.append([name, common.fmt_time(t[name]), common.fmt_ratio(common.ratio(t[name], t.get("unmasked"))),
                         common.fmt_bytes(m[name])])
        common.print_table(f"-- {mode.replace('_', '+')} (n={n}, video {video}/scene, {heads}x{dim}, {str(dtype)[6:]})",
                           ["method", f"median {common.time_basis(device)}", "vs unmasked", "peak extra mem"], rows)
        print("   ratios: " + ", ".join(f"{k}={common.fmt_ratio(v)}" for k, v in ratios.items()))
        print("   goals:  " + ", ".join(f"{k}={'n/a (OOM)' if ok is None else ('met' if ok else 'MISSED')}"
                                      for k, ok in goals.items()), flush=True)
    return result


def estimate_memory(shape, batch: int, dtype: torch.dtype) -> Dict[str, Dict[str, int]]:
    """Peak extra bytes (forward, forward+backward) of each method at ``shape``, on fake tensors."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffusers_mask2dit import attention

    n, text, video, heads, dim = shape
    layout = SceneLayout.uniform(n, text, video)
    cpu = torch.device("cpu")
    methods = {
        "ours[flash]": lambda q, k, v: scene_attention(q, k, v, layout, "v2", backend="flash"),
        "ours[sdpa]": lambda q, k, v: scene_attention(q, k, v, layout, "v2", backend="sdpa"),
        "unmasked": unmasked_attention,
        "authors": lambda q, k, v: authors_scene_attention(q, k, v, layout),
    }
    figures: Dict[str, Dict[str, int]] = {}
    # fake CPU tensors stand in for CUDA ones (a CPU build cannot make fake CUDA tensors): take each backend as named
    with FakeTensorMode(), mock.patch.object(attention, "resolve_backend", lambda backend, query: backend):
        q, k, v = (torch.empty(batch, heads, layout.total, dim, dtype=dtype, requires_grad=True) for _ in range(3))
        grad_out = torch.empty(batch, heads, layout.total, dim, dtype=dtype)
        for name, fn in methods.items():
            with torch.no_grad():
                forward = common.measure_memory(lambda: fn(q, k, v), cpu)
            both = common.measure_memory(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out), cpu)
            figures[name] = {"forward": forward, "forward_backward": both}
    mask_bytes = layout.total * layout.total  # one byte per pair
    figures["dense_mask (mask only)"] = {"forward": mask_bytes, "forward_backward": mask_bytes}
    return figures


def estimate_main(args, shapes, dtype: torch.dtype) -> Dict[str, Any]:
    info = common.machine_info(torch.device("cpu"))
    print(f"attention memory estimate (fake tensors, GPU kernels), {str(dtype)[6:]}, {info['date']}", flush=True)
    results = []
    for shape in shapes:
        for batch in (1, 2):
            figures = estimate_memory(shape, batch, dtype)
            ours, authors = figures["ours[flash]"], figures["authors"]
            mask = figures["dense_mask (mask only)"]
            ratios = {f"{mode}_ours_flash_over_authors": common.ratio(ours[mode], authors[mode])
                      for mode in ("forward", "forward_backward")}
            ratios.update({f"{mode}_ours_flash_over_dense_mask_bytes": common.ratio(ours[mode], mask[mode])
                           for mode in ("forward", "forward_backward")})
            results.append({"shape": dict(zip(("n", "text", "video", "heads", "dim"), shape)), "batch": batch,
                            "peak_extra_bytes": figures, "ratios": ratios})
            rows = [[name, common.fmt_bytes(f["forward"]), common.fmt_bytes(f["forward_backward"])]
                    for name, f in figures.items()]
            common.print_table(f"-- n={shape[0]} text={shape[1]} video={shape[2]} heads={shape[3]} dim={shape[4]}, "
                               f"batch {batch}: estimated peak extra memory", ["method", "forward", "fwd+bwd"], rows)
            print("   ratios: " + ", ".join(f"{k}={common.fmt_ratio(v)}" for k, v in ratios.items()), flush=True)
    payload = {"benchmark": "attention_memory_estimate", "machine": info, "dtype": str(dtype)[6:],
               "method": "FakeTensorMode; common.LiveBytes high-water of created tensors; dense mask = its bytes only",
               "results": results}
    common.save_json(payload, "attention", args, device_label="estimate")
    return payload


def main(argv=None) -> Dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=parse_shape, default=None,
                        help="n,text,video,heads,dim per scene (repeatable); default: the issue's shapes")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="no GPU needed: peak memory of each method at the GPU shapes, from fake tensors")
    args = parser.parse_args(argv)
    if args.estimate_memory:
        dtype = common.setup_estimate(args)
        return estimate_main(args, args.shape or (QUICK_SHAPES if args.quick else GPU_SHAPES), dtype)
    env = common.setup(args)
    device, dtype = env["device"], env["dtype"]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if device.type == "cpu" else 2
    shapes = args.shape or (QUICK_SHAPES if args.quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES))

    # The authors' approach must compute the same v2 attention before it is timed.
    for n in sorted({s[0] for s in shapes}):
        check_authors_matches_dense(SceneLayout.uniform(n, 5, 11))

    info = common.machine_info(device)
    print(f"attention benchmark on {info['cpu'] if device.type == 'cpu' else info.get('gpu')}, torch {torch.__version__}, "
          f"{info['torch_threads']} threads, {str(dtype)[6:]}, {info['date']}", flush=True)
    results: List[Dict[str, Any]] = [run_shape(shape, args, device, dtype) for shape in shapes]
    payload = {
        "benchmark": "attention",
        "machine": info,
        "dtype": str(dtype)[6:],
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "goals": GOALS,
        "results": results,
    }
    common.save_json(payload, "attention", args)
    return payload


if __name__ == "__main__":
    main()
