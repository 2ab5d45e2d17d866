"""Resumable training checkpoints: where a run is (progress), finding, choosing, saving and verifying them.

``output_dir/checkpoint-<step>/`` holds accelerate's state (trainable weights, optimizer, LR schedule, RNG),
``training_progress.json`` and ``checkpoint_manifest.json`` (size and SHA-256 of every other file, written
last). A checkpoint is written to a hidden temporary folder and renamed when complete, so a crash never
leaves a half-written ``checkpoint-<step>``; one that was damaged afterwards (a truncated, emptied, changed
or missing file) fails verification against its manifest, and ``latest`` falls back to the previous
complete checkpoint with a warning that names what was wrong.

A run owns the checkpoints up to the step it starts from: newer ones in ``output_dir`` belong to an
abandoned run (e.g. the one a resume from an older checkpoint replaces) and are renamed out of the way,
so that neither ``latest`` nor ``checkpoints_total_limit`` ever picks them.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..pickles import refusal_reason
from .config import TrainingConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PROGRESS_NAME = "training_progress.json"
MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = "mask2dit-checkpoint-manifest"
ABANDONED_SUFFIX = ".abandoned"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# A checkpoint renamed aside while the same step was saved again (see `replace_folder`).
_RETIRED_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)\.old$")
LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
FULL_WEIGHT_FILE = "model.safetensors"  # accelerate's name for the prepared model's weights
# Below this much free space a failed write is taken for a full disk (torch's writer does not say so).
_FULL_DISK_BYTES = 1 << 20


class DiskFullError(OSError):
    """A save ran out of space; what was saved before is intact and the run can be resumed."""


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
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
            return cls(**{field.name: int(values[field.name]) for field in dataclasses.fields(cls)})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}); the checkpoint is damaged.") from None


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first.

    A ``checkpoint-<step>.old`` counts when ``checkpoint-<step>`` is missing: a save of the same step was
    interrupted between its two renames.
    """
    if not os.path.isdir(output_dir):
        return []
    found: Dict[int, str] = {}
    names = os.listdir(output_dir)
    for name in sorted(names, key=lambda n: n.endswith(".old")):  # plain names first
        match = _CHECKPOINT_PATTERN.match(name) or _RETIRED_PATTERN.match(name)
        if match and int(match.group(1)) not in found and os.path.isfile(os.path.join(output_dir, name, PROGRESS_NAME)):
            found[int(match.group(1))] = os.path.join(output_dir, name)
    return sorted(found.items())


def incomplete_checkpoints(output_dir: str) -> List[str]:
    """``checkpoint-<step>`` folders of ``output_dir`` without a progress file (emptied, or not a checkpoint),
    which :func:`list_checkpoints` passes over."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        os.path.join(output_dir, name) for name in os.listdir(output_dir)
        if _CHECKPOINT_PATTERN.match(name) and not os.path.isfile(os.path.join(output_dir, name, PROGRESS_NAME))
    )


def checkpoint_step(path: str) -> int:
    """The optimizer step a checkpoint folder was saved at (from its progress file)."""
    return TrainingProgress.load(path).global_step


# ------------------------------------------------------------------------------------------------
# Manifest and verification
# ------------------------------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: str) -> List[str]:
    """Every file of a checkpoint folder except the manifest, as ``/``-separated relative paths, sorted."""
    found = []
    for directory, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(directory, name), folder).replace(os.sep, "/")
            if relative != MANIFEST_NAME:
                found.append(relative)
    return sorted(found)


def write_manifest(folder: str, step: int) -> str:
    """Write ``checkpoint_manifest.json``: the size and SHA-256 of every file of the checkpoint."""
    names = _checkpoint_files(folder)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda name: file_sha256(os.path.join(folder, name)), names))
    files = {name: {"size": os.path.getsize(os.path.join(folder, name)), "sha256": digest} for name, digest in zip(names, digests)}
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def verify_checkpoint(folder: str) -> Optional[str]:
    """What is wrong with the checkpoint in ``folder`` (a missing, truncated, emptied or changed file, an
    unreadable progress file or manifest), or None when every file matches its manifest."""
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if not has_manifest(folder):  # saved before manifests existed, or the manifest was deleted: only the progress file
        return _progress_problem(folder)
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = manifest["files"]
        assert manifest.get("format") == MANIFEST_FORMAT and isinstance(files, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as error:
        return f"{MANIFEST_NAME} cannot be read ({type(error).__name__}: {error})"
    for name, expected in sorted(files.items()):
        path = os.path.join(folder, *name.split("/"))
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            what = "empty" if size == 0 else ("truncated" if size < expected["size"] else "longer than saved")
            return f"{name} is {what} ({size} bytes; {expected['size']} were saved)"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} has changed since it was saved (its SHA-256 differs from the manifest's)"
    return _progress_problem(folder)


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME))


def _progress_problem(folder: str) -> Optional[str]:
    try:
        TrainingProgress.load(folder)
    except ValueError as error:
        return str(error)
    return None


# ------------------------------------------------------------------------------------------------
# Choosing where to resume
# ------------------------------------------------------------------------------------------------


def _explicit_checkpoint(config: TrainingConfig) -> str:
    choice = config.resume_from_checkpoint
    path = choice if os.path.isdir(choice) else os.path.join(config.output_dir, choice)
    if not os.path.isfile(os.path.join(path, PROGRESS_NAME)):
        raise ValueError(
            f"`resume_from_checkpoint` must be \"latest\" or a checkpoint folder; {choice!r} is not a complete checkpoint."
        )
    problem = verify_checkpoint(path)
    if not problem and not has_manifest(path):
        logger.warning(f"{path} has no {MANIFEST_NAME} (saved by an older diffusers-mask2dit, or deleted): its files cannot be verified.")
    if problem:
        earlier = [p for step, p in list_checkpoints(config.output_dir) if p != path and not verify_checkpoint(p)]
        hint = f" Complete checkpoints in {config.output_dir}: {', '.join(earlier)}." if earlier else ""
        raise ValueError(f"`resume_from_checkpoint` {path} is damaged: {problem}.{hint}")
    return path


def resolve_resume_checkpoint(config: TrainingConfig) -> Optional[str]:
    """The checkpoint folder to resume from: None (fresh start), the newest complete one in ``output_dir``
    for ``"latest"`` (damaged newer ones are passed over with a warning naming the problem), or a given
    path (which must verify).

    Raises:
        ValueError: the given checkpoint is damaged, or ``"latest"`` finds checkpoints but none is complete.
    """
    choice = config.resume_from_checkpoint
    if not choice:
        return None
    if choice != "latest":
        return _explicit_checkpoint(config)
    for folder in incomplete_checkpoints(config.output_dir):
        what = "an empty folder" if not os.listdir(folder) else f"no {PROGRESS_NAME}"
        logger.warning(f"Skipping {folder}: {what}, so it is not a complete checkpoint (left as it is).")
    checkpoints = list_checkpoints(config.output_dir)
    if not checkpoints:
        logger.info(f"No checkpoint in {config.output_dir}; starting a new run.")
        return None
    problems, unverified = [], []
    for _, path in reversed(checkpoints):
        problem = verify_checkpoint(path)
        if problem is None and not has_manifest(path):
            unverified.append(path)  # not trusted over an older checkpoint that verifies
            continue
        if problem is None:
            for newer in unverified:
                logger.warning(
                    f"Not resuming from {newer}: it has no {MANIFEST_NAME}, so its files cannot be verified; resuming from "
                    f"{path}, which verifies. To resume from {newer} anyway, set `resume_from_checkpoint` to it."
                )
            return path
        problems.append(f"{path}: {problem}")
        logger.warning(f"Not resuming from {path}: {problem}. Trying the previous checkpoint.")
    if unverified:  # a run saved before manifests existed: nothing verifies, the newest is the best there is
        logger.warning(f"{unverified[0]} has no {MANIFEST_NAME} and no checkpoint in {config.output_dir} verifies: resuming from it unverified.")
        return unverified[0]
    raise ValueError(
        f"No complete checkpoint in {config.output_dir} to resume from: " + "; ".join(problems)
        + ". Remove or repair them, or set `resume_from_checkpoint` to none to start over."
    )


def check_resumable_by(path: str, config: TrainingConfig) -> None:
    """Refuse a checkpoint whose trainable weights do not fit ``config``'s fine-tuning (LoRA vs full, LoRA rank),
    naming the mismatch and the checkpoint, before accelerate fails on it deep inside torch."""
    saved = "lora" if os.path.isfile(os.path.join(path, LORA_WEIGHT_FILE)) else (
        "full" if os.path.isfile(os.path.join(path, FULL_WEIGHT_FILE)) else None)
    if saved is None:
        return  # DeepSpeed / FSDP layouts: their engines check the shapes themselves
    if saved != config.finetune:
        raise ValueError(
            f"`resume_from_checkpoint` {path} holds {'LoRA adapters' if saved == 'lora' else 'fully fine-tuned weights'} "
            f"(finetune: {saved}) but this run has `finetune: {config.finetune}`; resume with `finetune: {saved}`, or start "
            f"the new mode from the trained weights in another `output_dir`."
        )
    if saved == "lora":
        rank = lora_rank_of(os.path.join(path, LORA_WEIGHT_FILE))
        if rank is not None and rank != config.lora_rank:
            raise ValueError(
                f"`resume_from_checkpoint` {path} was trained with LoRA rank {rank} but this run has `lora_rank: {config.lora_rank}`; "
                f"resume with `lora_rank: {rank}`, or start a run of the new rank in another `output_dir`."
            )


def lora_rank_of(weight_file: str) -> Optional[int]:
    """The rank of the LoRA adapters in a diffusers LoRA safetensors file (rows of its first ``lora_A``), or None."""
    from safetensors import safe_open

    try:
        with safe_open(weight_file, framework="pt") as handle:
            name = next((key for key in handle.keys() if ".lora_A." in key), None)
            return None if name is None else int(handle.get_slice(name).get_shape()[0])
    except Exception:  # unreadable: verification and loading report it with their own message
        return None


def load_training_state(accelerator: Any, path: str) -> None:
    """``accelerator.load_state(path)``; a pickled file holding anything but tensors is refused in one line naming it."""
    import pickle

    try:
        accelerator.load_state(path)
    except pickle.UnpicklingError as error:
        culprit = _refused_pickle(path) or path
        raise ValueError(
            f"Refused to unpickle {culprit}: {refusal_reason(error)} Nothing in it was run. The file was replaced or "
            "tampered with after saving; resume from another checkpoint."
        ) from None


def _refused_pickle(folder: str) -> Optional[str]:
    """The first pickled file of ``folder`` that the weights-only loader refuses."""
    import pickle

    from accelerate.utils import load

    for name in sorted(os.listdir(folder)):
        if name.endswith((".bin", ".pkl", ".pt")):
            try:
                load(os.path.join(folder, name), map_location="cpu")
            except pickle.UnpicklingError:
                return os.path.join(folder, name)
            except Exception:
                continue
    return None


def retire_newer_checkpoints(output_dir: str, step: int) -> List[str]:
    """Rename the checkpoints of ``output_dir`` newer than ``step`` (an abandoned run's) to
    ``checkpoint-<n>.abandoned[-k]``, so that no later ``latest`` or keep-last-K picks them. Returns the new names."""
    renamed = []
    for found_step, path in list_checkpoints(output_dir):
        if found_step <= step:
            continue
        target = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{found_step}{ABANDONED_SUFFIX}")
        index = 1
        while os.path.exists(target):
            index += 1
            target = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{found_step}{ABANDONED_SUFFIX}-{index}")
        os.rename(path, target)
        renamed.append(target)
        logger.warning(
            f"{path} is newer than the step this run starts from ({step}): it belongs to an abandoned run and was "
            f"renamed to {target} (delete it when you no longer need it)."
        )
    return renamed


def check_writable(output_dir: str) -> None:
    """Create ``output_dir`` and write and remove a probe file in it, so that an unwritable folder (read-only,
    no permission) stops the run before the first step, not at the first save."""
    probe = os.path.join(output_dir, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"mask2dit")
            handle.flush()
            os.fsync(handle.fileno())
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"`output_dir` {output_dir} is not writable ({type(error).__name__}: {error.strerror or error}); "
            "checkpoints and weights could not be saved. Choose another folder or fix its permissions."
        ) from None


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------


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


def _clean_leftovers(output_dir: str) -> None:
    """Remove what interrupted saves and removals left: temporary folders, and ``.old`` copies of a step
    that was saved again (restored when the new copy never arrived)."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith((f".tmp-{CHECKPOINT_PREFIX}", f".tmp-delete-{CHECKPOINT_PREFIX}")):
            shutil.rmtree(path, ignore_errors=True)
        elif _RETIRED_PATTERN.match(name):
            current = path[: -len(".old")]
            if os.path.exists(current):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, current)


def _remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder, first renaming it so that a crash halfway never leaves it listed."""
    doomed = os.path.join(os.path.dirname(path), f".tmp-delete-{os.path.basename(path)}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _out_of_space(error: BaseException, folder: str) -> bool:
    chain = [error, error.__cause__, error.__context__]
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in chain if e is not None):
        return True
    if any(marker in str(e) for e in chain if e is not None for marker in ("No space left", "Disk quota exceeded")):
        return True
    try:
        return shutil.disk_usage(folder).free < _FULL_DISK_BYTES
    except OSError:
        return False


def as_disk_full(error: BaseException, folder: str, what: str) -> Optional[DiskFullError]:
    """A one-line `DiskFullError` when ``error`` (raised while saving ``what`` under ``folder``) came from a full
    disk, else None. Call it before freeing the partial save: the free space is part of the evidence."""
    if isinstance(error, DiskFullError) or not isinstance(error, (OSError, RuntimeError)) or not _out_of_space(error, folder):
        return None
    detail = " ".join(str(error).split())[:200] or type(error).__name__
    return DiskFullError(
        f"No space left on device in {folder} while saving {what} ({detail}); the partial save was removed and what "
        "was saved before is intact. Free space, then resume with `resume_from_checkpoint: latest`."
    )


@contextmanager
def disk_full_as_error(folder: str, what: str) -> Iterator[None]:
    """Turn a write that failed for lack of space under ``folder`` into a `DiskFullError`."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        full = as_disk_full(error, folder, what)
        if full is None:
            raise
        raise full from None


def save_checkpoint(accelerator: Any, output_dir: str, progress: TrainingProgress, total_limit: Optional[int]) -> str:
    """Save the full training state to ``output_dir/checkpoint-<step>`` atomically; keep the newest ``total_limit``.

    Every process must call this (optimizer and RNG states are per process; DeepSpeed shards them). The
    manifest is written last, after the progress file; the folder is renamed into place only then.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{progress.global_step}")
    staging = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{progress.global_step}")
    if accelerator.is_main_process:
        _clean_leftovers(output_dir)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(accelerator, staging, final, progress)
    except BaseException as error:
        full = as_disk_full(error, output_dir, f"checkpoint-{progress.global_step}")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # gives a full disk its space back
        if full is not None:
            raise full from None
        raise
    if accelerator.is_main_process:
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                _remove_checkpoint(path)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(accelerator: Any, staging: str, final: str, progress: TrainingProgress) -> None:
    accelerator.save_state(staging, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress.save(staging)
        write_manifest(staging, progress.global_step)  # written last: it vouches for every other file
        replace_folder(staging, final)  # the same step may have been saved before (e.g. by a resumed run)
