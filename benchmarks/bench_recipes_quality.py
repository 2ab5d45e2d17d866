"""What the step caches and quantization recipes cost in quality, and what they save, on the Shapes world.

Every recipe of `diffusers_mask2dit.optimization` that runs on a CPU generates the same held-out 3-scene
samples as the ablation (`shapes.ablation`: its prompts, its noise seeds, its scorer, the shipped model, mask v2),
side by side with the plain pipeline in one run:

- prompt accuracy and identity consistency (mean and 95% interval over samples), and their change from the
  plain pipeline on the same samples (paired: mean and 95% interval of per-sample differences);
- attention calls made (the processors that actually ran) as a share of the plain pipeline's: what a cache
  saves;
- CPU time of generation (process time, decoding and scoring excluded) as a ratio to the plain pipeline's.

    python benchmarks/bench_recipes_quality.py --samples 100 --output benchmarks/results/recipes_quality_cpu.json
    python benchmarks/bench_recipes_quality.py --quick   # 2 samples, 2 recipes: smoke test

On a shared machine the recipes can run as parallel processes, one recipe each (``--recipes int8 --output
int8.json``; the plain pipeline is then one of them), and ``--combine none.json int8.json ...`` makes the table:
quality changes stay paired per sample, and the CPU-time ratios are then of processes that ran at the same time.

Nothing is written without ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info  # noqa: E402

from diffusers_mask2dit.evaluation.metrics import mean_interval  # noqa: E402
from diffusers_mask2dit.optimization import apply_optimizations  # noqa: E402
from diffusers_mask2dit.shapes import ablation  # noqa: E402
from diffusers_mask2dit.shapes import model as shapes_model  # noqa: E402
from diffusers_mask2dit.transformer import Mask2DiTAttnProcessor  # noqa: E402

RECIPES = (
    "none", "first-block:0.05", "first-block:0.1", "first-block:0.2", "pab", "faster", "taylorseer", "magcache",
    "int8", "fp8", "fp8-layerwise",
)
# MagCache skips steps by per-step magnitude ratios that must be measured for each model: one calibration run on
# world prompts and noise of their own (neither the training's seed 0 nor the held-out samples'), then the cache.
CALIBRATION_WORLD_SEED = 3_000_017
CALIBRATION_NOISE_SEED = 7
QUANTIZE = ("int8", "fp8", "fp8-layerwise")
METRICS = ("prompt_accuracy", "identity_consistency")


class CountingProcessor(Mask2DiTAttnProcessor):
    """The scene-attention processor, counting the calls that really run (a cache skips some)."""

    calls = 0

    # The full signature: diffusers hands a processor only the keyword arguments its `__call__` names.
    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 scene_layout=None, scene_options=None, scene_shard=None):
        CountingProcessor.calls += 1
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                scene_layout, scene_options, scene_shard)


def recipe_pipeline(recipe: str):
    pipe = shapes_model.load_pipeline()
    pipe.transformer.set_attn_processor(CountingProcessor())
    if recipe == "magcache":
        return mag_cache_pipeline(pipe)
    if recipe in QUANTIZE:
        return apply_optimizations(pipe, quantize=recipe)
    return apply_optimizations(pipe, cache=recipe)


def mag_cache_pipeline(pipe):
    """``pipe`` with diffusers' MagCache at its default threshold, its ratios calibrated on one 3-scene sample that
    is not a held-out one (diffusers prints the ratios at the end of a calibration run)."""
    import ast
    import contextlib
    import io

    from diffusers import MagCacheConfig

    from diffusers_mask2dit.shapes import world

    kwargs = shapes_model.generation_kwargs()
    steps = kwargs["num_inference_steps"]
    rng = world.scene_rng(CALIBRATION_WORLD_SEED, 0)
    prompts = [world.sample_scene(rng).prompt for _ in range(3)]
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pipe(prompt=prompts, generator=torch.Generator().manual_seed(CALIBRATION_NOISE_SEED), output_type="latent",
             attention_kwargs={"scene_mask": "v2"}, **kwargs)
    pipe.transformer.disable_cache()
    ratios = ast.literal_eval(printed.getvalue().strip().splitlines()[-1])
    print(f"  MagCache ratios from {prompts}: {[round(r, 3) for r in ratios]}", flush=True)
    pipe.transformer.enable_cache(MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps))
    return pipe


def generate(pipe, samples: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """The ablation's v2 3-scene samples: prompts, decoded scenes' scores, attention calls and CPU seconds."""
    prompts, scenes, seconds = [], [], 0.0
    CountingProcessor.calls = 0
    for batch in ablation._batches(list(samples), batch_size):
        batch_prompts = [ablation.held_out_prompts(s, 3) for s in batch]
        start = time.process_time()
        output = pipe(prompt=batch_prompts, generator=ablation._generators(batch, 0), output_type="latent",
                      attention_kwargs={"scene_mask": "v2"}, **shapes_model.generation_kwargs())
        seconds += time.process_time() - start
        prompts += batch_prompts
        scenes += ablation._frames(pipe, output.frames, 3)
        print(f"  {len(scenes)}/{len(samples)} samples", flush=True)
    return {"samples": ablation.score_samples(scenes, prompts), "attention_calls": CountingProcessor.calls, "cpu_seconds": seconds}


def _stats(values: List[float]) -> Dict[str, Any]:
    stats = mean_interval(values)
    return {key: stats[key] for key in ("n", "mean", "half_width", "low", "high")}


def compare(result: Dict[str, Any], plain: Dict[str, Any]) -> Dict[str, Any]:
    row: Dict[str, Any] = {
        "attention_call_share": result["attention_calls"] / plain["attention_calls"],
        "cpu_time_ratio": result["cpu_seconds"] / plain["cpu_seconds"],
    }
    for metric in METRICS:
        ours = [100.0 * s[metric] for s in result["samples"]]
        base = [100.0 * s[metric] for s in plain["samples"]]
        row[metric] = _stats(ours)
        row[metric + "_change"] = _stats([a - b for a, b in zip(ours, base)])
    return row


def _fmt(stats: Dict[str, Any]) -> str:
    half = stats["half_width"]
    return f"{stats['mean']:+.1f} ± {half:.1f}" if half is not None else f"{stats['mean']:+.1f}"


def markdown(rows: Dict[str, Dict[str, Any]], samples: int) -> str:
    lines = [
        f"{samples} held-out Shapes samples (3 scenes, v2, shipped model); change: paired, vs `none` on the same samples.",
        "",
        "| recipe | prompt accuracy | change | identity | change | attention calls | CPU time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['prompt_accuracy']['mean']:.1f} | {_fmt(row['prompt_accuracy_change'])} | "
            f"{row['identity_consistency']['mean']:.1f} | {_fmt(row['identity_consistency_change'])} | "
            f"{row['attention_call_share']:.2f}× | {row['cpu_time_ratio']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="2 samples, the plain pipeline and first-block:0.2")
    parser.add_argument("--output", default=None, help="JSON path (nothing is written without it)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON", help="make the table of one-recipe runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples, recipes = (2, ["none", "first-block:0.2"]) if args.quick else (args.samples, args.recipes)
    if args.combine:
        return combine(args.combine, args.output)
    if len(recipes) > 1:
        recipes = ["none"] + [r for r in recipes if r != "none"]
    results, rows = {}, {}
    for recipe in recipes:
        results[recipe] = generate(recipe_pipeline(recipe), range(samples), args.batch_size)
        rows[recipe] = compare(results[recipe], results.get("none", results[recipe]))
        print(f"{recipe}: {rows[recipe]['prompt_accuracy']['mean']:.1f} / {rows[recipe]['identity_consistency']['mean']:.1f}, "
              f"{rows[recipe]['attention_call_share']:.2f}x attention calls, {rows[recipe]['cpu_time_ratio']:.2f}x CPU time", flush=True)
        if args.output:  # after every recipe: a long run stopped early keeps what it finished
            write_report(args.output, samples, rows, results)
    print(markdown(rows, samples))
    return 0


def combine(paths: Sequence[str], output: str) -> int:
    """The table of one-recipe runs made side by side (their ``results``), against the one of ``none``."""
    results: Dict[str, Any] = {}
    for path in paths:
        with open(path) as handle:
            results.update(json.load(handle)["results"])
    if "none" not in results:
        raise SystemExit("--combine: one of the files must hold the plain pipeline's run (--recipes none)")
    rows = {name: compare(result, results["none"]) for name, result in results.items()}
    samples = len(results["none"]["samples"])
    print(markdown(rows, samples))
    if output:
        write_report(output, samples, rows, results)
    return 0


def write_report(path: str, samples: int, rows: Dict[str, Any], results: Dict[str, Any]) -> None:
    """The table, the rows and per recipe what `combine` needs: counts, seconds and each sample's two metrics."""
    kept = {
        name: {**{k: v for k, v in result.items() if k != "samples"},
               "samples": [{metric: sample[metric] for metric in METRICS} for sample in result["samples"]]}
        for name, result in results.items()
    }
    report = {"samples": samples, "rows": rows, "table": markdown(rows, samples), "machine": machine_info(torch.device("cpu")),
              "command": " ".join(sys.argv), "results": kept}
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(report, handle, indent=1, default=float)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
