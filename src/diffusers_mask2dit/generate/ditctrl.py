"""``mask2dit generate --method ditctrl``: the options of the DiTCtrl mode and the run.

`add_ditctrl_arguments` adds the options to the ``generate`` parser; `generate_ditctrl_video` runs
`Mask2DiTPipeline.generate_ditctrl` from the parsed options and returns what the command writes: each prompt's own
tile (``scene_XX.mp4``, the contact sheet) and the whole video with its transitions (``video.mp4``). The video has no
``latents.safetensors``: scene extension continues Mask²DiT scenes, not DiTCtrl tiles.
"""

from __future__ import annotations

import argparse
from typing import Any, List, Sequence, Tuple

import numpy as np

METHODS = ("mask2dit", "ditctrl")


def add_ditctrl_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method`` and the DiTCtrl options (None: `generate_ditctrl`'s defaults)."""
    group = parser.add_argument_group("training-free multi-prompt (--method ditctrl)")
    group.add_argument("--method", choices=METHODS, default="mask2dit",
                       help="mask2dit: the scenes together under the scene mask (a Mask²DiT checkpoint); ditctrl: "
                            "DiTCtrl's training-free tiles on any CogVideoX checkpoint (default: mask2dit)")
    group.add_argument("--tile-frames", type=int, default=None,
                       help="ditctrl: pixel frames per tile, 8k+1 (default: the model's sample frames, 49)")
    group.add_argument("--tile-overlap", type=int, default=None,
                       help="ditctrl: pixel frames shared by consecutive tiles, a multiple of 4 (default: a third of the tile)")
    group.add_argument("--transition-tiles", type=int, default=2, help="ditctrl: tiles between two prompts (default: 2)")
    group.add_argument("--kv-sharing-steps", type=int, nargs=2, default=None, metavar=("START", "END"),
                       help="ditctrl: steps [START, END) with KV-sharing (default: DiTCtrl's share, 2-25 of 50)")
    group.add_argument("--kv-sharing-layers", type=int, nargs=2, default=None, metavar=("START", "END"),
                       help="ditctrl: transformer blocks [START, END) with KV-sharing (default: DiTCtrl's share, 25-30 of 30)")
    group.add_argument("--no-kv-sharing", action="store_true", help="ditctrl: switch KV-sharing off")
    group.add_argument("--no-latent-blending", action="store_true", help="ditctrl: equal weights where tiles overlap")


def ditctrl_options(args: argparse.Namespace) -> dict:
    """`generate_ditctrl`'s method options from the parsed ``args`` (the pipeline checks every value)."""
    return dict(
        temporal_tile_size=args.tile_frames,
        temporal_overlap=args.tile_overlap,
        num_transition_tiles=args.transition_tiles,
        kv_sharing=not args.no_kv_sharing,
        kv_sharing_steps=None if args.kv_sharing_steps is None else tuple(args.kv_sharing_steps),
        kv_sharing_layers=None if args.kv_sharing_layers is None else tuple(args.kv_sharing_layers),
        latent_blending=not args.no_latent_blending,
    )


def generate_ditctrl_video(pipe, prompts: Sequence[str], args: argparse.Namespace, generator: Any,
                           **sampling: Any) -> Tuple[List[np.ndarray], np.ndarray]:
    """One video by ``generate_ditctrl`` with the parsed options; ``sampling`` are the options every method shares
    (negative_prompt, height, width, num_inference_steps, guidance_scale, attention_kwargs).

    Returns each prompt's own tile ``(F, H, W, 3)`` in [0, 1], and the whole video ``(F_total, H, W, 3)``.
    """
    output = pipe.generate_ditctrl(list(prompts), generator=generator, output_type="np", **ditctrl_options(args), **sampling)
    return [np.asarray(scene) for scene in output.scene_frames[0]], np.asarray(output.frames[0])


def check_ditctrl_options(args: argparse.Namespace) -> None:
    """What ``--method ditctrl`` cannot take, refused by name: its length comes from the tiles, not ``--frames``,
    and its tiles run one after another in one process."""
    if args.method != "ditctrl":
        return
    if args.frames is not None:
        raise ValueError("`--frames` sets a Mask²DiT scene's length; with `--method ditctrl` use `--tile-frames`.")
    if getattr(args, "ulysses_degree", 1) > 1 or getattr(args, "cfg_parallel", False):
        raise ValueError("`--method ditctrl` runs in one process: leave out `--ulysses-degree` and `--cfg-parallel`.")
    if getattr(args, "num_videos", 1) > 1:
        raise ValueError("`--num-videos` applies to --method mask2dit; `--method ditctrl` makes one video per run.")
