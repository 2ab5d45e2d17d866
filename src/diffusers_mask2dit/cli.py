"""The ``mask2dit`` command: a table of command modules, each of which registers its sub-commands.

A command module provides ``register_cli(subparsers)`` and sets ``func`` on each parser it adds; it imports what the
sub-commands share from :mod:`diffusers_mask2dit.cli_utils`, never this module (no import cycle). A new command
module is one more line in :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .cli_utils import OneLineArgumentParser

# Each module provides `register_cli(subparsers)`. `shapes.demo` is the example world's command: this table is the
# only place above the library that names it.
COMMAND_MODULES = (
    "diffusers_mask2dit.generate.cli",
    "diffusers_mask2dit.shapes.demo",
    "diffusers_mask2dit.training.cli",
    "diffusers_mask2dit.hub.cli",
    "diffusers_mask2dit.evaluation.cli",
    "diffusers_mask2dit.data.cli",
)


def _version() -> str:
    from . import __version__

    try:
        from importlib.metadata import version

        libraries = ", ".join(f"{name} {version(name)}" for name in ("diffusers", "transformers", "torch"))
    except Exception:  # a library without distribution metadata: the package version alone
        return f"mask2dit {__version__}"
    return f"mask2dit {__version__} ({libraries})"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="mask2dit", description="Mask²DiT multi-scene video generation for diffusers.")
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
