"""The GPU run's first step (about 30 s): the machine and the versions, then each of our attention backends that
runs here, forward and backward on a small 3-scene layout, against fp32 math with the dense mask.

If a backend raises or is off by more than :data:`BROKEN`, CUDA or the kernel every benchmark measures is broken,
and ``run.py`` stops the run at once (the paper-scale figures would mean nothing) so that the lease is spent on a
fix and a rerun instead. Whether each is exact to the dtype's precision (:data:`TOLERANCE`) is recorded apart.

    python benchmarks/gpu/smoke.py --device cuda --dtype bfloat16 --output "$OUT/smoke.json"
    python benchmarks/gpu/smoke.py --device cpu --dtype float32 --quick --output /tmp/smoke.json   # the dry run

Writes the JSON (atomically) after the environment and after every backend's check; exits 1 if one is broken.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from diffusers_mask2dit import SceneLayout, build_dense_mask, scene_attention  # noqa: E402
from diffusers_mask2dit.attention import flash_varlen_available  # noqa: E402

# 3 scenes of 226 text tokens (the paper's prompt length) and unequal videos: every block of the v2 mask, L = 4,278;
# --quick (the dry run on a CPU): the same pattern, L = 144
LAYOUTS = {False: SceneLayout([226, 226, 226], [1350, 900, 1350]), True: SceneLayout([16, 16, 16], [40, 24, 32])}
HEADS, HEAD_DIM = 4, 64
# relative to the largest reference value: bf16 keeps 8 bits of mantissa (2^-8 = 0.4%); a kernel that is exact
# to bf16 precision stays within a few of those steps. fp32 (the dry run): the same check, 1e-5.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}
# beyond this the kernel is broken (a wrong mask differs by tens of percent), not imprecise: only then, or when a
# backend raises, does the smoke step fail and stop the run; a miss of TOLERANCE alone is recorded, not fatal
BROKEN = 0.1
PACKAGES = ["diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "tokenizers",
            "sentencepiece", "triton", "flash_attn", "pytest", "pytest-timeout"]


def environment() -> Dict[str, Any]:
    """Machine, accelerator, and the versions and locations of what the steps import."""
    import diffusers

    import diffusers_mask2dit

    info: Dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    gpu_memory_gib=round(props.total_memory / (1 << 30), 1))
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    info["diffusers_from"] = str(Path(diffusers.__file__).parent)
    info["package_from"] = str(Path(diffusers_mask2dit.__file__).parent)
    info["flash_varlen_available"] = bool(flash_varlen_available())
    info["aten_flash_varlen"] = hasattr(torch.ops.aten, "_flash_attention_forward")
    try:
        from torch.nn.attention import flex_attention  # noqa: F401

        info["flex_attention"] = True
    except ImportError:
        info["flex_attention"] = False
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia_smi"] = f"not run: {error}"
    return info


def fp32_reference(q, k, v, grad_out, mask):
    """Masked attention in fp32 math (scores materialised) and the gradients of q, k, v."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    scores = (leaves[0] @ leaves[1].transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ leaves[2]
    return out.detach(), [g.detach() for g in torch.autograd.grad(out, leaves, grad_out.float())]


def check_backend(backend: str, layout: SceneLayout, inputs, reference, dtype: torch.dtype) -> Dict[str, Any]:
    """``backend``'s output and gradients vs the fp32 reference: the largest difference relative to the largest
    reference value, each, and that relative to the rounding of the reference itself to ``dtype``."""
    q, k, v, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = scene_attention(*leaves, layout, "v2", backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out)
    names = ["out", "dq", "dk", "dv"]
    errors, rounding = {}, {}
    for name, got, want in zip(names, [out] + list(grads), [reference[0]] + reference[1]):
        scale = max(want.abs().max().item(), 1e-30)
        errors[name] = (got.float() - want).abs().max().item() / scale
        rounding[name] = (want.to(dtype).float() - want).abs().max().item() / scale
    worst, worst_rounding = max(errors.values()), max(rounding.values())
    return {"relative_error": errors, "reference_rounding_to_dtype": rounding,
            "worst_over_rounding": worst / worst_rounding if worst_rounding > 0 else None,
            "tolerance": TOLERANCE[dtype], "within_tolerance": worst <= TOLERANCE[dtype], "ok": worst <= BROKEN}


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    env = common.setup(args)
    device, dtype = env["device"], env["dtype"]
    saver = common.ProgressSaver({"benchmark": "gpu_smoke", "machine": common.machine_info(device),
                                  "dtype": str(dtype)[6:], "layout": repr(LAYOUTS[args.quick]),
                                  "environment": environment(), "checks": {}},
                                 "gpu_smoke", args)
    print(json.dumps(saver.payload["environment"], indent=2), flush=True)
    saver.save()
    layout = LAYOUTS[args.quick]
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(1, HEADS, layout.total, HEAD_DIM, generator=generator, device=device).to(dtype)
              for _ in range(4)]
    reference = fp32_reference(*inputs, build_dense_mask(layout, "v2", device=device))
    backends = ["flash", "sdpa"] if flash_varlen_available(device) and dtype != torch.float32 else ["sdpa"]
    for backend in backends:
        try:
            check = check_backend(backend, layout, inputs, reference, dtype)
        except Exception as error:  # noqa: BLE001 - recorded; the exit code says it failed
            check = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        saver.payload["checks"][backend] = check
        saver.save()
        verdict = "BROKEN" if not check["ok"] else ("ok" if check["within_tolerance"] else "outside the tolerance")
        print(f"{backend}: {verdict} {json.dumps(check)}", flush=True)
    ok = all(check["ok"] for check in saver.payload["checks"].values())
    if device.type == "cuda" and "flash" not in backends:
        ok = False  # every GPU figure is about ours[flash]: without it the run has nothing to measure
        saver.payload["checks"]["flash"] = {"ok": False, "error": "varlen FlashAttention is not available here"}
    saver.finish(ok=ok, within_tolerance=all(check.get("within_tolerance") for check in saver.payload["checks"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
