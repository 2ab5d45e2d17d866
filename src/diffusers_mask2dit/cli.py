"""The ``mask2dit`` command. Each sub-command lives with the code it drives and registers itself here.

Shared by the sub-commands: a parser whose usage errors are one line (exit code 2), :func:`fail` for errors
found after parsing (one line, exit code 2) and :func:`check_device` for ``--device``.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import List, Optional

# module -> it provides `register_cli(subparsers)`; each sub-command sets `func` on its parser.
_COMMAND_MODULES = (
    "diffusers_mask2dit.generation_cli",
    "diffusers_mask2dit.training.cli",
    "diffusers_mask2dit.hub.cli",
    "diffusers_mask2dit.evaluation.cli",
    "diffusers_mask2dit.data.cli",
)

_DEVICE_PATTERN = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps or xpu"


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are a single line on stderr (exit code 2), like every other
    error of the ``mask2dit`` commands; ``--help`` still shows the full usage. Sub-parsers inherit the class."""

    def error(self, message: str) -> "NoReturn":  # noqa: F821
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split()) or type(error).__name__


def fail(command: str, error: BaseException) -> int:
    """Print ``mask2dit <command>: error: <message>`` as one line on stderr; returns the exit code 2."""
    print(f"mask2dit {command}: error: {one_line(error)}", file=sys.stderr)
    return 2


def check_device(device: Optional[str], option: str = "--device") -> Optional[str]:
    """``device`` if this machine has it (``auto`` and None pass through), else a ValueError naming ``option``."""
    import torch

    if device is None or device == "auto":
        return device
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise ValueError(f"`{option}` must be {DEVICE_CHOICES}; got {device!r}.")
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return device
    backend = getattr(torch, kind, None)
    available = bool(backend is not None and backend.is_available())
    if not available:
        raise ValueError(
            f"`{option} {device}`: this machine has no {kind.upper()} device available to PyTorch "
            f"(torch {torch.__version__}); use `{option} cpu` or `{option} auto`."
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if index and int(index) >= count:
        raise ValueError(f"`{option} {device}`: this machine has {count} {kind} device(s), numbered from 0.")
    return device


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
