"""``mask2dit generate``, ``mask2dit extend`` and ``mask2dit demo``.

    mask2dit demo --out demo/                                   # tiny random model, offline, < 1 min on CPU
    mask2dit generate --prompt "scene 1" --prompt "scene 2" --prompt "scene 3" --out out/
    mask2dit extend --from out/ --prompt "scene 4" --out out_4/

Every command writes to its output folder: ``video.mp4`` (all scenes), ``scene_00.mp4``, ``scene_01.mp4``, ...,
``contact_sheet.png`` (one row per scene) and ``prompts.txt`` (one scene prompt per line); ``mask2dit evaluate``
reads exactly these names. Exit code: 0 ok, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

from .video_io import contact_sheet, read_video, write_video

DEFAULT_MODEL = "qth/Mask2DiT"
WHOLE_VIDEO_FILE = "video.mp4"
CONTACT_SHEET_FILE = "contact_sheet.png"
PROMPTS_FILE = "prompts.txt"
DTYPES = ("auto", "fp32", "fp16", "bf16")

# The demo's default video: 3 scenes made together, a 4th added by scene extension (Shapes world prompts).
DEMO_PROMPTS = [
    "a red circle moves right",
    "a blue square moves up",
    "a yellow triangle moves left",
    "a green circle moves down",
]


def scene_file(index: int) -> str:
    """``scene_00.mp4``, ``scene_01.mp4``, ... (two digits, from 0)."""
    return f"scene_{index:02d}.mp4"


def save_outputs(folder: str, scenes: Sequence[np.ndarray], prompts: Sequence[str], fps: int) -> List[str]:
    """Write the standard output files for one video whose scenes are frames ``(F, H, W, 3)``; returns the paths."""
    if len(scenes) != len(prompts):
        raise ValueError(f"{len(scenes)} scenes but {len(prompts)} prompts; they must match one to one.")
    os.makedirs(folder, exist_ok=True)
    paths = [write_video(np.concatenate(list(scenes), axis=0), os.path.join(folder, WHOLE_VIDEO_FILE), fps=fps)]
    paths += [write_video(scene, os.path.join(folder, scene_file(i)), fps=fps) for i, scene in enumerate(scenes)]
    paths.append(contact_sheet(scenes, os.path.join(folder, CONTACT_SHEET_FILE)))
    prompts_path = os.path.join(folder, PROMPTS_FILE)
    with open(prompts_path, "w", encoding="utf-8") as handle:
        handle.write("".join(" ".join(p.split()) + "\n" for p in prompts))  # one line per scene, whatever was typed
    paths.append(prompts_path)
    return paths


def read_prompts(prompts: Optional[Sequence[str]], prompts_file: Optional[str], required: bool = True) -> List[str]:
    """Prompts from repeated ``--prompt`` arguments, then from a file (one per line, blank lines skipped)."""
    collected = [p for p in (prompts or [])]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise ValueError(f"`--prompts-file`: {prompts_file!r} does not exist.")
        with open(prompts_file, encoding="utf-8") as handle:
            collected += [line.strip() for line in handle if line.strip()]
    if any(not p.strip() for p in collected):
        raise ValueError("Empty scene prompt: every `--prompt` needs text.")
    if required and not collected:
        raise ValueError("No prompts: pass `--prompt` once per scene or `--prompts-file` (one prompt per line).")
    return collected


def read_output_folder(folder: str) -> "tuple[List[np.ndarray], List[str]]":
    """Scenes (``uint8 (F, H, W, 3)``) and prompts of an output folder written by these commands."""
    if not os.path.isdir(folder):
        raise ValueError(f"`--from`: {folder!r} is not a folder written by `mask2dit generate`.")
    prompts_path = os.path.join(folder, PROMPTS_FILE)
    prompts = read_prompts(None, prompts_path) if os.path.isfile(prompts_path) else []
    scenes = []
    while os.path.isfile(os.path.join(folder, scene_file(len(scenes)))):
        scenes.append(read_video(os.path.join(folder, scene_file(len(scenes)))))
    if not scenes:
        raise ValueError(f"`--from`: {folder!r} has no {scene_file(0)}; pass a folder written by `mask2dit generate`.")
    if len(prompts) != len(scenes):
        raise ValueError(
            f"`--from`: {folder!r} has {len(scenes)} scene files but {len(prompts)} lines in {PROMPTS_FILE}."
        )
    return scenes, prompts


def resolve_device_dtype(device: str, dtype: str):
    """``--device auto`` -> cuda if available else cpu; ``--dtype auto`` -> bf16 on cuda, fp32 elsewhere."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in DTYPES:
        raise ValueError(f"`--dtype` must be one of {list(DTYPES)}; got {dtype!r}.")
    if dtype == "auto":
        dtype = "bf16" if str(device).startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def load_pipeline(args: argparse.Namespace):
    """The pipeline of ``--model`` on ``--device`` in ``--dtype``, with the memory options asked for."""
    from .pipeline import Mask2DiTPipeline

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    pipe = Mask2DiTPipeline.from_pretrained(args.model, dtype=dtype)
    return _place(pipe, args, device)


def _place(pipe, args: argparse.Namespace, device: str):
    if getattr(args, "cpu_offload", False):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if getattr(args, "vae_tiling", False):
        pipe.vae.enable_tiling()
    return pipe


def _generator(device: str, seed: int):
    import torch

    return torch.Generator(device="cpu" if getattr(device, "type", device) == "mps" else device).manual_seed(seed)


def _add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        parser.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"model folder or Hub id (default: {DEFAULT_MODEL}; CogVideoX ids such as THUDM/CogVideoX-5b work too)",
        )
    parser.add_argument("--prompt", action="append", default=[], help="one scene prompt; repeat once per scene, in order")
    parser.add_argument("--prompts-file", help="text file with one scene prompt per line (after any --prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every scene")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50; demo: 4)")
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's, 480)")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's, 720)")
    parser.add_argument(
        "--frames", type=int, default=None, help="pixel frames per scene: 1, 9, 17, ..., 49 (default: the model's, 49)"
    )
    parser.add_argument(
        "--guidance", type=float, default=6.0, help="classifier-free guidance scale; <= 1 turns it off (default: 6.0)"
    )
    parser.add_argument(
        "--mask", default=None, help="scene attention mask: v1, v2, v3 or full (default: the model's, v2)"
    )
    parser.add_argument("--fps", type=int, default=8, help="frames per second of the written videos (default: 8)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (default: bf16 on cuda, fp32 on cpu)"
    )
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (less GPU memory)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory)")


def _call_options(args: argparse.Namespace, default_steps: int = 50) -> dict:
    options = dict(
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps or default_steps,
        guidance_scale=args.guidance,
        output_type="np",
    )
    if args.mask is not None:
        options["attention_kwargs"] = {"scene_mask": args.mask}
    return options


def _fail(command: str, error: Exception) -> int:
    print(f"mask2dit {command}: error: {error}", file=sys.stderr)
    return 2


def generate_scenes(pipe, prompts: List[str], args: argparse.Namespace, default_steps: int = 50) -> List[np.ndarray]:
    """All scenes of one video: one pass for up to ``--scenes-per-window`` prompts, then scene extension."""
    options = _call_options(args, default_steps)
    generator = _generator(pipe._execution_device, args.seed)
    if len(prompts) <= args.scenes_per_window:
        output = pipe(prompt=prompts, generator=generator, **options)
    else:
        output = pipe.generate_long(prompts, scenes_per_window=args.scenes_per_window, generator=generator, **options)
    return list(output.scene_frames[0])


def run_generate(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        pipe = load_pipeline(args)
        scenes = generate_scenes(pipe, prompts, args)
        save_outputs(args.out, scenes, prompts, args.fps)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return _fail("generate", error)
    print(f"Wrote {len(scenes)} scenes to {args.out}: {WHOLE_VIDEO_FILE}, scene_XX.mp4, {CONTACT_SHEET_FILE}, "
          f"{PROMPTS_FILE}")
    return 0


def run_extend(args: argparse.Namespace) -> int:
    try:
        new_prompts = read_prompts(args.prompt, args.prompts_file)
        scenes, prompts = read_output_folder(args.source)
        context_count = min(args.context_scenes, len(scenes))
        if context_count < 1:
            raise ValueError(f"`--context-scenes` must be at least 1; got {args.context_scenes}.")
        pipe = load_pipeline(args)
        output = pipe.extend(
            prompt=new_prompts,
            context_prompts=prompts[-context_count:],
            context_frames=[scene.astype(np.float32) / 255.0 for scene in scenes[-context_count:]],
            num_new_scenes=len(new_prompts),
            generator=_generator(pipe._execution_device, args.seed),
            **_call_options(args),  # --height/--width default to the context videos' size
        )
        new_scenes = list(output.scene_frames[0][context_count:])
        save_outputs(args.out, scenes + new_scenes, prompts + new_prompts, args.fps)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return _fail("extend", error)
    print(f"Wrote {len(scenes)} + {len(new_prompts)} scenes to {args.out}")
    return 0


def demo_pipeline(args: argparse.Namespace, prompts: List[str]):
    """The demo's model: the Shapes-world Mask²DiT shipped in the package (default; prompts must use the world's
    words), or with ``--random-weights`` a tiny random CogVideoX of ``--style``. Fills in the model's sampling
    defaults (``--steps``, ``--guidance``) where not given."""
    import torch

    from .pipeline import Mask2DiTPipeline

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.random_weights:
        from .tiny import build_tiny_components

        print("mask2dit demo: tiny RANDOM-weight model built offline. The videos are noise: this shows the machinery "
              "(multi-scene generation + scene extension), not quality.")
        args.steps, args.guidance = args.steps or 4, 6.0 if args.guidance is None else args.guidance
        pipe = Mask2DiTPipeline(**build_tiny_components(style=args.style, seed=args.seed))
        if dtype != torch.float32:  # the tiny models are built in fp32
            pipe.to(dtype=dtype)
        return _place(pipe, args, device)
    from .shapes import model as shapes_model
    from .shapes.world import parse_prompt

    for index, prompt in enumerate(prompts):
        parse_prompt(prompt, f"--prompt {index + 1}")
    print("mask2dit demo: the Shapes-world Mask²DiT shipped with the package (trained on a CPU with `mask2dit train`): "
          "one background shared by all scenes, each scene follows its own prompt. --random-weights for the tiny random model.")
    args.steps = args.steps or shapes_model.NUM_INFERENCE_STEPS
    args.guidance = shapes_model.GUIDANCE_SCALE if args.guidance is None else args.guidance
    pipe = Mask2DiTPipeline.from_pretrained(shapes_model.shipped_model_path(), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return _place(pipe, args, device)


def run_demo(args: argparse.Namespace) -> int:
    try:
        prompts = [" ".join(p.lower().split()) for p in read_prompts(args.prompt, args.prompts_file, required=False)]
        prompts = prompts or list(DEMO_PROMPTS)
        start = time.time()
        pipe = demo_pipeline(args, prompts)
        # The first `--scenes-per-window` scenes come from one pass, the rest from scene extension.
        scenes = generate_scenes(pipe, prompts, args)
        save_outputs(args.out, scenes, prompts, args.fps)
    except (ValueError, OSError) as error:  # bad input, missing files or model
        return _fail("demo", error)
    how = (
        f"{args.scenes_per_window} at once, then extended one at a time"
        if len(scenes) > args.scenes_per_window
        else "at once"
    )
    print(f"Wrote {len(scenes)} scenes ({how}) to {args.out} in {time.time() - start:.1f}s: {WHOLE_VIDEO_FILE}, "
          f"scene_XX.mp4, {CONTACT_SHEET_FILE}, {PROMPTS_FILE}")
    return 0


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``generate``, ``extend`` and ``demo`` to the ``mask2dit`` dispatcher."""
    generate = subparsers.add_parser(
        "generate",
        help="generate a multi-scene video, one prompt per scene",
        description="Generate one video with one scene per prompt. Up to --scenes-per-window scenes are made in one "
        "pass; longer lists continue by scene extension over a sliding window.",
    )
    _add_common(generate)
    generate.add_argument("--scenes-per-window", type=int, default=3, help="scenes the model sees at once (default: 3)")
    generate.set_defaults(func=run_generate)

    extend = subparsers.add_parser(
        "extend",
        help="add scenes to a video written by `generate`",
        description="Generate new scene(s) conditioned on the last scenes of an output folder; writes the whole "
        "longer video (earlier scenes as they were, then the new ones) to --out.",
    )
    extend.add_argument(
        "--from", dest="source", required=True, help="output folder of `generate` (scene_XX.mp4 + prompts.txt)"
    )
    extend.add_argument(
        "--context-scenes", type=int, default=2, help="last scenes used as context (default: 2 = window of 3 - 1)"
    )
    _add_common(extend)
    extend.set_defaults(func=run_extend)

    demo = subparsers.add_parser(
        "demo",
        help="multi-scene generation + scene extension offline with the Shapes-world model shipped in the package",
        description="Generate 3 scenes together with the small Shapes-world Mask²DiT shipped in the package, extend "
        "by one more, and write the standard outputs, in seconds on a CPU. Prompts are 'a {red,green,blue,yellow} "
        "{circle,square,triangle} moves {left,right,up,down}'. --random-weights uses a tiny random CogVideoX instead.",
    )
    _add_common(demo, model=False)
    demo.set_defaults(guidance=None)  # the model's own (1.0 for the Shapes model, 6.0 for --random-weights)
    demo.add_argument("--random-weights", action="store_true", help="a tiny random-weight CogVideoX (noise; the machinery only)")
    demo.add_argument("--style", default="5b", choices=("5b", "2b", "1.5"), help="--random-weights model style (default: 5b)")
    demo.add_argument("--scenes-per-window", type=int, default=3, help="scenes generated at once (default: 3)")
    demo.set_defaults(func=run_demo)
