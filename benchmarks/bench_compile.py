"""Compiled vs eager: one transformer step of Mask²DiT (3 scenes) and of stock CogVideoX (one prompt, the same
latent frames), on the same random model, side by side in one run.

For each model: eager, ``torch.compile(fullgraph=True)`` (whole model) and ``compile_repeated_blocks`` (regional,
ours and stock alike); the first compiled call's time (compilation) is reported apart, then the median of timed
calls, round-robin (`common.time_round_robin`). Ratios: compiled / eager for each model.

    python benchmarks/bench_compile.py --threads 2            # a mid-size CPU model
    python benchmarks/bench_compile.py --quick                # tiny shapes (compilation still takes minutes on 2 cores)
    python benchmarks/bench_compile.py --device cuda          # bf16 on a GPU

Nothing is written without ``--output``.
"""

from __future__ import annotations

import sys
import os
import time
from typing import Any, Callable, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from diffusers_mask2dit import Mask2DiTTransformer3DModel  # noqa: E402

SCENES = 3


def _step_inputs(config: Dict[str, Any], size: str, device, dtype, scenes: int):
    height, width, frames = common.VIDEO_SIZES[size]
    latent_frames = (frames - 1) // 4 + 1
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, scenes * latent_frames, config["in_channels"], height // 8, width // 8, generator=generator)
    text = torch.randn(2, scenes * config["max_text_seq_length"], config["text_embed_dim"], generator=generator)
    return latents.to(device, dtype), text.to(device, dtype), torch.tensor([500, 500], device=device), latent_frames


MODES = ("eager", "full", "blocks")


def make_calls(size: str, device: torch.device, dtype: torch.dtype, modes=MODES) -> Dict[str, Callable[[], Any]]:
    """Name -> a no-grad step: ours (3 scenes) and stock (1 prompt, same frames), in each of ``modes``."""
    config = common.transformer_config(size)
    calls = {}
    for name in ("mask2dit", "cogvideox"):
        for mode in modes:
            model = common.build_random_transformer(size, device, dtype)
            scenes = SCENES if name == "mask2dit" else 1
            if name == "mask2dit":
                model = Mask2DiTTransformer3DModel.from_cogvideox(model)
            latents, text, timestep, latent_frames = _step_inputs(config, size, device, dtype, SCENES)
            text = text[:, : scenes * config["max_text_seq_length"]]
            from diffusers_mask2dit.transformer import scene_rotary_emb

            frames = [latent_frames] * SCENES
            rope = scene_rotary_emb(model.config, latents.shape[-2], latents.shape[-1], frames if scenes > 1 else sum(frames), device)
            kwargs = {"scene_frames": frames} if name == "mask2dit" else {}
            if mode == "full":
                model.compile(fullgraph=True)
            elif mode == "blocks" and model._repeated_blocks:
                model.compile_repeated_blocks(fullgraph=True)
            elif mode == "blocks":  # stock CogVideoX declares no `_repeated_blocks`: the same, block by block
                for block in model.transformer_blocks:
                    block.compile(fullgraph=True)

            def step(model=model, latents=latents, text=text, timestep=timestep, rope=rope, kwargs=kwargs):
                with torch.no_grad():
                    return model(latents, text, timestep, image_rotary_emb=rope, **kwargs).sample

            calls[f"{name}/{mode}"] = step
    return calls


def main(argv=None) -> Dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="eager and compile modes to time (a 5b model each; eager is always kept)")
    args = parser.parse_args(argv)
    env = common.setup(args)
    device, dtype = env["device"], env["dtype"]
    size = "quick" if args.quick else "cpu-mid" if device.type == "cpu" else "cogvideox-5b"
    modes = ["eager"] + [mode for mode in args.modes if mode != "eager"]
    calls = make_calls(size, device, dtype, modes)
    first = {}
    for name, call in calls.items():  # the first call compiles
        start = time.perf_counter()
        call()
        common.synchronize(device)
        first[name] = time.perf_counter() - start
        print(f"{name}: first call {first[name]:.1f} s", flush=True)
    timings = common.time_round_robin(calls, device, repeats=args.repeats or (2 if args.quick else 5), warmup=args.warmup or 1)
    rows, results = [], {"first_call_seconds": first, "timings": timings, "ratios": {}}
    for name in ("mask2dit", "cogvideox"):
        eager = timings[f"{name}/eager"]["median_s"]
        for mode in modes[1:]:
            ratio = common.ratio(timings[f"{name}/{mode}"]["median_s"], eager)
            results["ratios"][f"{name}/{mode}_over_eager"] = ratio
            rows.append([name, mode, common.fmt_time(eager), common.fmt_time(timings[f"{name}/{mode}"]["median_s"]),
                         common.fmt_ratio(ratio), f"{first[f'{name}/{mode}']:.0f} s"])
    common.print_table(f"-- compiled vs eager, one transformer step ({size}, {dtype}, {device.type})",
                       ["model", "compile", "eager", "compiled", "compiled / eager", "first call"], rows)
    if args.output:
        common.save_json({"benchmark": "compile", "size": size, "results": results}, "compile", args)
    return results


if __name__ == "__main__":
    main()
