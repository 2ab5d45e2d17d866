"""Generating the scenes of a ``mask2dit generate`` / ``extend`` / ``demo`` run with a loaded pipeline."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Sequence

import numpy as np

from .outputs import LATENTS_FILE, OutputFolder, SavedLatents


def _generator(device: Any, seed: int):
    """A generator seeded with ``seed`` on ``device`` (on the CPU for mps, which has none)."""
    import torch

    return torch.Generator(device="cpu" if getattr(device, "type", device) == "mps" else device).manual_seed(seed)


def _call_options(args: argparse.Namespace) -> dict:
    """The pipeline's arguments from the options; those not given stay None: the model folder's defaults."""
    options = dict(
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        output_type="latent",  # decoded below: the exact latents are saved too
    )
    attention = {"scene_mask": args.mask, "attention_backend": args.attention_backend}
    attention = {name: value for name, value in attention.items() if value is not None}
    if attention:
        options["attention_kwargs"] = attention
    return options


def _decode(pipe, scene_latents: Sequence[Any]) -> List[np.ndarray]:
    """Decode one video's scene latents, each ``(F_i, C, h, w)``, to frames in [0, 1] ``(F, H, W, 3)``."""
    import torch

    latents = torch.cat(list(scene_latents), dim=0)[None]
    _, scenes = pipe.decode_scenes(latents, [s.shape[0] for s in scene_latents], output_type="np")
    return list(scenes[0])


def generate_scenes(pipe, prompts: List[str], args: argparse.Namespace):
    """All scenes of one video: one pass for up to ``--scenes-per-window`` prompts, then scene extension.

    Returns ``(scenes, latents)``: frames in [0, 1] per scene and the `SavedLatents` of the video.
    """
    import torch

    options = _call_options(args)
    if args.frames is not None and not pipe.is_valid_num_frames(args.frames):
        # The pipeline takes any count for one scene (as CogVideoXPipeline); written scenes must re-encode exactly.
        raise ValueError(
            f"`num_frames` must be a count the VAE decodes back exactly (1, 9, 17, ..., 49) so that `mask2dit extend "
            f"--from` can continue from the written scenes; got {args.frames}."
        )
    generator = _generator(pipe._execution_device, args.seed)
    window = args.scenes_per_window
    if len(prompts) <= window:
        output = pipe(prompt=prompts, generator=generator, **options)
    else:
        output = pipe.generate_long(prompts, scenes_per_window=window, generator=generator, **options)
    scene_latents = list(output.scene_frames[0])
    scenes = _decode(pipe, scene_latents)
    latents = SavedLatents(
        latents=torch.cat(scene_latents, dim=0)[None],
        latent_frames=[s.shape[0] for s in scene_latents],
        pixel_frames=[len(scene) for scene in scenes],
        extended=[index >= window for index in range(len(prompts))],
    )
    return scenes, latents


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


def extend_scenes(pipe, folder: OutputFolder, new_prompts: List[str], context_count: int, args: argparse.Namespace):
    """New scenes conditioned on the last ``context_count`` scenes' latents.

    Returns ``(new scenes, SavedLatents of the whole longer video)``; the context latents in it are those the
    pipeline returns, which it keeps unchanged.
    """
    import torch

    saved = folder_latents(pipe, folder)
    context_frames = sum(saved.latent_frames[-context_count:])
    output = pipe.extend(
        prompt=new_prompts,
        context_prompts=folder.prompts[-context_count:],
        context_latents=saved.latents[:, saved.latents.shape[1] - context_frames :],
        context_num_frames=saved.pixel_frames[-context_count:],
        num_new_scenes=len(new_prompts),
        generator=_generator(pipe._execution_device, args.seed),
        **_call_options(args),  # --height/--width default to the context scenes' size
    )
    new_latents = list(output.scene_frames[0][context_count:])
    new_scenes = _decode(pipe, new_latents)
    earlier = saved.latents[:, : saved.latents.shape[1] - context_frames].to(output.frames)
    latents = SavedLatents(
        latents=torch.cat([earlier, output.frames[:1]], dim=1),
        latent_frames=saved.latent_frames + [s.shape[0] for s in new_latents],
        pixel_frames=saved.pixel_frames + [len(scene) for scene in new_scenes],
        extended=saved.extended + [True] * len(new_prompts),
    )
    return new_scenes, latents
