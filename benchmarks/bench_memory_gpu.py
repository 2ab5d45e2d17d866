"""Inference memory and step time per recipe, measured on a GPU: the counterpart of `bench_memory.py`'s estimate.

A CogVideoX-5b-sized Mask²DiT transformer with random weights, per recipe (``bf16``; ``int8``: torchao weight-only;
``fp8-layerwise``: diffusers' layerwise casting), runs one denoising step as a generation does (3 scenes x 49 frames
at 480x720, 3 x 226 prompt tokens, CFG batch 2, mask v2, the backend "auto" picks); CogVideoX's VAE decodes one
scene, plainly and tiled. Measured: the weights' bytes on the device, each call's peak bytes beyond them
(``torch.cuda.max_memory_allocated``) and the step's time. The T5 text encoder is counted from its size, as in the
estimate; the peaks all on the GPU and with model offload are then put together as `bench_memory.py` does, beside
the estimate's (``benchmarks/results/memory_inference_estimate.json``).

    python benchmarks/bench_memory_gpu.py --device cuda --output memory_gpu.json
    python benchmarks/bench_memory_gpu.py --quick          # CPU, tiny shapes: the same code path in seconds

Nothing is written without ``--output``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_memory import fits, generation_peaks  # noqa: E402

from diffusers_mask2dit import Mask2DiTTransformer3DModel  # noqa: E402
from diffusers_mask2dit.optimization import quantize_transformer  # noqa: E402

RECIPES = ("bf16", "int8", "fp8-layerwise")
SCENES = 3
ESTIMATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory_inference_estimate.json")


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def transformer_row(size: str, recipe: str, device: torch.device, dtype: torch.dtype, repeats: int) -> Dict[str, Any]:
    """Weights, peak extra bytes and time of one 3-scene denoising step (CFG batch 2) under ``recipe``."""
    if recipe == "int8" and importlib.util.find_spec("torchao") is None:
        return {"skipped": "torchao is not installed"}
    before = allocated(device)
    model = Mask2DiTTransformer3DModel.from_cogvideox(
        common.build_random_transformer(size, device, dtype, **common.model_overrides(size))
    ).eval()
    quantize_transformer(model, "none" if recipe == "bf16" else recipe)
    free(device)
    weights = allocated(device) - before if device.type == "cuda" else sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    height, width, frames = common.VIDEO_SIZES[size]
    latent_frames = [(frames - 1) // 4 + 1] * SCENES
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, sum(latent_frames), config.in_channels, height // 8, width // 8, generator=generator)
    text = torch.randn(2, SCENES * config.max_text_seq_length, config.text_embed_dim, generator=generator)
    latents, text = latents.to(device, dtype), text.to(device, dtype)
    timestep = torch.tensor([500, 500], device=device)
    rope = model.prepare_rotary_emb(height // 8, width // 8, latent_frames, device)

    def step():
        with torch.no_grad():
            return model(latents, text, timestep, image_rotary_emb=rope, scene_frames=latent_frames).sample

    extra = common.measure_memory(step, device)  # the first call: also the warm-up
    seconds = []
    for _ in range(repeats):
        common.synchronize(device)
        start = time.perf_counter()
        step()
        common.synchronize(device)
        seconds.append(time.perf_counter() - start)
    del model, latents, text, rope
    free(device)
    return {"weights_bytes": int(weights), "step_extra_bytes": int(extra), "step_seconds": sorted(seconds)[len(seconds) // 2]}


def vae_rows(size: str, device: torch.device, dtype: torch.dtype) -> Dict[str, Dict[str, int]]:
    """Weights and peak extra bytes of decoding one scene, plain and tiled (CogVideoX's VAE; tiny for --quick)."""
    from diffusers import AutoencoderKLCogVideoX

    from diffusers_mask2dit.tiny import build_tiny_components

    vae = (build_tiny_components()["vae"] if size == "quick" else AutoencoderKLCogVideoX()).to(device, dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    height, width, frames = common.VIDEO_SIZES[size]
    channels = vae.config.latent_channels
    latents = torch.randn(1, channels, (frames - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    rows = {}
    for tiled in (False, True):
        if tiled:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        with torch.no_grad():
            extra = common.measure_memory(lambda: vae.decode(latents).sample, device)
        rows["tiled" if tiled else "plain"] = {"weights_bytes": int(weights), "extra_bytes": int(extra)}
    del vae, latents
    free(device)
    return rows


def peaks(row: Dict[str, Any], vae: Dict[str, Dict[str, int]], tiled: bool) -> Dict[str, float]:
    """GB all on the GPU and with model offload, put together from the measured parts as the estimate is."""
    decode = vae["tiled" if tiled else "plain"]
    return generation_peaks(row["weights_bytes"], row["step_extra_bytes"], decode["weights_bytes"], decode["extra_bytes"])


def estimated_rows() -> Dict[str, Any]:
    if not os.path.isfile(ESTIMATE):
        return {}
    with open(ESTIMATE, encoding="utf-8") as handle:
        return json.load(handle).get("rows", {})


def table(rows: Dict[str, Any], vae: Dict[str, Dict[str, int]], estimate: Dict[str, Any]) -> str:
    lines = ["| recipe | step time | all on GPU: peak (estimate) | fits | model offload: peak (estimate) | fits |",
             "|---|---|---|---|---|---|"]
    for recipe, row in rows.items():
        for tiled in (False, True):
            name = recipe + (" + VAE tiling" if tiled else "")
            if "skipped" in row:
                lines.append(f"| {name} | skipped: {row['skipped']} | | | | |")
                continue
            peak = peaks(row, vae, tiled)
            guess = estimate.get(name, {})
            lines.append(
                f"| {name} | {row['step_seconds']:.2f} s | {peak['peak_GB']:.1f} GB ({guess.get('peak_GB', float('nan')):.1f}) "
                f"| {fits(peak['peak_GB'])} | {peak['peak_model_offload_GB']:.1f} GB "
                f"({guess.get('peak_model_offload_GB', float('nan')):.1f}) | {fits(peak['peak_model_offload_GB'])} |"
            )
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    env = common.setup(args)
    device, dtype = env["device"], env["dtype"]
    size = "quick" if args.quick else "cogvideox-5b"
    repeats = args.repeats or (1 if args.quick else 2)
    payload: Dict[str, Any] = {"benchmark": "memory_gpu", "size": size, "complete": False, "rows": {},
                               "machine": common.machine_info(device)}
    payload["vae"] = vae_rows(size, device, dtype)
    for recipe in RECIPES:
        payload["rows"][recipe] = transformer_row(size, recipe, device, dtype, repeats)
        print(f"{recipe}: {payload['rows'][recipe]}", flush=True)
        if args.output:  # after every recipe: what was measured survives a time limit
            common.save_json(payload, "memory_gpu", args, quiet=True)
    payload["table"] = table(payload["rows"], payload["vae"], estimated_rows() if size != "quick" else {})
    payload["complete"] = True
    print(f"-- measured ({device.type}, {size}, {dtype}); in brackets the fake-tensor estimate\n{payload['table']}")
    if args.output:
        common.save_json(payload, "memory_gpu", args)
    return payload


if __name__ == "__main__":
    main()
