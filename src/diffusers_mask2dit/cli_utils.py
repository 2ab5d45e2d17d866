"""What every ``mask2dit`` sub-command shares: a parser whose usage errors are one line (exit code 2), :func:`fail`
for errors found after parsing (one line, exit code 2) and :func:`check_device` for ``--device``.

The command modules import this module, never :mod:`diffusers_mask2dit.cli` (which imports them: no cycle).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

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


def fail(command: str, error: BaseException, code: int = 2) -> int:
    """Print ``mask2dit <command>: error: <message>`` as one line on stderr; returns ``code`` (2: bad input; 1: a
    valid request that failed, e.g. an upload or a training run stopped on non-finite values)."""
    print(f"mask2dit {command}: error: {one_line(error)}", file=sys.stderr)
    return code


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
