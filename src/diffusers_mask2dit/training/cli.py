"""``mask2dit train`` and ``mask2dit precompute``: both take ``--config <file>`` plus any option as a flag.

Run them under ``accelerate launch -m diffusers_mask2dit.cli train ...`` (or the ``mask2dit`` entry point
through ``accelerate launch $(which mask2dit) train ...``) for several GPUs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional

from ..cli_utils import fail
from .config import add_config_arguments, config_from_args

logger = logging.getLogger(__name__)


def register_cli(subparsers: Any) -> None:
    """Add the ``train`` and ``precompute`` sub-commands to the ``mask2dit`` parser."""
    train_parser = subparsers.add_parser(
        "train",
        help="Fine-tune CogVideoX into Mask²DiT (LoRA or full; pretrain or sft stage).",
        description="Train Mask²DiT. Options come from --config (YAML/JSON/TOML) and are overridden by flags.",
    )
    add_config_arguments(train_parser)
    train_parser.set_defaults(func=run_train)

    precompute_parser = subparsers.add_parser(
        "precompute",
        help="Encode the training clips (VAE) and captions (T5) once into a safetensors cache.",
        description="Write the latent cache that `mask2dit train` reads when `cache_dir` is set. Takes the same config.",
    )
    add_config_arguments(precompute_parser)
    precompute_parser.set_defaults(func=run_precompute)


def run_train(args: argparse.Namespace) -> int:
    """Exit status 2 for a bad option, model, data file, checkpoint or output folder (one line, no traceback); 1
    when a started run stops on non-finite values, a full disk or a hung process (the message says how to resume)."""
    from .trainer import CollectiveTimeoutError, DiskFullError, NonFiniteLossError, train

    try:
        config = config_from_args(args)
        train(config)
    except ValueError as error:
        return fail("train", error)
    except (NonFiniteLossError, CollectiveTimeoutError, DiskFullError) as error:
        return fail("train", error, code=1)
    return 0


def run_precompute(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as error:
        return fail("precompute", error)
    from .precompute import precompute

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    try:
        precompute(config)
    except ValueError as error:
        return fail("precompute", error)
    return 0


def main(argv: Optional[list] = None) -> int:
    """``python -m diffusers_mask2dit.training.cli train|precompute ...`` (what ``accelerate launch`` can run)."""
    parser = argparse.ArgumentParser(prog="mask2dit")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
