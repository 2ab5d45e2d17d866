"""The paper's mask ablation (its Table 2) and the scene-extension checks, in the Shapes world, in one script.

    python -m diffusers_mask2dit.shapes.ablation --run runs/shapes --out docs/shapes

Conditions, each on the same held-out 3-scene samples (prompts and noise from seeds the training never used):

- ``v1``, ``v2``, ``v3``, ``full``: the model trained (SFT stage) with that mask, sampling with the same mask; the
  four share one training budget (``model-<variant>`` of the run);
- ``separate``: "one prompt per separate generation": every scene generated alone (n = 1) by the v2 model, i.e.
  plain CogVideoX sampling, with its own noise;
- ``shipped``: the package's model (``model-shipped``: the v2 mask with a longer SFT stage), sampling with v2;
- ``extend``: a 4th scene added by ``Mask2DiTPipeline.extend`` to the shipped model's samples (context: their last
  2 scenes, as latents), with a new prompt;
- ``generate_long``: 6-scene videos by the shipped model's ``Mask2DiTPipeline.generate_long`` (first 3 scenes
  together, then one at a time over a window of 3).

Metrics (from decoded pixels, :mod:`.score`): prompt accuracy (share of scenes with colour, shape and direction
right), identity consistency (share of scene pairs with the same background), and the paper's visual, semantic
and sequence consistency through :mod:`diffusers_mask2dit.evaluation` with `ShapesEncoder`. Each is a mean over
samples with a 95% Student-t interval over samples (scenes of one sample are not independent).

Writes ``ablation.json`` (every figure and every sample's readings), ``ablation.md`` (the table, also inserted
into ``README.md`` between the ``shapes-ablation`` markers when ``--readme`` is given) and ``ablation.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..evaluation import evaluate_scenes
from ..evaluation.metrics import mean_interval
from . import model as shapes_model
from . import score, world

EVAL_SEED = 2_000_003  # world seeds (EVAL_SEED, sample): prompts of held-out samples; the training used seed 0
NOISE_SEED = 50_000_000  # torch seeds NOISE_SEED + 16 * sample + k: initial noise of held-out samples
MASK_VARIANTS = ("v1", "v2", "v3", "full")
SHIPPED = "shipped"
MODELS = MASK_VARIANTS + (SHIPPED,)  # the run's model folders, model-<name>
TABLE_ROWS = MASK_VARIANTS + ("separate", SHIPPED)
PAPER_METRICS = ("visual_consistency", "semantic_consistency", "sequence_consistency")
README_START = "<!-- shapes-ablation:start -->"
README_END = "<!-- shapes-ablation:end -->"


def held_out_prompts(sample: int, count: int) -> List[str]:
    """``count`` random world prompts of held-out sample ``sample``."""
    rng = world.scene_rng(EVAL_SEED, sample)
    return [world.sample_scene(rng).prompt for _ in range(count)]


def _generators(samples: Sequence[int], offset: int) -> List[torch.Generator]:
    return [torch.Generator().manual_seed(NOISE_SEED + 16 * sample + offset) for sample in samples]


def _batches(samples: Sequence[int], size: int):
    for start in range(0, len(samples), size):
        yield list(samples[start : start + size])


def _frames(pipe, latents: torch.Tensor, num_scenes: int) -> List[List[np.ndarray]]:
    """Decoded scenes ``[sample][scene] -> (F, H, W, 3)`` float in [0, 1] of latents ``(B, n * f, C, h, w)``."""
    per_scene = latents.shape[1] // num_scenes
    _, scenes = pipe.decode_scenes(latents, [per_scene] * num_scenes, "np")
    return scenes


def score_samples(scenes: Sequence[Sequence[np.ndarray]], prompts: Sequence[Sequence[str]]) -> List[Dict[str, Any]]:
    """Per sample: the scorer's readings and metrics plus the paper's three metrics with `ShapesEncoder`."""
    encoder = score.ShapesEncoder()
    results = []
    for sample_scenes, sample_prompts in zip(scenes, prompts):
        result = score.score_video(sample_scenes, sample_prompts)
        paper = evaluate_scenes(sample_scenes, sample_prompts, encoder)
        result.update({key: paper[key] for key in PAPER_METRICS})
        results.append(result)
    return results


def generate_multiscene(pipe, variant: str, samples: Sequence[int], batch_size: int):
    """The 3 scenes of each held-out sample generated together with ``variant``'s mask (its prompts, its noise).

    Returns ``(prompts, scenes, latents)``: ``[sample][scene]`` prompts, decoded scenes ``(F, H, W, 3)`` in the same
    layout, and the latents ``(B, 3 * f, C, h, w)`` that extension continues from.
    """
    prompts, scenes, latents = [], [], []
    for batch in _batches(samples, batch_size):
        batch_prompts = [held_out_prompts(s, 3) for s in batch]
        output = pipe(prompt=batch_prompts, generator=_generators(batch, 0), output_type="latent",
                      attention_kwargs={"scene_mask": variant}, **shapes_model.generation_kwargs())
        prompts += batch_prompts
        scenes += _frames(pipe, output.frames, 3)
        latents.append(output.frames)
    return prompts, scenes, torch.cat(latents)


def generate_separate(pipe, samples: Sequence[int], batch_size: int):
    """Every scene of each held-out sample generated on its own (n = 1), with its own noise; ``(prompts, scenes)``
    laid out as in `generate_multiscene`."""
    prompts = [held_out_prompts(s, 3) for s in samples]
    scenes: List[List[np.ndarray]] = [[] for _ in samples]
    for scene in range(3):
        for start in range(0, len(samples), batch_size):
            batch = list(samples[start : start + batch_size])
            output = pipe(prompt=[[prompts[start + i][scene]] for i in range(len(batch))], generator=_generators(batch, 1 + scene),
                          output_type="latent", **shapes_model.generation_kwargs())
            for i, frames in enumerate(_frames(pipe, output.frames, 1)):
                scenes[start + i].append(frames[0])
    return prompts, scenes


def run_multiscene(pipe, variant: str, samples: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """3-scene samples generated together with ``variant``'s mask, scored; keeps the latents for extension."""
    prompts, scenes, latents = generate_multiscene(pipe, variant, samples, batch_size)
    return {"prompts": prompts, "samples": score_samples(scenes, prompts), "latents": latents}


def run_separate(pipe, samples: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """Every scene of each sample generated on its own (n = 1), with its own noise, scored."""
    prompts, scenes = generate_separate(pipe, samples, batch_size)
    return {"prompts": prompts, "samples": score_samples(scenes, prompts)}


def run_extend(pipe, samples: Sequence[int], context_latents: torch.Tensor, batch_size: int) -> Dict[str, Any]:
    """A 4th scene for each sample by ``extend``, its context the sample's last two scenes (``context_latents``)."""
    records = []
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        prompts = [held_out_prompts(s, 4) for s in batch]
        frames_per_scene = context_latents.shape[1] // 3
        output = pipe.extend(
            prompt=[[p[3]] for p in prompts], context_prompts=[p[1:3] for p in prompts],
            context_latents=context_latents[start : start + len(batch), frames_per_scene:], generator=_generators(batch, 4),
            output_type="np", **shapes_model.generation_kwargs(height=None, width=None),
        )
        for sample_prompts, window in zip(prompts, output.scene_frames):
            new = score.read_scene(window[-1])
            context = [score.read_scene(frames).background for frames in window[:-1]]
            records.append({"prompt": sample_prompts[3], "reading": new.to_dict(), "context_backgrounds": context,
                            "follows_prompt": new.matches(sample_prompts[3]),
                            "keeps_background": new.background is not None and all(b == new.background for b in context)})
    return {"samples": records}


def run_generate_long(pipe, samples: Sequence[int], num_scenes: int, batch_size: int) -> Dict[str, Any]:
    """``num_scenes``-scene videos by ``generate_long`` (window 3)."""
    records = []
    for batch in _batches(samples, batch_size):
        prompts = [held_out_prompts(s, num_scenes) for s in batch]
        output = pipe.generate_long(prompts, scenes_per_window=3, generator=_generators(batch, 5), output_type="np",
                                    **shapes_model.generation_kwargs())
        for sample_prompts, scenes in zip(prompts, output.scene_frames):
            readings = [score.read_scene(frames) for frames in scenes]
            backgrounds = [r.background for r in readings]
            kept = [backgrounds[i] is not None and backgrounds[i] == backgrounds[i - 1] == backgrounds[i - 2] for i in range(3, num_scenes)]
            records.append({"prompts": sample_prompts, "readings": [r.to_dict() for r in readings],
                            "follows_prompt": [r.matches(p) for r, p in zip(readings, sample_prompts)],
                            "keeps_background": kept, "one_background": backgrounds[0] is not None and len(set(backgrounds)) == 1})
    return {"samples": records}


# ---------------------------------------------------------------------------------------------- summaries


def _interval(values: Sequence[float]) -> Dict[str, Any]:
    stats = mean_interval([100.0 * float(v) for v in values])
    return {key: stats[key] for key in ("n", "mean", "half_width", "low", "high")}


def summarize_condition(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    summary = {
        "prompt_accuracy": _interval([s["prompt_accuracy"] for s in samples]),
        "identity_consistency": _interval([s["identity_consistency"] for s in samples]),
    }
    for key in PAPER_METRICS:
        stats = mean_interval([s[key] for s in samples])
        summary[key] = {k: stats[k] for k in ("n", "mean", "half_width", "low", "high")}
    return summary


def summarize_extension(extend: Dict[str, Any], long: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "extend_follows_prompt": _interval([s["follows_prompt"] for s in extend["samples"]]),
        "extend_keeps_background": _interval([s["keeps_background"] for s in extend["samples"]]),
        "long_follows_prompt": _interval([np.mean(s["follows_prompt"]) for s in long["samples"]]),
        "long_keeps_background": _interval([np.mean(s["keeps_background"]) for s in long["samples"]]),
        "long_one_background": _interval([s["one_background"] for s in long["samples"]]),
    }


def _fmt(stats: Dict[str, Any]) -> str:
    if stats["half_width"] is None:  # one sample: no interval
        return f"{stats['mean']:.1f}"
    return f"{stats['mean']:.1f} ± {stats['half_width']:.1f}"


def markdown_table(summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = [
        f"{meta['num_samples']} held-out 3-scene samples per row (seeds never used in training), mean ± 95% interval "
        "(Student-t over samples). Prompt accuracy: % of scenes whose colour, shape and direction are right; "
        "identity: % of scene pairs with the same background (chance 16.7); visual / semantic / sequence: the "
        "paper's metrics with the `ShapesEncoder` (semantic 70.7 = every prompt word shown).",
    ]
    steps = meta.get("sft_steps", {})
    if steps:
        lines += ["", "SFT steps: " + ", ".join(f"{name} {steps[name]:,}" for name in MODELS if name in steps)
                  + " (separate: the v2 model; shipped: the package's model, the v2 mask trained longer)."]
    lines += [
        "",
        "| condition | prompt accuracy | identity consistency | visual | semantic | sequence |",
        "|---|---|---|---|---|---|",
    ]
    for name, stats in summary["conditions"].items():
        lines.append(
            f"| {name} | {_fmt(stats['prompt_accuracy'])} | {_fmt(stats['identity_consistency'])} | "
            f"{_fmt(stats['visual_consistency'])} | {_fmt(stats['semantic_consistency'])} | {_fmt(stats['sequence_consistency'])} |"
        )
    ext = summary["extension"]
    lines += [
        "",
        "| extension (shipped model) | follows its prompt | keeps the context's background |",
        "|---|---|---|",
        f"| 4th scene by `extend` ({ext['extend_follows_prompt']['n']} samples) | {_fmt(ext['extend_follows_prompt'])} | "
        f"{_fmt(ext['extend_keeps_background'])} |",
        f"| 6-scene `generate_long` ({ext['long_follows_prompt']['n']} videos; all 6 scenes / scenes 4-6) | "
        f"{_fmt(ext['long_follows_prompt'])} | {_fmt(ext['long_keeps_background'])} |",
        f"| 6-scene `generate_long`: all 6 scenes share one background | | {_fmt(ext['long_one_background'])} |",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: Dict[str, Any], path: str) -> str:
    """Bars of prompt accuracy and identity consistency per condition, with 95% intervals (PIL only)."""
    from PIL import Image, ImageDraw

    conditions = list(summary["conditions"])
    metrics = [("prompt_accuracy", (66, 133, 244)), ("identity_consistency", (234, 67, 53))]
    legend = 110  # right margin for the chance line's label, clear of the bars
    width, height, left, bottom, top = 120 * len(conditions) + 80 + legend, 360, 50, 60, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    scale = (height - bottom - top) / 100.0
    y = lambda value: height - bottom - value * scale  # noqa: E731
    for tick in range(0, 101, 20):
        draw.line([(left, y(tick)), (width - 10, y(tick))], fill=(225, 225, 225))
        draw.text((10, y(tick) - 6), f"{tick:>3}", fill="black")
    draw.line([(left, y(100 / 6)), (width - 10, y(100 / 6))], fill=(234, 67, 53), width=1)
    draw.text((width - legend, y(100 / 6) - 14), "identity chance", fill=(234, 67, 53))
    for index, name in enumerate(conditions):
        x0 = left + 20 + 120 * index
        for offset, (metric, colour) in enumerate(metrics):
            stats = summary["conditions"][name][metric]
            x = x0 + 40 * offset
            draw.rectangle([x, y(stats["mean"]), x + 34, y(0)], fill=colour)
            draw.line([(x + 17, y(max(stats["low"], 0))), (x + 17, y(min(stats["high"], 100)))], fill="black", width=2)
        draw.text((x0, height - bottom + 8), name, fill="black")
    draw.text((left, 8), "Shapes world: prompt accuracy (blue) and identity consistency (red), % with 95% intervals", fill="black")
    image.save(path)
    return path


def insert_readme(readme: str, table: str) -> None:
    with open(readme, encoding="utf-8") as handle:
        text = handle.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"`--readme` {readme} has no {README_START} ... {README_END} markers.")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(readme, "w", encoding="utf-8") as handle:
        handle.write(head + README_START + "\n" + table + README_END + tail)


CONDITIONS = TABLE_ROWS + ("extend", "generate_long")
MODEL_OF_CONDITION = {**{v: v for v in MASK_VARIANTS}, "separate": "v2", SHIPPED: SHIPPED, "extend": SHIPPED,
                      "generate_long": SHIPPED}


def weights_fingerprint(folder: str) -> str:
    """SHA-256 over the relative path and SHA-256 of every ``.safetensors`` file under ``folder``: cached results are
    reused only for the weights they were made with."""
    from ..training.checkpoints import file_sha256

    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.endswith(".safetensors"))
    if not paths:
        raise FileNotFoundError(f"{folder} has no .safetensors weights (expected a model folder saved by the pipeline).")
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{os.path.relpath(path, folder)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (for JSON)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class ConditionCache:
    """Each condition's per-sample results in ``<out>/conditions/<name>.json`` (for the shipped model also the
    latents that extension continues from, ``shipped_latents.safetensors``), written atomically: a later run with the
    same settings (sampling options, and per condition the fingerprint of the weights it used, ``inputs``) reuses
    them, so the script resumes, and the conditions of one model can run while the others still train."""

    def __init__(self, out: str, settings: Dict[str, Any]):
        self.folder = os.path.join(out, "conditions")
        self.settings = json.loads(json.dumps(settings))  # results of other samples or sampling options are not reused
        os.makedirs(self.folder, exist_ok=True)

    def _paths(self, name: str) -> Tuple[str, str]:
        return os.path.join(self.folder, f"{name}.json"), os.path.join(self.folder, f"{name}_latents.safetensors")

    def _load(self, name: str, settings: Dict[str, Any], with_latents: bool) -> Optional[Tuple[Any, Optional[torch.Tensor]]]:
        """The saved ``(result, latents)`` of ``name`` if both were made with ``settings``, else None."""
        from safetensors import safe_open

        results_path, latents_path = self._paths(name)
        if not os.path.isfile(results_path):
            return None
        with open(results_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved["settings"] != settings:
            return None
        if not with_latents:
            return saved["result"], None
        if not os.path.isfile(latents_path):
            return None
        with safe_open(latents_path, framework="pt") as handle:
            if json.loads((handle.metadata() or {}).get("settings", "null")) != settings:
                return None
            return saved["result"], handle.get_tensor("latents")

    def get(self, name: str, compute, with_latents: bool = False,
            inputs: Optional[Dict[str, Any]] = None) -> Tuple[Any, Optional[torch.Tensor]]:
        """``(result, latents)`` of ``name``: saved, or ``compute()`` (which returns the same pair) made and saved.
        The latents are written before the results, so results that pass the settings check have their latents."""
        settings = json.loads(json.dumps({**self.settings, **(inputs or {})}))
        saved = self._load(name, settings, with_latents)
        if saved is not None:
            return saved
        from safetensors.torch import save_file

        started = time.time()
        result, latents = compute()
        result = json.loads(json.dumps(result, default=_plain))  # what a later run reads back: plain JSON types
        results_path, latents_path = self._paths(name)
        if with_latents:
            save_file({"latents": latents.contiguous()}, latents_path + ".tmp", metadata={"settings": json.dumps(settings)})
            os.replace(latents_path + ".tmp", latents_path)
        with open(results_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump({"settings": settings, "seconds": round(time.time() - started, 1), "result": result}, handle)
        os.replace(results_path + ".tmp", results_path)
        return result, latents


class RunModels:
    """The run's model folders ``model-<name>``, each loaded once, with the fingerprint of its weights."""

    def __init__(self, run: str):
        self.run = os.path.abspath(run)
        self._pipes: Dict[str, Any] = {}
        self._fingerprints: Dict[str, str] = {}

    def folder(self, name: str) -> str:
        folder = os.path.join(self.run, f"model-{name}")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise FileNotFoundError(
                f"`--run` {self.run} has no model-{name}/ (train it with `python -m diffusers_mask2dit.shapes.retrain "
                f"--out {self.run} --variants {name}`)."
            )
        return folder

    def pipe(self, name: str):
        if name not in self._pipes:
            self._pipes[name] = shapes_model.load_pipeline(self.folder(name))
        return self._pipes[name]

    def inputs(self, condition: str) -> Dict[str, str]:
        """What a condition's results depend on besides the sampling settings: its model's weights."""
        name = MODEL_OF_CONDITION[condition]
        if name not in self._fingerprints:
            self._fingerprints[name] = weights_fingerprint(self.folder(name))
        return {"model": name, "weights": self._fingerprints[name]}

    def sft_steps(self) -> Dict[str, int]:
        """Stage-2 steps of each model, from the run's training configs (when the run has them)."""
        steps = {}
        for name in MODELS:
            path = os.path.join(self.run, "configs", f"train-sft-{name}.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    steps[name] = json.load(handle)["max_train_steps"]
        return steps


def _condition(cache: ConditionCache, models: RunModels, name: str, samples: List[int], long_samples: int, batch_size: int):
    """One condition's per-sample results (from the cache when made before)."""
    if name in MODELS:
        return _multiscene(cache, models, name, samples, batch_size)[0]
    inputs = models.inputs(name)

    def pipe():  # loaded only when the cache has no result
        return models.pipe(MODEL_OF_CONDITION[name])

    if name == "separate":
        return cache.get(name, lambda: (run_separate(pipe(), samples, batch_size), None), inputs=inputs)[0]
    if name == "extend":
        latents = _multiscene(cache, models, SHIPPED, samples, batch_size)[1]
        return cache.get(name, lambda: (run_extend(pipe(), samples, latents, batch_size), None), inputs=inputs)[0]
    return cache.get(name, lambda: (run_generate_long(pipe(), list(range(long_samples)), 6, batch_size), None), inputs=inputs)[0]


def _multiscene(cache: ConditionCache, models: RunModels, name: str, samples: List[int], batch_size: int):
    """``(results, latents)`` of a model's 3-scene samples, sampled with its mask (the shipped model: v2); the latents
    are kept for the shipped model only (extension's context)."""
    def compute():
        made = run_multiscene(models.pipe(name), "v2" if name == SHIPPED else name, samples, batch_size)
        return {"prompts": made["prompts"], "samples": made["samples"]}, made["latents"]

    return cache.get(name, compute, with_latents=name == SHIPPED, inputs=models.inputs(name))


def run_ablation(run: str, out: str, num_samples: int = 200, long_samples: int = 100, batch_size: int = 16,
                 readme: Optional[str] = None, conditions: Sequence[str] = CONDITIONS) -> Optional[Dict[str, Any]]:
    """Generate and score ``conditions`` (each once: see `ConditionCache`); when all are done, write the JSON, the
    table and the plot (and the README section). Returns None while some are missing."""
    samples = list(range(num_samples))
    settings = {"num_samples": num_samples, "long_samples": long_samples, "eval_seed": EVAL_SEED, "noise_seed": NOISE_SEED,
                "generation": shapes_model.generation_kwargs()}
    cache = ConditionCache(out, settings)
    models = RunModels(run)

    from tqdm.auto import tqdm

    details = {}
    for name in tqdm(conditions, desc="ablation conditions"):
        details[name] = _condition(cache, models, name, samples, long_samples, batch_size)
    if set(details) != set(CONDITIONS):
        return None
    summary = {
        "conditions": {name: summarize_condition(details[name]["samples"]) for name in TABLE_ROWS},
        "extension": summarize_extension(details["extend"], details["generate_long"]),
    }
    meta = {**settings, "run": models.run, "sft_steps": models.sft_steps(),
            "weights": {name: models.inputs(name)["weights"] for name in MODELS}}
    with open(os.path.join(out, "ablation.json"), "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "summary": summary, "details": details}, handle, indent=1, default=str)
    table = markdown_table(summary, meta)
    with open(os.path.join(out, "ablation.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    plot(summary, os.path.join(out, "ablation.png"))
    if readme:
        insert_readme(readme, table)
    return {"meta": meta, "summary": summary}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_mask2dit.shapes.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True,
                        help="retrain run folder with model-v1, model-v2, model-v3, model-full and model-shipped")
    parser.add_argument("--out", required=True, help="folder for ablation.json, ablation.md, ablation.png")
    parser.add_argument("--samples", type=int, default=200, help="held-out 3-scene samples per condition (default 200)")
    parser.add_argument("--long-samples", type=int, default=100, help="6-scene generate_long videos (default 100)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readme", default=None, help="README to update between the shapes-ablation markers")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS),
                        help="conditions to make now (default: all; each is made once and kept in <out>/conditions)")
    args = parser.parse_args(argv)
    result = run_ablation(args.run, args.out, args.samples, args.long_samples, args.batch_size, args.readme, args.conditions)
    if result is None:
        print(f"made {', '.join(args.conditions)}; run again with all conditions for the table")
        return 0
    print(markdown_table(result["summary"], result["meta"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
