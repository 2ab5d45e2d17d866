"""Bundle the package's own modules into one self-contained ``pipeline.py`` for the Hugging Face Hub.

diffusers loads a custom pipeline from a single file (``custom_pipeline=<repo or folder>`` reads its
``pipeline.py``) in an environment where this package is not installed. Rather than keeping a second,
hand-written copy of the pipeline, the Hub file is *generated* from the package sources, so there is one
source of truth:

1. starting from the entry module (``pipeline``), follow the package-internal imports (relative, or
   absolute ``diffusers_mask2dit.<module>``) to collect every module the pipeline needs;
2. order them so that each module comes after the modules it imports at top level;
3. drop the package-internal imports (the names they bring in are now defined in the same file), merge
   and de-duplicate ``from __future__`` and top-level imports into one header block;
4. rewrite imports of optional packages that sit inside functions (e.g. ``flash_attn``) into
   ``__import__`` calls: diffusers' ``check_imports`` scans every ``import`` line of the file and asks for
   each module to be installed, which would flag optional accelerators;
5. verify the result: it compiles, no top-level name is defined twice with different code, every name a
   dropped import provided exists, and diffusers' own import scanners see only modules that a plain
   ``torch`` + ``diffusers`` + ``transformers`` environment has.

The output starts with a header naming the package version and the bundled modules.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

PACKAGE_NAME = "diffusers_mask2dit"
DEFAULT_ENTRY = "pipeline"

# Top-level modules a Hub user is guaranteed to have: the three libraries the card asks for and what
# they themselves require. Anything else must only be imported inside functions (it becomes optional).
GUARANTEED_MODULES = frozenset(
    {
        "torch",
        "diffusers",
        "transformers",
        "huggingface_hub",
        "safetensors",
        "numpy",
        "PIL",
        "packaging",
        "tqdm",
        "regex",
        "requests",
        "filelock",
        "yaml",
        "tokenizers",
    }
)

_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"__future__"}


class BundleError(ValueError):
    """The package sources cannot be bundled into one file (the message says where and why)."""


@dataclass
class _Module:
    name: str  # dotted name inside the package, e.g. "layout" or "training.data"
    path: Path
    source: str
    tree: ast.Module
    deps_top: Set[str] = field(default_factory=set)  # package modules imported at module level
    deps_all: Set[str] = field(default_factory=set)  # ... anywhere (functions included)


@dataclass
class Bundle:
    """The generated file and what went into it."""

    source: str
    modules: List[str]
    version: str

    def write(self, path: os.PathLike | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.source, encoding="utf-8")
        return path


# --------------------------------------------------------------------------------------------------
# Reading the package
# --------------------------------------------------------------------------------------------------


def package_dir() -> Path:
    """The directory of the installed (or source-checkout) ``diffusers_mask2dit`` package."""
    return Path(__file__).resolve().parent.parent


def _package_version(pkg_dir: Path) -> str:
    init = pkg_dir / "__init__.py"
    if init.is_file():
        for node in ast.parse(init.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
                if isinstance(node.value, ast.Constant):
                    return str(node.value.value)
    return "unknown"


def _module_path(pkg_dir: Path, name: str) -> Optional[Path]:
    base = pkg_dir.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _resolve_internal(current: str, is_package: bool, node: ast.ImportFrom, package: str) -> Optional[str]:
    """The package-internal module an ``ImportFrom`` names (dotted, relative to the package), else None."""
    if node.level == 0:
        mod = node.module or ""
        if mod == package:
            return ""
        if mod.startswith(package + "."):
            return mod[len(package) + 1 :]
        return None
    parts = current.split(".") if current else []
    # For a module `a.b`, level 1 is its package `a`; for a package's `__init__` (`a`), level 1 is `a` itself.
    drop = node.level - 1 if is_package else node.level
    if drop > len(parts):
        raise BundleError(f"{current}: relative import beyond the top of the package (level {node.level}).")
    base = parts[: len(parts) - drop]
    if node.module:
        base = base + node.module.split(".")
    return ".".join(base)


def _iter_imports(tree: ast.Module):
    """Yield ``(node, top_level)`` for every import statement; top_level means a direct child of the module."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, id(node) in top


def _load(pkg_dir: Path, name: str, package: str) -> _Module:
    path = _module_path(pkg_dir, name)
    if path is None:
        raise BundleError(f"The package module `{package}.{name}` was not found under {pkg_dir}.")
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise BundleError(f"{path}: cannot be parsed: {error}") from None
    module = _Module(name=name, path=path, source=source, tree=tree)
    is_package = path.name == "__init__.py"
    for node, top_level in _iter_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    raise BundleError(
                        f"{path}:{node.lineno}: `import {alias.name}` cannot be bundled; use `from .module import name`."
                    )
            continue
        target = _resolve_internal(name, is_package, node, package)
        if target is None:
            continue
        if target == "" or (_module_path(pkg_dir, target) is not None and _module_path(pkg_dir, target).name == "__init__.py"):
            # `from . import x` or `from .subpackage import x`: names would have to be looked up in an
            # __init__ that re-exports them; ask for the defining module instead.
            raise BundleError(
                f"{path}:{node.lineno}: import from the package itself (`{ast.unparse(node)}`) cannot be bundled; "
                "import the names from the module that defines them."
            )
        module.deps_all.add(target)
        if top_level:
            module.deps_top.add(target)
    return module


def collect_modules(entry: str = DEFAULT_ENTRY, pkg_dir: Optional[Path] = None, package: str = PACKAGE_NAME) -> List[_Module]:
    """The modules the entry module needs (itself included), each after the modules it imports at top level."""
    pkg_dir = Path(pkg_dir) if pkg_dir is not None else package_dir()
    found: Dict[str, _Module] = {}
    pending = [entry]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found[name] = _load(pkg_dir, name, package)
        pending.extend(sorted(found[name].deps_all - set(found)))

    ordered: List[_Module] = []
    state: Dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, chain: Tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise BundleError(f"Circular top-level imports between package modules: {' -> '.join(chain + (name,))}.")
        state[name] = 1
        for dep in sorted(found[name].deps_top):
            visit(dep, chain + (name,))
        # Modules imported only inside functions go first too when they can (code run at import time may
        # call those functions); in a cycle they simply come later, which is fine for lazy use.
        for dep in sorted(found[name].deps_all - found[name].deps_top):
            if state.get(dep) is None and not _reaches_visiting(dep):
                visit(dep, chain + (name,))
        state[name] = 2
        ordered.append(found[name])

    def _reaches_visiting(name: str) -> bool:
        """Whether ``name`` needs (at top level, transitively) a module whose visit is still open."""
        stack, seen = [name], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            for dep in found[current].deps_top:
                if state.get(dep) == 1:
                    return True
                stack.append(dep)
        return False

    visit(entry, ())
    for name in sorted(found):  # lazily imported modules that had to wait
        visit(name, ())
    return ordered


# --------------------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------------------


def _top_module(name: str) -> str:
    return name.split(".")[0]


def _is_guaranteed(module: str) -> bool:
    top = _top_module(module)
    return top in _STDLIB or top in GUARANTEED_MODULES


def _bound_names(node: ast.stmt) -> List[str]:
    """Names a top-level statement binds in the module namespace."""
    names: List[str] = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names.append(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.append(sub.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        for alias in node.names:
            names.append(alias.asname or alias.name.split(".")[0])
    return names


def _dunder_all(node: ast.stmt) -> bool:
    return isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and "__all__" in _bound_names(node)


def _import_as_call(node: ast.stmt) -> List[str]:
    """Equivalent statements for an import of an optional package that diffusers' line scanner won't see."""
    lines = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.asname:
                # `import a.b as c` binds the submodule a.b
                lines.append(f"{alias.asname} = __import__({alias.name!r}, fromlist=['_'])")
            else:
                lines.append(f"{alias.name.split('.')[0]} = __import__({alias.name!r})")
    else:
        for alias in node.names:
            if alias.name == "*":
                raise BundleError(f"line {node.lineno}: `from {node.module} import *` cannot be bundled.")
            lines.append(
                f"{alias.asname or alias.name} = __import__({node.module!r}, fromlist=[{alias.name!r}]).{alias.name}"
            )
    return lines


@dataclass
class _Edit:
    start: int  # 1-based first line
    end: int  # 1-based last line
    col: int  # indentation of the replacement
    lines: List[str]


def _rewrite_module(
    module: _Module, package: str
) -> Tuple[List[str], List[ast.stmt], List[Tuple[str, str]], Optional[str]]:
    """Rewrite one module's source.

    Returns ``(body_lines, hoisted_imports, internal_names, docstring)``: the module text with package
    imports removed and hoisted imports cut out, the top-level imports of other packages to merge into
    the header, the ``(name_imported, bound_as)`` pairs of removed package imports, and the docstring.
    """
    tree = module.tree
    lines = module.source.splitlines()
    is_package = module.path.name == "__init__.py"
    top_ids = {id(n) for n in tree.body}
    edits: List[_Edit] = []
    hoisted: List[ast.stmt] = []
    internal: List[Tuple[str, str]] = []
    docstring = ast.get_docstring(tree, clean=False)

    body = list(tree.body)
    if docstring is not None:
        first = body[0]
        edits.append(_Edit(first.lineno, first.end_lineno, 0, []))

    for node, _ in _iter_imports(tree):
        top_level = id(node) in top_ids
        indent = node.col_offset
        if isinstance(node, ast.ImportFrom) and _resolve_internal(module.name, is_package, node, package) is not None:
            aliases = []
            for alias in node.names:
                if alias.name == "*":
                    raise BundleError(f"{module.path}:{node.lineno}: `import *` from a package module cannot be bundled.")
                internal.append((alias.name, alias.asname or alias.name))
                if alias.asname and alias.asname != alias.name:
                    aliases.append(f"{alias.asname} = {alias.name}")
            replacement = aliases or ([] if top_level else ["pass"])
            edits.append(_Edit(node.lineno, node.end_lineno, indent, replacement))
            continue
        modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            if not top_level:
                raise BundleError(f"{module.path}:{node.lineno}: a `from __future__` import must be at top level.")
            hoisted.append(node)
            edits.append(_Edit(node.lineno, node.end_lineno, 0, []))
            continue
        guaranteed = all(_is_guaranteed(m) for m in modules)
        if top_level and guaranteed:
            hoisted.append(node)
            edits.append(_Edit(node.lineno, node.end_lineno, 0, []))
        elif not guaranteed:
            if top_level:
                raise BundleError(
                    f"{module.path}:{node.lineno}: `{ast.unparse(node)}` imports a package a Hub user may not have "
                    f"(only torch, diffusers, transformers and their requirements are assumed). Import it inside the "
                    "function that needs it."
                )
            edits.append(_Edit(node.lineno, node.end_lineno, indent, _import_as_call(node)))
        # guaranteed imports nested in functions / try blocks stay where they are

    for node in body:
        if _dunder_all(node):
            edits.append(_Edit(node.lineno, node.end_lineno, 0, []))

    return _apply_edits(module, lines, edits), hoisted, internal, docstring


def _apply_edits(module: _Module, lines: List[str], edits: List[_Edit]) -> List[str]:
    """``lines`` with ``edits`` applied bottom-up; an import statement may share its line with a comment, not with
    other code."""
    edits = sorted(edits, key=lambda e: e.start)
    for before, after in zip(edits, edits[1:]):
        if after.start <= before.end:
            raise BundleError(f"{module.path}:{after.start}: several statements on one line cannot be bundled.")
    for edit in reversed(edits):
        first = lines[edit.start - 1]
        if edit.col and first[: edit.col].strip():
            raise BundleError(
                f"{module.path}:{edit.start}: an import that shares its line with other code cannot be bundled."
            )
        pad = " " * edit.col
        lines[edit.start - 1 : edit.end] = [pad + text for text in edit.lines]
    return lines


def _merge_imports(nodes: Iterable[ast.stmt]) -> List[str]:
    """One sorted, de-duplicated import block: ``import x`` lines, then ``from x import a, b`` per module."""
    future: Set[str] = set()
    plain: Set[str] = set()
    from_imports: Dict[str, Set[Tuple[str, Optional[str]]]] = {}
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise BundleError(f"Unexpected relative import `{ast.unparse(node)}`.")
            if node.module == "__future__":
                future.update(alias.name for alias in node.names)
                continue
            from_imports.setdefault(node.module or "", set()).update((a.name, a.asname) for a in node.names)
        else:
            for alias in node.names:
                plain.add(f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))

    def group(name: str) -> int:
        return 0 if _top_module(name) in _STDLIB else 1

    out: List[str] = []
    if future:
        out += [f"from __future__ import {', '.join(sorted(future))}", ""]
    stmts = [(group(s.split()[1]), s.split()[1], s) for s in plain]
    for module, names in from_imports.items():
        parts = ", ".join(n + (f" as {a}" if a else "") for n, a in sorted(names, key=lambda x: (x[0], x[1] or "")))
        text = f"from {module} import {parts}"
        if len(text) > 110:
            text = f"from {module} import (\n" + "".join(f"    {part},\n" for part in parts.split(", ")) + ")"
        stmts.append((group(module), module, text))
    stmts.sort(key=lambda s: (s[0], s[2].startswith("from"), s[1], s[2]))
    previous = None
    for grp, _, text in stmts:
        if previous is not None and grp != previous:
            out.append("")
        out.append(text)
        previous = grp
    return out


# --------------------------------------------------------------------------------------------------
# Checks on the result
# --------------------------------------------------------------------------------------------------


def _check_collisions(modules: Sequence[_Module], package: str) -> Set[str]:
    """Top-level names bound by more than one module must be bound by identical code. Returns the duplicates
    (statements to drop on their second appearance, as source text)."""
    seen: Dict[str, Tuple[str, str]] = {}  # name -> (module, statement source)
    duplicates: Set[str] = set()
    for module in modules:
        is_package = module.path.name == "__init__.py"
        for node in module.tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and (
                    node.module == "__future__" or _resolve_internal(module.name, is_package, node, package) is not None
                ):
                    continue
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    if isinstance(node, ast.ImportFrom):
                        origin = f"import:{node.module}:{alias.name}"
                    else:  # `import a.b` binds `a`; `import a.b as c` binds the submodule
                        origin = f"import::{alias.name if alias.asname else alias.name.split('.')[0]}"
                    _record(seen, bound, module.name, origin, duplicates, kind="import")
                continue
            if _dunder_all(node) or (isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)):
                continue
            text = ast.unparse(node)
            for name in _bound_names(node):
                _record(seen, name, module.name, text, duplicates, kind="code")
    return duplicates


def _record(seen, name, module_name, text, duplicates, kind) -> None:
    if name in seen:
        other_module, other_text = seen[name]
        if other_module == module_name:
            seen[name] = (module_name, text)  # a module may rebind its own names
            return
        if other_text != text:
            raise BundleError(
                f"The top-level name `{name}` is defined differently in `{other_module}` and `{module_name}`; "
                "bundled into one file they would clash. Rename one of them."
            )
        if kind == "code":
            duplicates.add(text)
        return
    seen[name] = (module_name, text)


def scan_like_diffusers(source: str) -> Tuple[List[str], List[str]]:
    """What diffusers' ``check_imports`` / ``get_relative_imports`` would find in ``source``.

    Returns ``(top-level modules it would try to import, relative modules it would try to copy)``. The same
    regular expressions as diffusers' line scanner: they also match lines inside strings.
    """
    import re

    imports = re.findall(r"^\s*import\s+(\S+)\s*$", source, flags=re.MULTILINE)
    imports += re.findall(r"^\s*from\s+(\S+)\s+import", source, flags=re.MULTILINE)
    relative = re.findall(r"^\s*import\s+\.(\S+)\s*$", source, flags=re.MULTILINE)
    relative += re.findall(r"^\s*from\s+\.(\S+)\s+import", source, flags=re.MULTILINE)
    tops = sorted({imp.split(".")[0] for imp in imports if not imp.startswith(".")})
    return tops, sorted(set(relative))


def _verify(source: str, internal_names: Dict[str, List[str]]) -> None:
    try:
        tree = ast.parse(source)
        compile(tree, "<bundled pipeline.py>", "exec")
    except SyntaxError as error:
        raise BundleError(f"The bundled file does not compile: {error}") from None
    defined: Set[str] = set()
    for node in tree.body:
        defined.update(_bound_names(node))
        if isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign)):
                    defined.update(_bound_names(sub))
    for name, users in sorted(internal_names.items()):
        if name not in defined:
            raise BundleError(
                f"`{name}` is imported from a package module by {', '.join(sorted(set(users)))} but is not defined at "
                "the top level of any bundled module."
            )
    tops, relative = scan_like_diffusers(source)
    if relative:
        raise BundleError(f"diffusers would look for relative modules {relative} beside the bundled file.")
    missing = [t for t in tops if not _is_guaranteed(t)]
    if missing:
        raise BundleError(
            f"The bundled file has import lines for {missing}, which a Hub user may not have (diffusers scans every "
            "line that starts with `import`/`from ... import`, docstrings included)."
        )


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def bundle_pipeline(
    entry: str = DEFAULT_ENTRY,
    pkg_dir: Optional[os.PathLike | str] = None,
    package: str = PACKAGE_NAME,
    version: Optional[str] = None,
) -> Bundle:
    """Generate the self-contained custom-pipeline file from the package sources.

    Args:
        entry: the package module whose definitions the file must provide (``"pipeline"``).
        pkg_dir: the package directory (default: this installed package).
        package: the package's import name (only internal imports of it are bundled).
        version: the version written in the header (default: ``__version__`` of the package's ``__init__``).

    Returns:
        A :class:`Bundle`: ``.source`` is the file's text, ``.modules`` the bundled modules in order.

    Raises:
        BundleError: when the sources use a construct that cannot be flattened safely (see the module doc).
    """
    pkg_dir = Path(pkg_dir) if pkg_dir is not None else package_dir()
    version = version or _package_version(pkg_dir)
    modules = collect_modules(entry, pkg_dir, package)

    pieces: List[Tuple[_Module, List[str], Optional[str]]] = []
    hoisted_all: List[ast.stmt] = []
    internal_names: Dict[str, List[str]] = {}
    for module in modules:
        lines, hoisted, internal, docstring = _rewrite_module(module, package)
        pieces.append((module, lines, docstring))
        hoisted_all.extend(hoisted)
        for name, _ in internal:
            internal_names.setdefault(name, []).append(module.name)
    duplicates = _check_collisions(modules, package)

    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.name.encode() + b"\0" + module.source.encode("utf-8") + b"\0")
    names = [m.name for m in modules]
    out: List[str] = [
        '"""Mask²DiT custom pipeline for diffusers (self-contained: needs torch, diffusers and transformers only).',
        "",
        f"Generated from diffusers-mask2dit {version} by `mask2dit hub build`, which bundles the package modules",
        f"{', '.join(names)} into this one file. Do not edit it by hand: change the package and rebuild.",
        '"""',
        f"# diffusers-mask2dit version: {version}",
        f"# bundled modules: {', '.join(names)}",
        f"# sources sha256: {digest.hexdigest()}",
        "",
    ]
    out += _merge_imports(hoisted_all)

    emitted_duplicates: Set[str] = set()
    for module, lines, docstring in pieces:
        out += ["", "", "# " + "=" * 98, f"# {package}/{module.path.relative_to(pkg_dir).as_posix()}", "# " + "=" * 98]
        if docstring:
            out += ["#"] + [("# " + line).rstrip() for line in docstring.strip("\n").splitlines()] + ["#"]
        text = "\n".join(lines)
        if duplicates:
            text = _drop_duplicates(text, duplicates, emitted_duplicates, module)
        out.append(text.strip("\n"))
    source = "\n".join(out).rstrip("\n") + "\n"
    while "\n\n\n\n" in source:
        source = source.replace("\n\n\n\n", "\n\n\n")
    _verify(source, internal_names)
    return Bundle(source=source, modules=names, version=version)


def _drop_duplicates(text: str, duplicates: Set[str], emitted: Set[str], module: _Module) -> str:
    """Remove top-level statements already emitted by an earlier module with identical code."""
    tree = ast.parse(text)
    lines = text.splitlines()
    for node in sorted(tree.body, key=lambda n: n.lineno, reverse=True):
        code = ast.unparse(node)
        if code in duplicates:
            if code in emitted:
                lines[node.lineno - 1 : node.end_lineno] = []
    for node in tree.body:
        code = ast.unparse(node)
        if code in duplicates:
            emitted.add(code)
    return "\n".join(lines)


def write_pipeline_file(out_dir: os.PathLike | str, entry: str = DEFAULT_ENTRY, filename: str = "pipeline.py") -> Bundle:
    """Bundle the package and write ``<out_dir>/<filename>``; returns the :class:`Bundle`."""
    bundle = bundle_pipeline(entry)
    bundle.write(Path(out_dir) / filename)
    return bundle
