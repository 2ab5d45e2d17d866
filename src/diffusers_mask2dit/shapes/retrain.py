"""Retrain the Shapes model from scratch, reproducibly, on a CPU: one command, resumable.

    python -m diffusers_mask2dit.shapes.retrain --out runs/shapes            # data, VAE, shipped model -> model-shipped
    python -m diffusers_mask2dit.shapes.retrain --out runs/shapes --variants shipped v2 v1 v3 full   # + the ablation's
    python -m diffusers_mask2dit.shapes.retrain --out runs/shapes --install  # copy model-shipped into the package

Steps (each skipped when its "done" marker ``steps/<step>.done`` exists, written atomically after the step's output
is complete, so an interrupted run continues where it stopped and a half-written output is made again; the
trainer itself resumes from its last checkpoint):

1. ``data/``: the world's dataset (lossless mp4 clips, the authors' pretraining CSV and SFT JSON);
2. ``vae/``: the `AutoencoderKLCogVideoX` trained on rendered clips (:mod:`.vae`), with its held-out PSNR report;
3. ``base/``: a diffusers folder with that VAE, the tokenizer, the frozen random T5, a random CogVideoX-5b-style
   transformer and the scheduler;
4. ``mask2dit precompute`` of both stages' clips (VAE posterior and T5 embeddings, float32);
5. ``mask2dit train`` stage ``pretrain`` (n unrelated scenes per sample, mask v2), then for every variant stage
   ``sft`` (n scenes of one video, conditional samples with ``cond_prob`` 0.5) from the pretrained transformer
   with that variant's mask: the ablation's variants share stage 1 and get the same stage-2 budget. ``shipped`` is
   the v2 mask with a longer stage 2 (``Recipe.shipped_sft_steps``): the model the package ships;
6. ``model-<variant>/``: the base folder with the trained transformer, loadable by ``Mask2DiTPipeline``.

``stock`` is a plain single-scene CogVideoX of this world (stage 1's settings and cache on one clip per sample,
from the random transformer, no SFT): the base model of the training-free DiTCtrl comparison.

The configs passed to ``mask2dit`` are written to ``configs/`` and the wall-clock of each step to
``timings.json``. All randomness is seeded; on the same software the result is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from . import model as shapes_model
from . import world

ABLATION_VARIANTS = ("v2", "v1", "v3", "full")  # one stage-2 budget for all: the ablation compares masks
SHIPPED = "shipped"  # the v2 mask trained longer in stage 2: the package's model
STOCK = "stock"  # single clips, no scene mask: the plain CogVideoX that DiTCtrl-style sampling runs on
VARIANTS = (SHIPPED,) + ABLATION_VARIANTS + (STOCK,)


@dataclass
class Recipe:
    """Everything a retraining run depends on (with the seeds inside: same recipe, same software -> same model)."""

    num_videos: int = 1000  # SFT videos of 3 scenes; their 3000 clips are also the pretraining clips
    num_scenes: int = 3
    data_seed: int = 0
    vae: Dict[str, Any] = field(default_factory=lambda: dict(steps=4000, batch_size=4, learning_rate=2e-3, kl_weight=1e-4, seed=0))
    common: Dict[str, Any] = field(default_factory=lambda: dict(
        frames_per_scene=[world.FRAMES], height=world.HEIGHT, width=world.WIDTH, finetune="full", mixed_precision="no",
        gradient_checkpointing=False, cache_dtype="float32", train_batch_size=8, max_grad_norm=1.0, adam_weight_decay=0.0,
        report_to="none", checkpointing_steps=500, checkpoints_total_limit=1, resume_from_checkpoint="latest", seed=0,
    ))
    pretrain: Dict[str, Any] = field(default_factory=lambda: dict(
        stage="pretrain", mask_variant="v2", max_train_steps=7000, learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=200,
        caption_dropout=0.1,
    ))
    sft: Dict[str, Any] = field(default_factory=lambda: dict(
        stage="sft", cond_prob=0.5, max_train_steps=3000, learning_rate=5e-4, lr_scheduler="cosine", lr_warmup_steps=100,
        caption_dropout=0.1,
    ))
    shipped_sft_steps: int = 10000  # stage 2 of the shipped model (same settings as `sft` otherwise)

    @classmethod
    def smoke(cls) -> "Recipe":
        """A seconds-long recipe for tests: the same steps on a handful of clips."""
        recipe = cls(num_videos=4, vae=dict(steps=2, batch_size=1, learning_rate=1e-3, kl_weight=1e-4, seed=0, eval_every=2,
                                             eval_clips=2, final_eval_clips=2, progress=False))
        recipe.common.update(train_batch_size=1, checkpointing_steps=2)
        recipe.pretrain.update(max_train_steps=2, lr_warmup_steps=0)
        recipe.sft.update(max_train_steps=2, lr_warmup_steps=0)
        recipe.shipped_sft_steps = 3
        return recipe


def _write_json(data: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())  # the rename must never publish a file whose bytes are not on disk yet
    os.replace(tmp, path)
    return path


class Run:
    """The folders of one retraining run and the timing log."""

    def __init__(self, out: str, threads: Optional[int] = None, in_process: bool = False) -> None:
        self.out = os.path.abspath(out)
        self.threads = threads
        self.in_process = in_process
        self.timings_path = os.path.join(self.out, "timings.json")
        self.timings: Dict[str, float] = {}
        if os.path.isfile(self.timings_path):
            with open(self.timings_path, encoding="utf-8") as handle:
                self.timings = json.load(handle)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def marker(self, name: str) -> str:
        """The "done" marker of step ``name``: written last (after the timings), atomically."""
        return self.path("steps", name.replace(" ", "-") + ".done")

    def is_done(self, name: str, output: str) -> bool:
        """Whether step ``name`` finished: its marker exists (or, for a run folder made before markers, its
        seconds are in ``timings.json``, which is written only after the step returned) and so does ``output``."""
        if not os.path.exists(output):
            return False
        return os.path.isfile(self.marker(name)) or name in self.timings

    def step(self, name: str, done: str, action) -> None:
        """Run ``action()`` unless the step finished before (see :meth:`is_done`; ``done`` is its main output);
        record its wall-clock seconds, then write its marker."""
        if self.is_done(name, done):
            print(f"[shapes retrain] {name}: done ({done})", flush=True)
            return
        print(f"[shapes retrain] {name} ...", flush=True)
        started = time.time()
        action()
        if os.path.isfile(self.timings_path):  # another run on this folder (other variants) may have added steps
            with open(self.timings_path, encoding="utf-8") as handle:
                self.timings = {**json.load(handle), **self.timings}
        self.timings[name] = round(time.time() - started, 1)
        _write_json(self.timings, self.timings_path)
        _write_json({"step": name, "output": os.path.relpath(done, self.out), "seconds": self.timings[name]}, self.marker(name))

    def mask2dit(self, command: str, config: Dict[str, Any], name: str) -> None:
        """``python -m diffusers_mask2dit.cli <command> --config configs/<name>.json``."""
        config_path = _write_json(config, self.path("configs", f"{name}.json"))
        if self.in_process:  # the same command without a new interpreter (tests)
            from accelerate.state import AcceleratorState

            from ..training.cli import main as cli_main

            try:
                code = cli_main([command, "--config", config_path])
            finally:
                AcceleratorState._reset_state()
            if code:
                raise RuntimeError(f"`mask2dit {command} --config {config_path}` failed with exit code {code}.")
            return
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        subprocess.run([sys.executable, "-m", "diffusers_mask2dit.cli", command, "--config", config_path], check=True, env=env)


def stage_configs(run: Run, recipe: Recipe, variant: str) -> Dict[str, Dict[str, Any]]:
    """The precompute and training configs of both stages (SFT with ``variant``'s mask; ``shipped``: the v2 mask for
    ``recipe.shipped_sft_steps``)."""
    base = run.path("base")
    data = run.path("data")
    common = dict(recipe.common, num_scenes=recipe.num_scenes)
    pretrain = dict(common, **recipe.pretrain, pretrained_model_name_or_path=base, data_file=os.path.join(data, "pretrain.csv"),
                    cache_dir=run.path("cache", "pretrain"), output_dir=run.path("train", "pretrain"))
    sft = dict(common, **recipe.sft, pretrained_model_name_or_path=base, data_file=os.path.join(data, "sft.json"),
               cache_dir=run.path("cache", "sft"), output_dir=run.path("train", f"sft-{variant}"),
               transformer_path=run.path("train", "pretrain", "transformer"), mask_variant=variant)
    if variant == SHIPPED:
        sft.update(mask_variant="v2", max_train_steps=recipe.shipped_sft_steps)
    return {"pretrain": pretrain, "sft": sft}


def stock_config(run: Run, recipe: Recipe) -> Dict[str, Any]:
    """The ``stock`` model's training config: stage 1's settings on one clip per sample (no scene mask), from the
    random base transformer. Stage 1's cache serves it: its records are single clips whatever ``num_scenes`` is."""
    return dict(stage_configs(run, recipe, SHIPPED)["pretrain"], num_scenes=1, output_dir=run.path("train", STOCK))


def assemble(run: Run, variant: str) -> None:
    """``model-<variant>/``: the base folder with the trained transformer of ``variant``, saved by the pipeline."""
    from ..pipeline import Mask2DiTPipeline
    from ..transformer import Mask2DiTTransformer3DModel

    trained = run.path("train", STOCK if variant == STOCK else f"sft-{variant}", "transformer")
    transformer = Mask2DiTTransformer3DModel.from_pretrained(trained)
    pipe = Mask2DiTPipeline.from_pretrained(run.path("base"), transformer=transformer)
    # The folder carries its sampling defaults (generation_defaults.json): `generate --model` uses them too.
    pipe.generation_defaults = {
        "num_inference_steps": shapes_model.NUM_INFERENCE_STEPS, "guidance_scale": shapes_model.GUIDANCE_SCALE,
    }
    staging = run.path(f".tmp-model-{variant}")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    os.replace(staging, run.path(f"model-{variant}"))


def retrain(
    out: str,
    variants: Sequence[str] = (SHIPPED,),
    threads: Optional[int] = None,
    recipe: Optional[Recipe] = None,
    in_process: bool = False,
    stop_after: Optional[str] = None,
) -> Dict[str, float]:
    """Run every step for ``variants`` (the first is also the one ``--install`` ships); returns the timings.

    ``in_process`` runs the ``mask2dit`` commands in this interpreter instead of a subprocess each (tests);
    ``stop_after`` ("base" or "precompute") ends the run after that step."""
    from .vae import train_vae

    recipe = recipe or Recipe()
    run = Run(out, threads, in_process)
    os.makedirs(run.out, exist_ok=True)
    run.step("data", run.path("data", "sft.json"),
             lambda: world.write_dataset(run.path("data"), recipe.num_videos, recipe.num_scenes, recipe.data_seed))
    run.step("vae", run.path("vae", "vae", "config.json"), lambda: train_vae(run.path("vae"), **recipe.vae))
    run.step("base", run.path("base", "model_index.json"),
             lambda: shapes_model.save_base_model(run.path("base"), run.path("vae", "vae"), seed=0))
    if stop_after == "base":
        return run.timings
    only_stock = all(variant == STOCK for variant in variants)  # stage 1's clips only: no SFT cache, no stage 1
    configs = stage_configs(run, recipe, next((variant for variant in variants if variant != STOCK), SHIPPED))
    for stage in ("pretrain",) if only_stock else ("pretrain", "sft"):
        # Precompute reads the text length from the base transformer: the pretrained one does not exist yet.
        precompute = {key: value for key, value in configs[stage].items() if key != "transformer_path"}
        run.step(f"precompute {stage}", os.path.join(configs[stage]["cache_dir"], "cache_index.json"),
                 lambda precompute=precompute, stage=stage: run.mask2dit("precompute", precompute, f"precompute-{stage}"))
    if stop_after == "precompute":
        return run.timings
    if not only_stock:
        run.step("train pretrain", os.path.join(configs["pretrain"]["output_dir"], "transformer"),
                 lambda: run.mask2dit("train", configs["pretrain"], "train-pretrain"))
    for variant in variants:
        if variant == STOCK:
            stock = stock_config(run, recipe)
            run.step(f"train {STOCK}", os.path.join(stock["output_dir"], "transformer"),
                     lambda: run.mask2dit("train", stock, f"train-{STOCK}"))
        else:
            sft = stage_configs(run, recipe, variant)["sft"]
            run.step(f"train sft {variant}", os.path.join(sft["output_dir"], "transformer"),
                     lambda sft=sft, variant=variant: run.mask2dit("train", sft, f"train-sft-{variant}"))
        run.step(f"assemble {variant}", run.path(f"model-{variant}", "model_index.json"), lambda variant=variant: assemble(run, variant))
    return run.timings


def install(model_dir: str, target: str = shapes_model.SHIPPED_MODEL_DIR) -> str:
    """Copy a trained model folder into the package (the shipped model), keeping only configs, safetensors and
    tokenizer files, without the local paths diffusers records in configs (`strip_load_paths`)."""
    from ..hub.build import strip_load_paths

    keep = (".json", ".safetensors", ".model", ".txt")
    staging = target + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging, ignore=lambda folder, names: [n for n in names if os.path.isfile(os.path.join(folder, n)) and not n.endswith(keep)])
    strip_load_paths(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_mask2dit.shapes.retrain",
        description="Retrain the Shapes world's model (data, VAE, transformer with mask2dit train) from scratch.",
    )
    parser.add_argument("--out", required=True, help="run folder (resumable)")
    parser.add_argument("--variants", nargs="+", default=[SHIPPED], choices=VARIANTS,
                        help="models to train (default: shipped, the v2 mask with the longer stage 2); "
                             "v2 v1 v3 full: the ablation's masks at one equal budget; "
                             "stock: single clips without scene mask (the DiTCtrl comparison's base model)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the training processes")
    parser.add_argument("--install", action="store_true", help="copy model-<first variant> into the package afterwards")
    parser.add_argument("--stop-after", choices=("base", "precompute"), default=None, help="end the run after this step")
    args = parser.parse_args(argv)
    if args.install and args.variants[0] == STOCK:
        parser.error("--install ships the first of --variants as the package's Mask²DiT model; it cannot be stock")
    timings = retrain(args.out, args.variants, args.threads, stop_after=args.stop_after)
    print(json.dumps(timings, indent=1))
    if args.install:
        print(f"installed {install(os.path.join(os.path.abspath(args.out), f'model-{args.variants[0]}'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
