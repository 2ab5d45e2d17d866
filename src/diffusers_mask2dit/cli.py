"""The ``mask2dit`` command. Each sub-command lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# module -> it provides `register_cli(subparsers)`; each sub-command sets `func` on its parser.
_COMMAND_MODULES = (
    "diffusers_mask2dit.generation_cli",
    "diffusers_mask2dit.training.cli",
    "diffusers_mask2dit.hub.cli",
    "diffusers_mask2dit.evaluation.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mask2dit", description="Mask²DiT multi-scene video generation for diffusers.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
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
