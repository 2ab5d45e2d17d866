"""The paper's Table 3 in miniature: the relevance threshold of ``prepare-data``, in the Shapes world.

    python -m diffusers_mask2dit.shapes.films_table --run /work/runs/i24/table3 --steps 600

Steps (each skipped when its output exists, so the command resumes):

1. ``films/``: Shapes films (:mod:`.films`, 30% of cuts switch to an unrelated story);
2. ``data/``: ``mask2dit prepare-data`` on them once (the exact scorer as encoder, the ground-truth captioner), then
   regrouped at every threshold: ``data/sft-t<threshold>.json`` and ``data/report-t<threshold>.json``;
3. per threshold: ``mask2dit precompute`` and ``mask2dit train`` (stage ``sft``, mask v2, ``cond_prob`` 0.5, the
   settings of ``Recipe.sft`` with ``--steps`` steps), all from the same transformer (``--transformer``; default:
   the package's shipped Shapes model);
4. per threshold: the held-out samples of :mod:`.ablation` (same prompts and noise), scored with the exact
   scorer and the paper's metrics (``scores/t<threshold>.json``), and a contact sheet of the first few
   (``sheets/t<threshold>.png``); then ``table.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

from . import ablation, films
from . import model as shapes_model
from .retrain import Recipe, Run, _write_json

THRESHOLDS = (0.0, 0.3, 0.6)
NUM_FILMS = 150
SHOTS_PER_FILM = 8
UNRELATED_FRACTION = 0.3
FILMS_SEED = 1  # the ablation's held-out prompts use their own seed (ablation.EVAL_SEED)
# The paper's Table 3 (ViCLIP, 256x384): threshold -> (visual, semantic, sequence) consistency; CogVideoX: no SFT.
PAPER_TABLE3 = {"CogVideoX": (55.01, 22.64, 38.82), "0.0": (63.94, 24.31, 44.13), "0.6": (66.46, 23.96, 45.21),
                "0.7": (67.71, 23.98, 45.85), "0.8": (73.22, 23.54, 48.38)}


def prepare_options(threshold: float):
    from ..data import DetectOptions, PrepareOptions

    return PrepareOptions(
        num_scenes=3, min_similarity=threshold, detect=DetectOptions(threshold=4.0, min_shot_frames=8), num_frames=9,
        height=48, width=48, encoder="diffusers_mask2dit.shapes.films:encoder",
        captioner="diffusers_mask2dit.shapes.films:captioner", progress=False,
    )


def name_of(threshold: float) -> str:
    return f"t{threshold:.1f}"


def prepare_sets(run: Run, thresholds: Sequence[float]) -> None:  # noqa: D103
    """``data/sft-<name>.json`` for every threshold (the per-video work is done once, then only regrouped)."""
    from ..data import prepare_data

    for threshold in thresholds:
        name = name_of(threshold)
        prepare_data(run.path("films"), run.path("data"), prepare_options(threshold))
        shutil.copyfile(run.path("data", "report.json"), run.path("data", f"report-{name}.json"))
        shutil.copyfile(run.path("data", "sft.json"), run.path("data", f"sft-{name}.json"))


def sft_config(run: Run, threshold: float, steps: int, transformer: str, recipe: Optional[Recipe] = None) -> Dict[str, Any]:
    recipe = recipe or Recipe()
    name = name_of(threshold)
    return dict(recipe.common, num_scenes=3, **dict(recipe.sft, max_train_steps=steps), mask_variant="v2",
                pretrained_model_name_or_path=shapes_model.shipped_model_path(), transformer_path=transformer,
                data_file=run.path("data", f"sft-{name}.json"), cache_dir=run.path("cache", name),
                output_dir=run.path("train", name))


def score_threshold(run: Run, threshold: float, num_samples: int, batch_size: int) -> None:
    from ..transformer import Mask2DiTTransformer3DModel

    name = name_of(threshold)
    pipe = shapes_model.load_pipeline()
    pipe.transformer = Mask2DiTTransformer3DModel.from_pretrained(run.path("train", name, "transformer"))
    made = ablation.run_multiscene(pipe, "v2", list(range(num_samples)), batch_size)
    summary = ablation.summarize_condition(made["samples"])
    _write_json({"threshold": threshold, "summary": summary, "prompts": made["prompts"], "samples": made["samples"]},
                run.path("scores", f"{name}.json"))


SHEET_SAMPLES = 4  # held-out samples drawn per row's contact sheet, to look at next to the scores


def sheet_threshold(run: Run, threshold: float) -> None:
    """``sheets/<name>.png``: the first `SHEET_SAMPLES` scored samples of a row (same prompts and noise), one line per
    scene labelled with its prompt."""
    from ..transformer import Mask2DiTTransformer3DModel
    from ..video_io import contact_sheet

    name = name_of(threshold)
    pipe = shapes_model.load_pipeline()
    pipe.transformer = Mask2DiTTransformer3DModel.from_pretrained(run.path("train", name, "transformer"))
    prompts, videos, _ = ablation.generate_multiscene(pipe, "v2", range(SHEET_SAMPLES), SHEET_SAMPLES)
    scenes = [scene for video in videos for scene in video]
    labels = [f"{sample + 1}.{scene + 1}: {prompt}" for sample, scene_prompts in enumerate(prompts)
              for scene, prompt in enumerate(scene_prompts)]
    os.makedirs(run.path("sheets"), exist_ok=True)
    contact_sheet(scenes, run.path("sheets", f"{name}.png"), labels=labels)


def table(run: Run, thresholds: Sequence[float], steps: int, transformer: str) -> str:
    """``table.md`` (and ``table.json``) from the scores and the data reports."""
    rows, data, missing = [], {}, []
    for threshold in sorted(thresholds):
        name = name_of(threshold)
        if not os.path.isfile(run.path("scores", f"{name}.json")):
            missing.append(f"{threshold:.1f}")
            continue
        with open(run.path("scores", f"{name}.json"), encoding="utf-8") as handle:
            summary = json.load(handle)["summary"]
        with open(run.path("data", f"report-{name}.json"), encoding="utf-8") as handle:
            groups = json.load(handle)["groups"]
        data[name] = {"summary": summary, "groups": groups}
        cells = [ablation._fmt(summary[key]) for key in ("prompt_accuracy", "identity_consistency", *ablation.PAPER_METRICS)]
        rows.append(f"| {threshold:.1f} | {groups['kept']} of {groups['total']} | " + " | ".join(cells) + " |")
    samples = next(iter(data.values()))["summary"]["prompt_accuracy"]["n"] if data else 0
    text = "\n".join([
        f"SFT from `{transformer}` for {steps:,} steps per row (equal budget); {samples} held-out 3-scene samples per row "
        "(the ablation's), mean ± 95% interval (Student-t over samples)."
        + (f" Rows not finished yet: {', '.join(missing)}." if missing else ""),
        "",
        "| min similarity | groups kept | prompt accuracy | identity consistency | visual | semantic | sequence |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The paper's Table 3 (ViCLIP, 256x384; visual / semantic / sequence): "
        + "; ".join(f"{key} {v:.2f} / {s:.2f} / {q:.2f}" for key, (v, s, q) in PAPER_TABLE3.items()) + ".",
    ])
    _write_json({"steps": steps, "transformer": transformer, "rows": data, "missing": missing}, run.path("table.json"))
    with open(run.path("table.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return text


def share_latents(run: Run, name: str) -> None:
    """Point ``cache/<name>/latents`` at one ``cache/latents`` folder: the thresholds' sets share clips, and a clip's
    latents depend only on the clip and the settings, so each clip is encoded once for all sets."""
    os.makedirs(run.path("cache", "latents"), exist_ok=True)
    link = run.path("cache", name, "latents")
    if not os.path.lexists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.join("..", "latents"), link)


def films_table(out: str, thresholds: Sequence[float] = THRESHOLDS, steps: int = 600, transformer: Optional[str] = None,
                num_samples: int = 200, batch_size: int = 16, threads: Optional[int] = None, num_films: int = NUM_FILMS,
                in_process: bool = False, recipe: Optional[Recipe] = None) -> str:
    """Run every step (see the module doc) into ``out``; returns the table's markdown. ``in_process``: the
    ``mask2dit`` commands in this interpreter; ``recipe``: training settings other than ``Recipe()``'s (tests)."""
    run = Run(out, threads, in_process)
    transformer = os.path.abspath(transformer or os.path.join(shapes_model.shipped_model_path(), "transformer"))
    run.step("films", run.path("films", "truth.jsonl"),
             lambda: films.write_films(run.path("films"), num_films, SHOTS_PER_FILM, UNRELATED_FRACTION, FILMS_SEED))
    run.step("prepare", run.path("data", f"sft-{name_of(thresholds[-1])}.json"), lambda: prepare_sets(run, thresholds))
    for threshold in thresholds:
        name = name_of(threshold)
        config = sft_config(run, threshold, steps, transformer, recipe)
        precompute = {key: value for key, value in config.items() if key != "transformer_path"}
        share_latents(run, name)
        run.step(f"precompute {name}", os.path.join(config["cache_dir"], "cache_index.json"),
                 lambda precompute=precompute, name=name: run.mask2dit("precompute", precompute, f"precompute-{name}"))
        run.step(f"train {name}", os.path.join(config["output_dir"], "transformer"),
                 lambda config=config, name=name: run.mask2dit("train", config, f"train-{name}"))
        run.step(f"score {name}", run.path("scores", f"{name}.json"),
                 lambda threshold=threshold: score_threshold(run, threshold, num_samples, batch_size))
        run.step(f"sheet {name}", run.path("sheets", f"{name}.png"), lambda threshold=threshold: sheet_threshold(run, threshold))
    return table(run, thresholds, steps, transformer)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_mask2dit.shapes.films_table",
                                     description="Table 3 in miniature: SFT sets at several relevance thresholds.")
    parser.add_argument("--run", required=True, help="run folder (resumable)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--steps", type=int, default=600, help="SFT steps per threshold (equal budget)")
    parser.add_argument("--transformer", default=None, help="transformer folder to fine-tune (default: the shipped model's)")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-only", action="store_true", help="only write the table of the rows scored so far")
    parser.add_argument("--films", type=int, default=NUM_FILMS, help=f"films of {SHOTS_PER_FILM} shots (default {NUM_FILMS})")
    args = parser.parse_args(argv)
    if args.table_only:
        transformer = args.transformer or os.path.join(shapes_model.shipped_model_path(), "transformer")
        print(table(Run(args.run), args.thresholds, args.steps, os.path.abspath(transformer)))
        return 0
    print(films_table(args.run, args.thresholds, args.steps, args.transformer, args.num_samples, args.batch_size, args.threads,
                      args.films))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
