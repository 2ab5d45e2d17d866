"""Generating the scenes of a ``mask2dit generate`` / ``extend`` / ``demo`` run with a loaded pipeline."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, List, Optional, Sequence

import numpy as np

from .loading import wants_parallel
from .outputs import LATENTS_FILE, OutputFolder, SavedLatents


def _generator(device: Any, seed: int):
    """A generator seeded with ``seed`` on ``device`` (on the CPU for mps, which has none)."""
    import torch

    return torch.Generator(device="cpu" if getattr(device, "type", device) == "mps" else device).manual_seed(seed)


def finished_scene_writer(pipe, args: argparse.Namespace, num_scenes: int, first_scene: int = 0,
                          extension: bool = False) -> Optional[Any]:
    """For parallel inference, the `FinishedSceneWriter` that puts each scene into ``--out`` as soon as its window is
    done (a run stopped later by a hung or dead process keeps it); None for one process, whose outputs are written
    once at the end as always. ``first_scene``: the first new scene's index in the output folder (``extend``)."""
    from ..finished_scenes import FinishedSceneWriter, new_scenes_per_window
    from ..generation_plan import scene_frame_counts

    if not wants_parallel(args):
        return None
    counts = scene_frame_counts(pipe, args.frames, num_scenes, "--frames")
    windows = [num_scenes] if extension else new_scenes_per_window(num_scenes, args.scenes_per_window)
    return FinishedSceneWriter(args.out, [pipe.latent_frames(n) for n in counts], windows, first_scene, fps=args.fps)


def _call_options(args: argparse.Namespace, writer: Optional[Any] = None) -> dict:
    """The pipeline's arguments from the options; those not given stay None: the model folder's defaults."""
    options = dict(
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        num_videos_per_prompt=args.num_videos,
        output_type="latent",  # decoded below: the exact latents are saved too
    )
    attention = {"scene_mask": args.mask, "attention_backend": args.attention_backend}
    attention = {name: value for name, value in attention.items() if value is not None}
    if attention:
        options["attention_kwargs"] = attention
    if writer is not None:
        options["callback_on_step_end"] = writer
    return options


def _decode(pipe, scene_latents: Sequence[Any]) -> List[np.ndarray]:
    """Decode one video's scene latents, each ``(F_i, C, h, w)``, to frames in [0, 1] ``(F, H, W, 3)``."""
    import torch

    latents = torch.cat(list(scene_latents), dim=0)[None]
    _, scenes = pipe.decode_scenes(latents, [s.shape[0] for s in scene_latents], output_type="np")
    return list(scenes[0])


def ditctrl_scenes(pipe, prompts: List[str], args: argparse.Namespace):
    """One video by DiTCtrl's training-free tiles (``--method ditctrl``): each prompt's own tile and the whole video
    with its transitions, frames ``(F, H, W, 3)`` in [0, 1]. No latents: `extend` continues Mask²DiT scenes."""
    from .ditctrl import generate_ditctrl_video

    if args.max_sequence_length is not None:
        raise ValueError("`--max-sequence-length` applies to --method mask2dit; DiTCtrl's tiles use the model's.")
    excluded = ("num_frames", "output_type", "max_sequence_length")
    options = {key: value for key, value in _call_options(args).items() if key not in excluded}
    return generate_ditctrl_video(pipe, prompts, args, _generator(pipe._execution_device, args.seed), **options)


def generate_scenes(pipe, prompts: List[str], args: argparse.Namespace, writer: Optional[Any] = None):
    """All scenes of ``--num-videos`` videos (one batch): one pass for up to ``--scenes-per-window`` prompts, then
    scene extension; ``writer`` (`finished_scene_writer`) writes each scene as its window finishes.

    Returns one ``(scenes, latents)`` per video: frames in [0, 1] per scene and the `SavedLatents` of the video.
    """
    import torch

    options = _call_options(args, writer)
    if args.frames is not None and not pipe.is_valid_num_frames(args.frames):
        # The pipeline takes any count for one scene (as CogVideoXPipeline); written scenes must re-encode exactly.
        raise ValueError(
            f"`num_frames` must be a count the VAE decodes back exactly (1, 9, 17, ..., 49) so that `mask2dit extend "
            f"--from` can continue from the written scenes; got {args.frames}."
        )
    generator = _generator(pipe._execution_device, args.seed)
    window = args.scenes_per_window
    with writer.stop_on_sigterm() if writer is not None else contextlib.nullcontext():
        if len(prompts) <= window:
            output = pipe(prompt=prompts, generator=generator, **options)
        else:
            output = pipe.generate_long(prompts, scenes_per_window=window, generator=generator, **options)
    videos = []
    for scene_latents in output.scene_frames:  # each video decoded on its own: a batch's VAE memory is one video's
        scenes = _decode(pipe, list(scene_latents))
        latents = SavedLatents(
            latents=torch.cat(list(scene_latents), dim=0)[None],
            latent_frames=[s.shape[0] for s in scene_latents],
            pixel_frames=[len(scene) for scene in scenes],
            extended=[index >= window for index in range(len(prompts))],
        )
        videos.append((scenes, latents))
    return videos


def folder_latents(pipe, folder: OutputFolder) -> SavedLatents:
    """The exact latents saved in ``--from``; without them, the scenes' mp4 frames encoded with the VAE (a note says
    so: H.264 changed the frames slightly, so the continuation is close but not exact)."""
    if folder.latents is not None:
        return folder.latents
    print(
        f"mask2dit extend: note: {os.path.dirname(folder.scene_paths[0]) or '.'} has no {LATENTS_FILE}; the scenes "
        "are encoded again from their mp4 files, which H.264 changed slightly.",
        file=sys.stderr,
    )
    frames = [scene.astype(np.float32) / 255.0 for scene in folder.scenes]  # the pipeline takes floats in [0, 1]
    latents, pixel_frames = pipe.encode_video_scenes(frames)
    latent_frames = [pipe.latent_frames(count) for count in pixel_frames]
    return SavedLatents(latents, latent_frames, pixel_frames, [False] * len(folder.scenes))


def extend_scenes(pipe, folder: OutputFolder, new_prompts: List[str], context_count: int, args: argparse.Namespace,
                  writer: Optional[Any] = None):
    """New scenes conditioned on the last ``context_count`` scenes' latents, ``--num-videos`` continuations of the
    same context (one batch); ``writer`` as in `generate_scenes`.

    Returns one ``(new scenes, SavedLatents of the whole longer video)`` per continuation; the context latents in it
    are those the pipeline returns, which it keeps unchanged.
    """
    import torch

    saved = folder_latents(pipe, folder)
    context_frames = sum(saved.latent_frames[-context_count:])
    with writer.stop_on_sigterm() if writer is not None else contextlib.nullcontext():
        output = pipe.extend(
            prompt=new_prompts,
            context_prompts=folder.prompts[-context_count:],
            context_latents=saved.latents[:, saved.latents.shape[1] - context_frames :],
            context_num_frames=saved.pixel_frames[-context_count:],
            num_new_scenes=len(new_prompts),
            generator=_generator(pipe._execution_device, args.seed),
            **_call_options(args, writer),  # --height/--width default to the context scenes' size
        )
    earlier = saved.latents[:, : saved.latents.shape[1] - context_frames].to(output.frames)
    videos = []
    for index, window_latents in enumerate(output.scene_frames):
        new_latents = list(window_latents[context_count:])
        new_scenes = _decode(pipe, new_latents)
        latents = SavedLatents(
            latents=torch.cat([earlier, output.frames[index : index + 1]], dim=1),
            latent_frames=saved.latent_frames + [s.shape[0] for s in new_latents],
            pixel_frames=saved.pixel_frames + [len(scene) for scene in new_scenes],
            extended=saved.extended + [True] * len(new_prompts),
        )
        videos.append((new_scenes, latents))
    return videos
