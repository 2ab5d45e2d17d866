"""Training-free multi-prompt generation (DiTCtrl) against Mask²DiT in the Shapes world, in one script.

    python -m diffusers_mask2dit.shapes.ditctrl_comparison --stock runs/shapes/model-stock --out docs/shapes

Conditions, each on the ablation's held-out 3-prompt sets (:mod:`.ablation`: prompts and noise from seeds the
training never used; sampling 20 steps, guidance 3 for every condition):

- ``separate``: the single-scene ``stock`` model (`retrain --variants stock`), each prompt generated alone;
- ``ditctrl``: the stock model with `Mask2DiTPipeline.generate_ditctrl` (`DITCTRL_SETTINGS`: DiTCtrl's defaults
  scaled to this model, never tuned on these samples);
- ``mask2dit``: the shipped Mask²DiT model, the 3 scenes generated together (mask v2);
- ``ditctrl-mask2dit``: ``generate_ditctrl`` on the shipped Mask²DiT model used as a single-scene CogVideoX.

Per sample, from decoded pixels (:mod:`.score`): prompt accuracy of each prompt's segment (DiTCtrl: the prompt's
own tile, decoded alone like a scene), identity consistency (same background across the segments), the paper's
visual / semantic / sequence consistency with `ShapesEncoder`, and DiTCtrl's CSCV over the whole video (DiTCtrl:
the video with its transition tiles, decoded at once; the others: their scenes one after the other). Means with 95%
Student-t intervals over samples; time per video is the wall-clock of a condition over its samples (batched).
Results are kept per condition (`ablation.ConditionCache`), so the script resumes and the shipped model's rows can
be made before the stock model exists. Writes ``ditctrl.json`` and ``ditctrl.md`` (and the README section between
the ``shapes-ditctrl`` markers with ``--readme``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..evaluation import metrics
from ..evaluation.encoders import encode_frame_embeddings
from . import model as shapes_model
from . import score
from .ablation import (
    EVAL_SEED,
    NOISE_SEED,
    ConditionCache,
    _batches,
    _fmt,
    _generators,
    generate_multiscene,
    generate_separate,
    held_out_prompts,
    score_samples,
    summarize_condition,
    weights_fingerprint,
)

NUM_PROMPTS = 3
# DiTCtrl's defaults on this model: tiles of the clip length the model was trained on (9 frames, 3 latent frames),
# overlap a third of the tile (1 latent frame: DiTCtrl's 4 of 13), 2 transition tiles, KV-sharing in DiTCtrl's share
# of the steps (2-25 of 50 -> 1-10 of 20) and of the blocks (25-30 of 30 -> block 3 of 4).
DITCTRL_SETTINGS = dict(temporal_tile_size=9, temporal_overlap=4, num_transition_tiles=2, kv_sharing=True)
CONDITIONS = ("separate", "ditctrl", "mask2dit", "ditctrl-mask2dit")
MODEL_OF_CONDITION = {"separate": "stock", "ditctrl": "stock", "mask2dit": "shipped", "ditctrl-mask2dit": "shipped"}
README_START = "<!-- shapes-ditctrl:start -->"
README_END = "<!-- shapes-ditctrl:end -->"


def video_cscv(frames: np.ndarray) -> float:
    """DiTCtrl's CSCV of a whole video ``(F, H, W, 3)`` with the `ShapesEncoder` frame embeddings."""
    return metrics.cscv(encode_frame_embeddings(score.ShapesEncoder(), frames))


def _score(scenes: List[List[np.ndarray]], prompts: List[List[str]], videos: List[np.ndarray]) -> List[Dict[str, Any]]:
    """`ablation.score_samples` plus the CSCV of each sample's whole video."""
    results = score_samples(scenes, prompts)
    for result, video in zip(results, videos):
        result["cscv"] = video_cscv(video)
    return results


def run_separate(pipe, samples: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """Each prompt of a sample generated alone (one scene, its own noise: the ablation's ``separate`` seeds)."""
    prompts, scenes = generate_separate(pipe, samples, batch_size)
    return {"prompts": prompts, "samples": _score(scenes, prompts, [np.concatenate(s) for s in scenes])}


def run_mask2dit(pipe, samples: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """The 3 scenes of a sample generated together with the v2 mask (the ablation's ``shipped`` seeds)."""
    prompts, scenes, _ = generate_multiscene(pipe, "v2", samples, batch_size)
    return {"prompts": prompts, "samples": _score(scenes, prompts, [np.concatenate(s) for s in scenes])}


def run_ditctrl(pipe, samples: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """One video per sample by ``generate_ditctrl`` (its noise from seed offset 8, unused by the ablation)."""
    prompts, scenes, videos = [], [], []
    kwargs = shapes_model.generation_kwargs()
    kwargs.pop("num_frames")
    for batch in _batches(samples, batch_size):
        batch_prompts = [held_out_prompts(s, NUM_PROMPTS) for s in batch]
        output = pipe.generate_ditctrl(batch_prompts, generator=_generators(batch, 8), output_type="np",
                                       **DITCTRL_SETTINGS, **kwargs)
        prompts += batch_prompts
        scenes += [[np.asarray(scene) for scene in sample] for sample in output.scene_frames]
        videos += list(output.frames)
    return {"prompts": prompts, "samples": _score(scenes, prompts, videos)}


RUNNERS = {"separate": run_separate, "ditctrl": run_ditctrl, "mask2dit": run_mask2dit, "ditctrl-mask2dit": run_ditctrl}


def make_condition(cache: ConditionCache, name: str, model_dir: str, samples: List[int], batch_size: int) -> Dict[str, Any]:
    """One condition's results (from the cache when made before with the same weights), with seconds per video."""
    def compute():
        pipe = shapes_model.load_pipeline(model_dir)
        started = time.perf_counter()
        result = RUNNERS[name](pipe, samples, batch_size)
        result["seconds_per_video"] = (time.perf_counter() - started) / len(samples)
        return result, None

    inputs = {"model": MODEL_OF_CONDITION[name], "weights": weights_fingerprint(model_dir), "ditctrl": DITCTRL_SETTINGS}
    return cache.get(name, compute, inputs=inputs)[0]


def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
    summary = summarize_condition(result["samples"])
    stats = metrics.mean_interval([s["cscv"] for s in result["samples"]])
    summary["cscv"] = {k: stats[k] for k in ("n", "mean", "half_width", "low", "high")}
    summary["seconds_per_video"] = result["seconds_per_video"]
    return summary


def markdown_table(summary: Dict[str, Dict[str, Any]], num_samples: int) -> str:
    lines = [
        f"{num_samples} held-out 3-prompt sets per row (the ablation's samples), mean ± 95% interval (Student-t over "
        "samples). Prompt accuracy: % of prompt segments with colour, shape and direction right; identity: % of segment "
        "pairs with the same background (chance 16.7); visual / semantic / sequence: the paper's metrics with the "
        "`ShapesEncoder`; CSCV: DiTCtrl's steadiness of consecutive frames over the whole video (lower is steadier); "
        "time: seconds per video on this project's shared 2-core CPU, batches of 16.",
        "",
        "| condition | model | prompt accuracy | identity consistency | visual | semantic | sequence | CSCV | s / video |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, stats in summary.items():
        cscv = stats["cscv"]
        cscv_text = f"{cscv['mean']:.3f}" + ("" if cscv["half_width"] is None else f" ± {cscv['half_width']:.3f}")
        lines.append(
            f"| {name} | {MODEL_OF_CONDITION[name]} | {_fmt(stats['prompt_accuracy'])} | {_fmt(stats['identity_consistency'])} | "
            f"{_fmt(stats['visual_consistency'])} | {_fmt(stats['semantic_consistency'])} | "
            f"{_fmt(stats['sequence_consistency'])} | {cscv_text} | {stats['seconds_per_video']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def insert_readme(readme: str, table: str) -> None:
    with open(readme, encoding="utf-8") as handle:
        text = handle.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"`--readme` {readme} has no {README_START} ... {README_END} markers.")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    with open(readme + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(head + README_START + "\n" + table + README_END + tail)
    os.replace(readme + ".tmp", readme)


def run_comparison(stock: Optional[str], out: str, conditions: Sequence[str] = CONDITIONS, num_samples: int = 200,
                   batch_size: int = 16, readme: Optional[str] = None) -> Dict[str, Any]:
    """Make ``conditions`` (each once, see `ConditionCache`), then write the table of every condition made so far."""
    samples = list(range(num_samples))
    settings = {"num_samples": num_samples, "eval_seed": EVAL_SEED, "noise_seed": NOISE_SEED,
                "generation": shapes_model.generation_kwargs()}
    cache = ConditionCache(out, settings)
    models = {"stock": stock, "shipped": shapes_model.shipped_model_path()}
    from tqdm.auto import tqdm

    for name in tqdm(conditions, desc="DiTCtrl comparison"):
        if models[MODEL_OF_CONDITION[name]] is None:
            raise ValueError(f"Condition {name} runs on the stock model: pass `--stock` (a folder made by "
                             "`python -m diffusers_mask2dit.shapes.retrain --out RUN --variants stock`: RUN/model-stock).")
        make_condition(cache, name, models[MODEL_OF_CONDITION[name]], samples, batch_size)
    summary = {}
    for name in CONDITIONS:  # every condition with results for the current weights, in table order
        model_dir = models[MODEL_OF_CONDITION[name]]
        if model_dir is not None and (name in conditions or os.path.isfile(os.path.join(cache.folder, f"{name}.json"))):
            summary[name] = summarize(make_condition(cache, name, model_dir, samples, batch_size))
    table = markdown_table(summary, num_samples)
    with open(os.path.join(out, "ditctrl.json"), "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "ditctrl": DITCTRL_SETTINGS, "summary": summary}, handle, indent=1)
    with open(os.path.join(out, "ditctrl.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    if readme:
        insert_readme(readme, table)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_mask2dit.shapes.ditctrl_comparison", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stock", default=None, help="the stock model folder (retrain --variants stock: RUN/model-stock)")
    parser.add_argument("--out", required=True, help="folder for ditctrl.json, ditctrl.md and the per-condition cache")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--samples", type=int, default=200, help="held-out 3-prompt sets per condition (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readme", default=None, help="README to update between the shapes-ditctrl markers")
    args = parser.parse_args(argv)
    summary = run_comparison(args.stock, args.out, args.conditions, args.samples, args.batch_size, args.readme)
    print(markdown_table(summary, args.samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
