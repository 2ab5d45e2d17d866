"""``mask2dit hub push``: upload a built folder to the Hugging Face Hub with ``huggingface_hub``.

The token is whatever ``huggingface_hub`` finds on its own (``hf auth login``, ``HF_TOKEN``): this module
never reads, prints or writes it. ``dry_run`` lists what would be uploaded and touches no network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Files never uploaded: caches and editor / OS leftovers.
IGNORE_PATTERNS = ["**/__pycache__/**", "**/.DS_Store", ".git/**", ".cache/**", "**/*.pyc"]


class PushError(ValueError):
    """The folder or the arguments are not fit for an upload."""


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    revision: Optional[str]
    private: bool
    commit_message: str
    files: List[Tuple[str, int]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        target = f"{self.repo_id}" + (f" (branch {self.revision})" if self.revision else "")
        lines = [
            f"{'Private' if self.private else 'Public'} model repo {target}: {len(self.files)} files, "
            f"{_human(self.total_bytes)}; commit message {self.commit_message!r}"
        ]
        width = max((len(name) for name, _ in self.files), default=0)
        lines += [f"  {name.ljust(width)}  {_human(size):>10}" for name, size in self.files]
        return "\n".join(lines)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _ignored(relative: str) -> bool:
    parts = relative.split("/")
    return "__pycache__" in parts or parts[0] in (".git", ".cache") or relative.endswith((".pyc", ".DS_Store"))


def plan_push(
    folder: os.PathLike | str,
    repo_id: str,
    revision: Optional[str] = None,
    private: bool = False,
    commit_message: Optional[str] = None,
) -> PushPlan:
    """Check the folder and arguments and list the files that would be uploaded (no network)."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise PushError(f"--folder {folder} is not a folder.")
    if not REPO_ID_PATTERN.match(repo_id or ""):
        raise PushError(f"`--repo-id` must be a Hub id `owner/name`, got {repo_id!r}.")
    if revision is not None and (not revision.strip() or revision != revision.strip()):
        raise PushError(f"--revision must be a branch name without surrounding spaces, got {revision!r}.")
    if not (folder / "README.md").is_file():
        raise PushError(f"{folder} has no README.md (model card): build it with `mask2dit hub build` first.")
    if not (folder / "pipeline.py").is_file():
        raise PushError(f"{folder} has no pipeline.py: build it with `mask2dit hub build` first.")
    from ..paths import UnsafePathError, files_under

    try:
        paths = files_under(folder, "--folder file")  # a link out of the folder would upload what it points to
    except UnsafePathError as error:
        raise PushError(str(error)) from None
    files = []
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        if not _ignored(relative):
            files.append((relative, path.stat().st_size))
    return PushPlan(
        folder=folder,
        repo_id=repo_id,
        revision=revision,
        private=private,
        commit_message=commit_message or "Upload Mask²DiT model (mask2dit hub push)",
        files=files,
    )


def push_folder(plan: PushPlan, api: Optional[Any] = None) -> Any:
    """Create the repository (if needed), the branch (if ``plan.revision`` names a new one), upload the folder.

    Args:
        plan: from :func:`plan_push`.
        api: a ``huggingface_hub.HfApi`` (default: a new one, which uses the login of ``hf auth login``).

    Returns:
        The ``CommitInfo`` of the upload.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    # private=None leaves the Hub's default (public, or the organisation's setting); an existing repo keeps its own.
    api.create_repo(plan.repo_id, private=True if plan.private else None, exist_ok=True, repo_type="model")
    if plan.revision and plan.revision != "main":
        api.create_branch(plan.repo_id, branch=plan.revision, repo_type="model", exist_ok=True)
    return api.upload_folder(
        folder_path=str(plan.folder),
        repo_id=plan.repo_id,
        repo_type="model",
        revision=plan.revision,
        commit_message=plan.commit_message,
        ignore_patterns=IGNORE_PATTERNS,
    )
