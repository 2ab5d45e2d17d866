"""Inference memory of a CogVideoX-5b-sized Mask²DiT generation per recipe, estimated without a GPU.

One denoising step of the transformer (3 scenes x 49 frames at 480x720, 3 x 226 prompt tokens, the CFG batch of
2, bf16, mask v2, attention routed as on an sm80+ GPU: varlen FlashAttention) and the VAE decode of one scene
(scenes are decoded one at a time) run on fake tensors (``FakeTensorMode``: shapes and dtypes only);
`common.LiveBytes` keeps the high-water mark of the tensors they create. Weights are counted per recipe:

- ``bf16``: every weight in bf16;
- ``int8``: torchao int8 weight-only: the transformer's quantized linear weights take 1 byte per value plus a bf16
  scale per output row, and one layer's weight is dequantized to bf16 while it runs;
- ``fp8-layerwise``: the same linears stored in float8 (1 byte), one layer cast to bf16 while it runs;
- ``+ model offload``: only the component that runs is on the GPU (T5 while encoding, the transformer while
  denoising, the VAE while decoding), so the peak is the largest of the three phases instead of all weights at once.

The modules `optimization.SKIP_MODULE_PATTERNS` names keep bf16 in every recipe. The text encoder (T5-XXL encoder,
4.76 B parameters) is counted from its size, not built. These are estimates: allocator fragmentation, CUDA context
(~0.5 GB) and cuDNN workspaces are not in them.

    python benchmarks/bench_memory.py                     # prints the table; nothing written without --output
    python benchmarks/bench_memory.py --output benchmarks/results/memory_inference_estimate.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from diffusers_mask2dit import Mask2DiTTransformer3DModel, attention  # noqa: E402
from diffusers_mask2dit.optimization import _skipped  # noqa: E402

T5_XXL_ENCODER_PARAMETERS = 4_762_310_656  # google/t5-v1_1-xxl encoder, as in CogVideoX-5b's text_encoder
GiB = float(1 << 30)
GPUS = (24, 40, 80)


def transformer_weight_bytes(model: torch.nn.Module) -> Dict[str, int]:
    """Weight bytes of the transformer per recipe, and the largest quantized linear's bf16 size (cast per layer)."""
    quantizable = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _skipped(n)]
    total_bf16 = sum(p.numel() * 2 for p in model.parameters())
    linear_bf16 = sum(m.weight.numel() * 2 for m in quantizable)
    scales = sum(m.out_features * 2 for m in quantizable)
    largest = max(m.weight.numel() * 2 for m in quantizable)
    return {
        "bf16": total_bf16,
        "int8": total_bf16 - linear_bf16 // 2 + scales,
        "fp8-layerwise": total_bf16 - linear_bf16 // 2,
        "largest_layer_bf16": largest,
    }


def transformer_step_peak(scenes: int = 3) -> Dict[str, int]:
    """Weights and peak extra bytes of one transformer step (CFG batch 2), fake tensors, GPU routing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    size = "cogvideox-5b"
    config = common.transformer_config(size, **common.model_overrides(size))
    height, width, frames = common.VIDEO_SIZES[size]
    latent_frames = (frames - 1) // 4 + 1
    model = Mask2DiTTransformer3DModel.from_cogvideox(common.build_random_transformer(size, torch.device("meta"), torch.bfloat16, **common.model_overrides(size)))
    weights = transformer_weight_bytes(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(FakeTensorMode())
        stack.enter_context(torch.no_grad())
        stack.enter_context(mock.patch.object(attention, "resolve_backend", lambda backend, query: "flash"))
        common.materialize_fake(model)
        latents = torch.empty(2, scenes * latent_frames, 16, height // 8, width // 8, dtype=torch.bfloat16)
        text = torch.empty(2, scenes * config["max_text_seq_length"], 4096, dtype=torch.bfloat16)
        timestep = torch.empty(2, dtype=torch.long)
        rope = model.prepare_rotary_emb(height // 8, width // 8, [latent_frames] * scenes, "cpu")
        cpu = torch.device("cpu")
        extra = common.measure_memory(
            lambda: model(latents, text, timestep, image_rotary_emb=rope, scene_frames=[latent_frames] * scenes), cpu
        )
    return {**weights, "step_extra": extra}


def vae_decode_peak(tiling: bool) -> Dict[str, int]:
    """Weights and peak extra bytes of decoding one scene (13 latent frames -> 49 frames at 480x720), bf16."""
    from diffusers import AutoencoderKLCogVideoX
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX().to(torch.bfloat16).eval()  # CogVideoX's VAE config is the default one
    weights = sum(p.numel() * 2 for p in vae.parameters())
    if tiling:
        vae.enable_tiling()
    with FakeTensorMode(), torch.no_grad():
        common.materialize_fake(vae)
        latents = torch.empty(1, 16, 13, 60, 90, dtype=torch.bfloat16)
        extra = common.measure_memory(lambda: vae.decode(latents).sample, torch.device("cpu"))
    return {"weights": weights, "extra": extra}


T5_BYTES = T5_XXL_ENCODER_PARAMETERS * 2
T5_EXTRA_BYTES = 2 * 3 * 226 * 4096 * 2 * 8  # the encoder's activations: a few copies of (CFG, 3 x 226, 4096); small


def generation_peaks(transformer: int, step_extra: int, vae: int, decode_extra: int) -> Dict[str, float]:
    """Peak GB of a generation whose transformer and VAE take these bytes (weights; peak extra of one step and of one
    scene's decode), the T5 encoder counted from its size: all on the GPU at once, or with model offload (one
    component on the GPU at a time)."""
    everything = T5_BYTES + transformer + vae
    return {
        "peak_GB": (everything + max(step_extra, decode_extra, T5_EXTRA_BYTES)) / 1e9,
        "peak_model_offload_GB": max(T5_BYTES + T5_EXTRA_BYTES, transformer + step_extra, vae + decode_extra) / 1e9,
    }


def recipe_table(step: Dict[str, int], vae: Dict[str, Dict[str, int]]) -> Dict[str, Dict[str, float]]:
    """Peak GB per recipe: all components on the GPU, or with model offload (one phase at a time)."""
    rows = {}
    for recipe in ("bf16", "int8", "fp8-layerwise"):
        step_extra = step["step_extra"] + (0 if recipe == "bf16" else step["largest_layer_bf16"])  # + one layer cast
        for tiled in (False, True):
            decode = vae["tiled" if tiled else "plain"]
            everything = T5_BYTES + step[recipe] + decode["weights"]
            rows[recipe + (" + VAE tiling" if tiled else "")] = {
                "weights_GB": everything / 1e9,
                "denoise_step_GB": (everything + step_extra) / 1e9,
                "vae_decode_GB": (everything + decode["extra"]) / 1e9,
                **generation_peaks(step[recipe], step_extra, decode["weights"], decode["extra"]),
            }
    return rows


def fits(peak_gb: float) -> str:
    return ", ".join(f"{g} GB" for g in GPUS if peak_gb < g * 0.93) or "none of 24/40/80 GB"  # ~7% for context/fragments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="JSON path (nothing is written without it)")
    args = parser.parse_args(argv)
    step = transformer_step_peak()
    vae = {"plain": vae_decode_peak(False), "tiled": vae_decode_peak(True)}
    rows = recipe_table(step, vae)
    print("ESTIMATE (fake tensors, no GPU): CogVideoX-5b-sized Mask²DiT, 3 scenes x 49 frames, 480x720, CFG batch 2, bf16")
    print(f"transformer step extra {step['step_extra'] / 1e9:.2f} GB; VAE decode of one scene extra "
          f"{vae['plain']['extra'] / 1e9:.2f} GB ({vae['tiled']['extra'] / 1e9:.2f} GB tiled)")
    lines = ["| recipe | all on GPU: peak | fits | model offload: peak | fits |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['peak_GB']:.1f} GB | {fits(row['peak_GB'])} | {row['peak_model_offload_GB']:.1f} GB "
                     f"| {fits(row['peak_model_offload_GB'])} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        payload = {"estimate": True, "step": step, "vae": vae, "rows": rows, "table": table,
                   "machine": common.machine_info(torch.device("cpu")), "command": " ".join(sys.argv)}
        tmp = args.output + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
