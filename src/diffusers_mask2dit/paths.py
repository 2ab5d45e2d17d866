"""Paths read from folders and files we do not control, kept inside the folder they belong to.

Publishing (``mask2dit hub build``, ``convert-official``, ``hub push``) copies only files that are inside the
source folder, following no symbolic link out of it; names read from an index (a shard index's
``weight_map``, a latent cache's file names) must stay inside the index's folder. Every refusal names the
offending path. A Hugging Face cache snapshot is the one allowed exception: its files are links into the
same cached repository's ``blobs/`` folder, so the repository folder counts as the source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional


class UnsafePathError(ValueError):
    """A path leaves the folder it must stay in (``..``, an absolute path, or a symbolic link out of it)."""


def is_within(path: os.PathLike | str, root: os.PathLike | str) -> bool:
    """Whether ``path`` is ``root`` or below it (both taken as they are: resolve them first when needed)."""
    path, root = Path(path), Path(root)
    return path == root or root in path.parents


def allowed_root(folder: os.PathLike | str) -> Path:
    """The folder whose inside a link under ``folder`` may point to: ``folder`` itself (resolved), or for a
    folder inside a Hugging Face cache snapshot (``models--owner--name/snapshots/<revision>/...``) the
    cached repository folder, which holds the ``blobs/`` the snapshot's links point to."""
    resolved = Path(folder).resolve()
    for parent in (resolved, *resolved.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith(("models--", "datasets--")):
            return parent.parent.parent
    return resolved


def check_inside(path: os.PathLike | str, root: os.PathLike | str, what: str) -> Path:
    """``path`` resolved, when it (following its links) is inside ``allowed_root(root)``; else UnsafePathError."""
    path = Path(path)
    resolved = path.resolve()
    if not is_within(resolved, allowed_root(root)):
        how = f"a symbolic link to {resolved}" if path.is_symlink() or resolved != path.absolute() else "outside it"
        raise UnsafePathError(f"{what} {path} is {how}, outside {Path(root)}: refused (nothing outside the source folder is read or published).")
    return resolved


def confined(root: os.PathLike | str, name: str, what: str) -> Path:
    """``root / name`` for a relative ``name`` that stays in ``root`` (also after following links).

    ``what`` says where the name comes from, e.g. ``"weight_map entry 'x.weight' of model.bin.index.json"``.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what} must be a file name, got {name!r}.")
    if os.path.isabs(name) or name.startswith(("~", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"{what} is an absolute path ({name!r}); only names inside {root} are accepted.")
    path = Path(root) / name
    if not is_within(Path(os.path.normpath(path)), Path(os.path.normpath(root))):
        raise UnsafePathError(f"{what} ({name!r}) leaves {root} through '..'; only names inside it are accepted.")
    check_inside(path, root, what)
    return path


def files_under(folder: os.PathLike | str, what: str = "file", root: Optional[os.PathLike | str] = None) -> List[Path]:
    """Every file below ``folder`` (sorted, as paths below ``folder``), refusing any link that leads outside
    ``root`` (default: ``folder``). Linked folders inside the root are walked once."""
    folder = Path(folder)
    root = Path(root) if root is not None else folder
    found: List[Path] = []
    seen = set()
    for directory, dirnames, filenames in os.walk(folder, followlinks=True):
        real = check_inside(directory, root, what if Path(directory) == folder else f"{what} folder")
        if real in seen:
            dirnames[:] = []  # a link back to a folder already walked
            continue
        seen.add(real)
        for name in filenames:
            path = Path(directory) / name
            check_inside(path, root, what)
            found.append(path)
    return sorted(found)


def check_model_reference(value: str, name: str) -> str:
    """``value`` when it is an existing local folder or looks like a Hub id (``owner/name``); else a
    ValueError naming ``name`` (rather than huggingface_hub's "Repo id must use alphanumeric chars")."""
    if os.path.isdir(value):
        return value
    looks_local = value.startswith((".", "/", "~", "\\")) or os.sep in value.strip("/").replace("/", "", 1) or os.path.exists(value)
    if looks_local:
        problem = "is not a folder" if os.path.exists(value) else "does not exist"
        raise ValueError(
            f"`{name}` {value!r} {problem}: give a local model folder or a Hub id such as THUDM/CogVideoX-5b."
        )
    return value
