"""Resumable training checkpoints: where a run is (progress), finding, choosing and saving checkpoint folders.

``output_dir/checkpoint-<step>/`` holds accelerate's state (trainable weights, optimizer, LR schedule, RNG)
and ``training_progress.json``. A checkpoint is written to a hidden temporary folder and renamed when
complete, so a crash never leaves a half-written ``checkpoint-<step>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from .config import TrainingConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PROGRESS_NAME = "training_progress.json"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainingProgress:
    """Where a run is: optimizer steps done and how far into the current epoch's sample order.

    ``samples_in_epoch`` counts samples of the global batch order already used in ``epoch``, which stays
    meaningful when a run is resumed with another number of processes of the same global batch.
    """

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, PROGRESS_NAME), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(self), handle, indent=1)

    @classmethod
    def load(cls, folder: str) -> "TrainingProgress":
        path = os.path.join(folder, PROGRESS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"`resume_from_checkpoint` {folder} is not a Mask²DiT training checkpoint (no {PROGRESS_NAME}).")
        with open(path, encoding="utf-8") as handle:
            return cls(**json.load(handle))


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, PROGRESS_NAME)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_resume_checkpoint(config: TrainingConfig) -> Optional[str]:
    """The checkpoint folder to resume from: None (fresh start), the latest in ``output_dir``, or a given path."""
    choice = config.resume_from_checkpoint
    if not choice:
        return None
    if choice == "latest":
        checkpoints = list_checkpoints(config.output_dir)
        if not checkpoints:
            logger.info(f"No checkpoint in {config.output_dir}; starting a new run.")
            return None
        return checkpoints[-1][1]
    path = choice if os.path.isdir(choice) else os.path.join(config.output_dir, choice)
    if not os.path.isfile(os.path.join(path, PROGRESS_NAME)):
        raise ValueError(
            f"`resume_from_checkpoint` must be \"latest\" or a checkpoint folder; {choice!r} is not a complete checkpoint."
        )
    return path


def replace_folder(staging: str, final: str) -> None:
    """Move a complete ``staging`` folder to ``final``; an existing ``final`` is swapped out, then dropped."""
    if os.path.exists(final):
        retired = final + ".old"
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final, retired)
        os.rename(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, final)


def save_checkpoint(accelerator: Any, output_dir: str, progress: TrainingProgress, total_limit: Optional[int]) -> str:
    """Save the full training state to ``output_dir/checkpoint-<step>`` atomically; keep the newest ``total_limit``.

    Every process must call this (optimizer and RNG states are per process; DeepSpeed shards them).
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{progress.global_step}")
    staging = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{progress.global_step}")
    if accelerator.is_main_process:
        for name in os.listdir(output_dir):  # leftovers of saves that a crash interrupted
            if name.startswith(f".tmp-{CHECKPOINT_PREFIX}"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress.save(staging)  # written last: its presence marks a complete checkpoint
        replace_folder(staging, final)  # the same step may have been saved before (e.g. by a resumed run)
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(path, ignore_errors=True)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final
