"""``mask2dit demo``: the Shapes-world Mask²DiT shipped in the package makes 3 scenes together and a 4th by scene
extension, offline, in seconds on a CPU (``--random-weights``: a tiny random CogVideoX instead, the machinery only).

The example world's command: it uses the library's ``generate`` machinery and registers the world's exact scorer
with :mod:`diffusers_mask2dit.evaluation`; the library never imports this package.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List

from ..cli_utils import fail
from ..evaluation.encoders import register_encoder
from ..generate.cli import add_model_options, add_sampling_options, ends_parallel
from ..generate.loading import finish_pipeline, from_pretrained, load_transformer, resolve_device_dtype
from ..generate.options import check_model_options, check_options
from ..generate.outputs import CONTACT_SHEET_FILE, LATENTS_FILE, PROMPTS_FILE, WHOLE_VIDEO_FILE, read_prompts
from ..generate.outputs import recorded_settings, save_outputs, video_folder
from ..finished_scenes import RunStopped, report_stopped_run
from ..generate.scenes import finished_scene_writer, generate_scenes
from ..parallel import CollectiveTimeoutError, is_main_process
from ..pipeline import DEFAULT_FPS
from ..release_loading import GENERATION_DEFAULTS_FILE
from .model import SHIPPED_MODEL_DIR, shipped_model_path

# The demo's default video (Shapes-world prompts): 3 scenes made together, a 4th added by scene extension.
DEMO_PROMPTS = [
    "a red circle moves right",
    "a blue square moves up",
    "a yellow triangle moves left",
    "a green circle moves down",
]
RANDOM_WEIGHTS_STEPS = 4  # noise either way: the machinery only
DEMO_RANDOM_NOTE = ("mask2dit demo: tiny RANDOM-weight model built offline. The videos are noise: this shows the machinery "
                    "(multi-scene generation + scene extension), not quality. Use `mask2dit generate` with real weights.")
DEMO_SHAPES_NOTE = ("mask2dit demo: the Shapes-world Mask²DiT shipped with the package (trained on a CPU with `mask2dit "
                    "train`): one background shared by all scenes, each scene follows its own prompt (docs/shapes.md).")


def _shapes_encoder():
    from .score import ShapesEncoder

    return ShapesEncoder()


# `mask2dit evaluate --shapes` scores with the world's exact pixel scorer, found through the evaluation registry.
register_encoder("shapes-scorer", _shapes_encoder)


def shipped_defaults_help() -> Dict[str, str]:
    """The shipped model's sampling defaults as the demo's help shows them (read from its folder)."""
    with open(os.path.join(SHIPPED_MODEL_DIR, GENERATION_DEFAULTS_FILE), encoding="utf-8") as handle:
        defaults = json.load(handle)
    with open(os.path.join(SHIPPED_MODEL_DIR, "transformer", "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    with open(os.path.join(SHIPPED_MODEL_DIR, "vae", "config.json"), encoding="utf-8") as handle:
        vae_factor = 2 ** (len(json.load(handle)["block_out_channels"]) - 1)  # as the pipeline computes it
    return {
        "steps": f"{defaults['num_inference_steps']}, the Shapes model's; {RANDOM_WEIGHTS_STEPS} with --random-weights",
        "guidance": f"{defaults['guidance_scale']}, the Shapes model's; 6.0 with --random-weights",
        "height": f"{config['sample_height'] * vae_factor}, the Shapes model's",
        "width": f"{config['sample_width'] * vae_factor}, the Shapes model's",
        "frames": f"{config['sample_frames']}, the Shapes model's",
        "mask": f"{config.get('attn_mask_variant', 'v2')}, the Shapes model's",
    }


def demo_prompts(args: argparse.Namespace) -> List[str]:
    """The prompts given (or :data:`DEMO_PROMPTS`); for the Shapes model each is checked against the world's
    vocabulary and returned as the model reads it (lowercase, single spaces)."""
    prompts = read_prompts(args.prompt, args.prompts_file, required=False) or list(DEMO_PROMPTS)
    if args.random_weights:
        return prompts
    from .world import parse_prompt

    for index, prompt in enumerate(prompts):
        parse_prompt(prompt, f"--prompt {index + 1}")
    return [" ".join(prompt.lower().split()) for prompt in prompts]


def demo_pipeline(args: argparse.Namespace):
    """The demo's model: the Shapes-world Mask²DiT shipped in the package (its folder carries its sampling
    defaults), or (``--random-weights``) a tiny random-weight CogVideoX built offline in the ``--style`` asked for."""
    from ..pipeline import Mask2DiTPipeline

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if not args.random_weights:
        pipe = from_pretrained(shipped_model_path(), args, dtype, "the Shapes model shipped in the package could not be loaded")
        return finish_pipeline(pipe, args, device, dtype, "demo")
    from ..tiny import build_tiny_components

    components = build_tiny_components(style=args.style, seed=args.seed)
    if args.transformer:
        components["transformer"] = load_transformer(args.transformer, dtype)
    pipe = Mask2DiTPipeline(**components)
    pipe.generation_defaults = {"num_inference_steps": RANDOM_WEIGHTS_STEPS}
    return finish_pipeline(pipe, args, device, dtype, "demo")


def run_demo(args: argparse.Namespace) -> int:
    writer = None
    try:
        prompts = demo_prompts(args)
        if is_main_process():
            print(DEMO_RANDOM_NOTE if args.random_weights else DEMO_SHAPES_NOTE)
        args.fps = DEFAULT_FPS if args.fps is None else args.fps
        check_options(args)
        if args.web:  # the Space's page on this machine (hub/space.py) instead of files
            from ..hub.space import serve_demo

            return serve_demo(demo_pipeline(args), output_root=args.out, examples=prompts, steps=args.steps, guidance=args.guidance)
        start = time.time()
        pipe = demo_pipeline(args)
        check_model_options(pipe, args)
        # The first `--scenes-per-window` scenes come from one pass, the rest from scene extension.
        writer = finished_scene_writer(pipe, args, len(prompts))
        videos = generate_scenes(pipe, prompts, args, writer)
        if not is_main_process():  # parallel inference: every process holds the video; the first writes it
            return 0
        args.model = None if args.random_weights else shipped_model_path()
        settings = {**recorded_settings(args), "random_weights": args.random_weights}
        for index, (scenes, latents) in enumerate(videos):
            save_outputs(video_folder(args.out, index, len(videos)), scenes, prompts, args.fps, latents, settings=settings)
    except (CollectiveTimeoutError, RunStopped) as error:  # parallel inference: a process hung or died
        return report_stopped_run("demo", error, writer)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return fail("demo", error)
    how = f"{args.scenes_per_window} at once, then extended one at a time" if len(scenes) > args.scenes_per_window else "at once"
    print(f"Wrote {len(scenes)} scenes ({how}) to {args.out} in {time.time() - start:.1f}s: {WHOLE_VIDEO_FILE}, "
          f"scene_XX.mp4, {CONTACT_SHEET_FILE}, {PROMPTS_FILE}, {LATENTS_FILE}")
    return 0


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``demo`` to the ``mask2dit`` dispatcher."""
    demo = subparsers.add_parser(
        "demo",
        help="multi-scene generation + scene extension offline with the Shapes-world model shipped in the package",
        description="Generate 3 scenes together with the small Shapes-world Mask²DiT shipped in the package, extend "
        "by one more, and write the standard outputs, in seconds on a CPU. Prompts are 'a {red,green,blue,yellow} "
        "{circle,square,triangle} moves {left,right,up,down}'. --random-weights: a tiny random CogVideoX instead.",
    )
    add_sampling_options(demo, shipped_defaults_help())
    add_model_options(demo, model=False)
    demo.add_argument("--random-weights", action="store_true", help="a tiny random-weight CogVideoX (noise: the machinery only)")
    demo.add_argument("--style", default="5b", choices=("5b", "2b", "1.5"), help="--random-weights model style (default: 5b)")
    demo.add_argument("--scenes-per-window", type=int, default=3, help="scenes generated at once, >= 2 (default: 3)")
    demo.add_argument("--web", action="store_true", help="serve the Gradio page on 127.0.0.1:7860 (GRADIO_SERVER_NAME/PORT "
                      "change it); each job is written to --out/job-*")
    demo.set_defaults(func=ends_parallel(run_demo))
