"""``mask2dit generate`` and ``mask2dit extend``.

    mask2dit generate --prompt "scene 1" --prompt "scene 2" --prompt "scene 3" --out out/
    mask2dit extend --from out/ --prompt "scene 4" --out out_4/
    mask2dit generate --model THUDM/CogVideoX-5b --lora my-lora/ --scheduler CogVideoXDPMScheduler --prompts-file p.txt --out o/
    torchrun --nproc-per-node 8 -m diffusers_mask2dit.cli generate --ulysses-degree 4 --cfg-parallel --prompts-file p.txt --out o/

The output folder is described in :mod:`.outputs`. Exit code: 0 ok, 2 bad input (one line on stderr naming the
option and what it accepts).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict

from ..attention import attention_backend_names
from ..cli_utils import DEVICE_CHOICES, fail
from ..finished_scenes import RunStopped, report_stopped_run
from ..optimization import add_optimization_arguments
from ..parallel import DEFAULT_COLLECTIVE_TIMEOUT, CollectiveTimeoutError, is_main_process
from ..pipeline import DEFAULT_FPS
from ..release_loading import OFFICIAL_MODEL_ID
from .loading import DTYPES, SCHEDULERS, load_pipeline, wants_parallel
from .options import MASK_CHOICES, check_context_size, check_model_options, check_options, context_scene_count
from .outputs import (
    CONTACT_SHEET_FILE,
    LATENTS_FILE,
    PROMPTS_FILE,
    SETTINGS_FILE,
    RECORDED_OPTIONS,
    WHOLE_VIDEO_FILE,
    read_output_folder,
    read_prompts,
    read_settings,
    recorded_settings,
    save_outputs,
    video_folder,
)
from .ditctrl import add_ditctrl_arguments, check_ditctrl_options
from .scenes import ditctrl_scenes, extend_scenes, finished_scene_writer, generate_scenes


def _progress_label(first: int, last: int, total: int, extension: bool = False) -> str:
    """``scenes 1-3/4`` or ``scene 4/4``, as `generate_long` labels its bars."""
    scenes = f"scene {first}/{total}" if first == last else f"scenes {first}-{last}/{total}"
    return scenes + (" (extension)" if extension else "")


def run_generate(args: argparse.Namespace) -> int:
    writer = None
    try:
        args.model = OFFICIAL_MODEL_ID if args.model is None else args.model
        args.fps = DEFAULT_FPS if args.fps is None else args.fps
        check_options(args)
        check_ditctrl_options(args)
        prompts = read_prompts(args.prompt, args.prompts_file)
        pipe = load_pipeline(args, _progress_label(1, min(len(prompts), args.scenes_per_window), len(prompts)))
        check_model_options(pipe, args)
        if args.method == "ditctrl":  # training-free tiles: each prompt's tile, the whole video, no latents
            (scenes, whole), latents = ditctrl_scenes(pipe, prompts, args), None
            videos = [(scenes, None)]
        else:
            writer = finished_scene_writer(pipe, args, len(prompts))
            videos, whole = generate_scenes(pipe, prompts, args, writer), None
        if not is_main_process():  # parallel inference: every process holds the video; the first writes it
            return 0
        for index, (scenes, latents) in enumerate(videos):
            save_outputs(video_folder(args.out, index, len(videos)), scenes, prompts, args.fps, latents,
                         settings=recorded_settings(args), whole_video=whole)
    except (CollectiveTimeoutError, RunStopped) as error:  # parallel inference: a process hung or died
        return report_stopped_run("generate", error, writer)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return fail("generate", error)
    latents_file = "" if latents is None else f"{LATENTS_FILE}, "
    where = args.out if len(videos) == 1 else f"{len(videos)} folders {video_folder(args.out, 0, len(videos))}, ..."
    print(f"Wrote {len(scenes)} scenes to {where}: {WHOLE_VIDEO_FILE}, scene_XX.mp4, {CONTACT_SHEET_FILE}, "
          f"{PROMPTS_FILE}, {latents_file}{SETTINGS_FILE}")
    return 0


def reuse_recorded_settings(args: argparse.Namespace, settings: Dict[str, Any]) -> None:
    """``extend --from``: each option left out takes the value the folder's run recorded (its model, LoRA, steps,
    guidance, mask, ...); then the usual defaults. A folder of the random-weight demo names no model."""
    if args.lora is not None and args.lora_scale is None:  # new LoRAs: not the recorded LoRAs' scales
        settings = {**settings, "lora_scale": None}
    for name in RECORDED_OPTIONS:
        if getattr(args, name, None) is None:
            setattr(args, name, settings.get(name))
    if args.model is None and settings.get("random_weights"):
        raise ValueError("`--from` was made by `mask2dit demo --random-weights`, which has no model folder; pass "
                         "`--model`.")
    args.model = OFFICIAL_MODEL_ID if args.model is None else args.model
    args.fps = DEFAULT_FPS if args.fps is None else args.fps
    for name, default in optimization_defaults().items():  # neither given nor recorded (an older folder)
        if getattr(args, name) is None:
            setattr(args, name, default)


def optimization_defaults() -> Dict[str, Any]:
    """``--compile``, ``--quantize``, ... as `add_optimization_arguments` defaults them (off, none, ...)."""
    return vars(add_optimization_arguments(argparse.ArgumentParser()).parse_args([]))


def run_extend(args: argparse.Namespace) -> int:
    writer = None
    try:
        folder = read_output_folder(args.source)
        reuse_recorded_settings(args, read_settings(args.source))
        check_options(args)
        new_prompts = read_prompts(args.prompt, args.prompts_file)
        context_count = context_scene_count(args.context_scenes, len(folder.scenes))
        check_context_size(args, folder)
        total = len(folder.scenes) + len(new_prompts)
        pipe = load_pipeline(args, _progress_label(len(folder.scenes) + 1, total, total, extension=True))
        check_model_options(pipe, args)
        writer = finished_scene_writer(pipe, args, len(new_prompts), first_scene=len(folder.scenes), extension=True)
        videos = extend_scenes(pipe, folder, new_prompts, context_count, args, writer)
        if not is_main_process():  # parallel inference: every process holds the video; the first writes it
            return 0
        copied = dict(enumerate(folder.scene_paths))  # earlier scenes: their files, unchanged
        for index, (new_scenes, latents) in enumerate(videos):
            save_outputs(video_folder(args.out, index, len(videos)), folder.scenes + new_scenes,
                         folder.prompts + new_prompts, args.fps, latents, copied, settings=recorded_settings(args))
    except (CollectiveTimeoutError, RunStopped) as error:  # parallel inference: a process hung or died
        return report_stopped_run("extend", error, writer)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return fail("extend", error)
    where = args.out if len(videos) == 1 else f"{len(videos)} folders {video_folder(args.out, 0, len(videos))}, ..."
    print(f"Wrote {len(folder.scenes)} + {len(new_prompts)} scenes to {where}")
    return 0


# What `--steps`, `--guidance`, `--height`, `--width`, `--frames` and `--mask` default to, as the help shows it.
MODEL_DEFAULTS = {
    "steps": "the model's generation_defaults.json, else 50",
    "guidance": "the model's generation_defaults.json, else 6.0",
    "height": f"the model's; 480 for {OFFICIAL_MODEL_ID}",
    "width": f"the model's; 720 for {OFFICIAL_MODEL_ID}",
    "frames": f"the model's; 49 for {OFFICIAL_MODEL_ID}",
    "mask": "the model's; v2 for Mask²DiT",
}


def add_model_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """``--model`` (unless ``model`` is False), ``--transformer``, ``--lora``, devices, memory and parallel options."""
    if model:
        parser.add_argument(
            "--model", default=None,
            help=f"model folder or Hub id (default: {OFFICIAL_MODEL_ID}, or for extend the one --from was made with; "
            "CogVideoX ids such as THUDM/CogVideoX-5b work too)",
        )
    parser.add_argument(
        "--transformer", help="a full fine-tune's transformer: the `mask2dit train` output folder or a transformer folder"
    )
    parser.add_argument(
        "--lora", action="append", default=None,
        help="LoRA to apply: a `mask2dit train` output folder, a .safetensors file or a Hub id; repeat to combine several",
    )
    parser.add_argument(
        "--lora-scale", type=float, action="append", default=None,
        help="strength of --lora (default: 1.0); with several --lora, one --lora-scale each, in the same order",
    )
    parser.add_argument("--scheduler", help=f"diffusers scheduler class: {', '.join(SCHEDULERS)} (default: the model's)")
    parser.add_argument("--device", default="auto", help=f"torch device: {DEVICE_CHOICES} (default: auto = cuda if available)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (default: bf16 on cuda, fp32 on cpu)"
    )
    parser.add_argument(
        "--attention-backend", default=None,
        help=f"scene attention backend: {', '.join(attention_backend_names())} (default: auto)",
    )
    add_optimization_arguments(parser)
    parser.add_argument(  # the option's earlier name
        "--cpu-offload", dest="offload", action="store_const", const="model", help="same as --offload model"
    )
    parser.add_argument(
        "--ulysses-degree", type=int, default=1,
        help="under torchrun: processes (GPUs) that share each video's sequence, Ulysses context parallelism (default: 1)",
    )
    parser.add_argument(
        "--cfg-parallel", action="store_true",
        help="under torchrun: run the guidance passes (unconditional, conditional) on two groups of processes",
    )
    parser.add_argument(
        "--collective-timeout", type=int, default=DEFAULT_COLLECTIVE_TIMEOUT,
        help=f"under torchrun: seconds a process waits for the others before the run stops with an error "
        f"(default: {DEFAULT_COLLECTIVE_TIMEOUT})",
    )


def add_sampling_options(parser: argparse.ArgumentParser, defaults: Dict[str, str]) -> None:
    """Prompts, output folder, seed and the sampling options; ``defaults`` says in each help what it defaults to."""
    parser.add_argument("--prompt", action="append", default=[], help="one scene prompt; repeat once per scene, in order")
    parser.add_argument("--prompts-file", help="text file with one scene prompt per line (after any --prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every scene (default: none)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed, 0 to 2**64 - 1 (default: 0)")
    parser.add_argument("--steps", type=int, default=None, help=f"denoising steps, >= 1 (default: {defaults['steps']})")
    parser.add_argument(
        "--height", type=int, default=None,
        help=f"pixels, a multiple of the VAE factor x patch size, 16 for CogVideoX (default: {defaults['height']})",
    )
    parser.add_argument(
        "--width", type=int, default=None,
        help=f"pixels, a multiple of the VAE factor x patch size, 16 for CogVideoX (default: {defaults['width']})",
    )
    parser.add_argument(
        "--frames", type=int, default=None, help=f"pixel frames per scene: 1, 9, 17, ... (default: {defaults['frames']})"
    )
    parser.add_argument(
        "--guidance", type=float, default=None,
        help=f"classifier-free guidance scale; <= 1 turns it off (default: {defaults['guidance']})",
    )
    parser.add_argument("--mask", default=None, help=f"scene attention mask: {MASK_CHOICES} (default: {defaults['mask']})")
    parser.add_argument(
        "--fps", type=int, default=None, help=f"frames per second of the written videos (default: {DEFAULT_FPS})"
    )
    parser.add_argument(
        "--num-videos", type=int, default=1,
        help="videos from the same prompts, each from its own noise, made as one batch; with N > 1 each goes to its "
        "own output folder, --out/video_00, --out/video_01, ... (default: 1: the files go to --out itself)",
    )
    parser.add_argument(
        "--max-sequence-length", type=int, default=None,
        help="text tokens per scene prompt, 1 to 226 for CogVideoX (default: the model's, 226)",
    )


def ends_parallel(run):
    """``run``, then the end of torch.distributed when the parallel options started it."""

    def command(args: argparse.Namespace) -> int:
        from ..parallel import end_parallel

        try:
            return run(args)
        finally:
            if wants_parallel(args):
                end_parallel()

    command.__name__ = run.__name__
    return command


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``generate`` and ``extend`` to the ``mask2dit`` dispatcher."""
    generate = subparsers.add_parser(
        "generate",
        help="generate a multi-scene video, one prompt per scene",
        description="Generate one video with one scene per prompt. Up to --scenes-per-window scenes are made in one "
        "pass; longer lists continue by scene extension over a sliding window. Writes the scenes' exact latents "
        f"({LATENTS_FILE}) and the run's settings ({SETTINGS_FILE}) beside the videos, for `mask2dit extend`.",
    )
    add_sampling_options(generate, MODEL_DEFAULTS)
    add_model_options(generate)
    generate.add_argument("--scenes-per-window", type=int, default=3, help="scenes the model sees at once, >= 2 (default: 3)")
    add_ditctrl_arguments(generate)
    generate.set_defaults(func=ends_parallel(run_generate))

    extend = subparsers.add_parser(
        "extend",
        help="add scenes to a video written by `generate`",
        description=f"Generate new scene(s) conditioned on the last scenes of an output folder, from their exact "
        f"latents ({LATENTS_FILE}; without it, from the mp4 frames, with a note). The model, LoRA and sampling "
        f"options left out are those recorded in --from ({SETTINGS_FILE}). Writes the whole longer video to --out: "
        "the earlier scene files copied unchanged, then the new ones. New scenes keep the context's size.",
    )
    extend.add_argument(
        "--from", dest="source", required=True,
        help=f"output folder of `generate` (scene_XX.mp4, prompts.txt, {LATENTS_FILE}, {SETTINGS_FILE})",
    )
    extend.add_argument(
        "--context-scenes", type=int, default=None, help="last scenes used as context, >= 1 (default: 2, or 1 if --from has one)"
    )
    add_sampling_options(extend, {**MODEL_DEFAULTS, "steps": "as recorded in --from, else the model's"})
    add_model_options(extend)
    # left out: as recorded in --from (see `reuse_recorded_settings`)
    extend.set_defaults(func=ends_parallel(run_extend), **dict.fromkeys(optimization_defaults(), None))
