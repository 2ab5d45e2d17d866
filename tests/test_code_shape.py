"""The package's shape rules (issues 13 and 21), measured on the source with ``ast``:

- no file in ``src/`` over 700 lines;
- no function over 60 code lines (its body's lines, blank lines, comment lines and the docstring aside);
- no import that runs upward: the Shapes world (``shapes/``, the example on top) is imported by nothing in the
  library; only the ``mask2dit`` command table (``cli.py``) names its command module;
- no import cycle between modules, counting imports inside functions and ``importlib.import_module("...")`` calls.

Each counter is also run on a small made-up package, so a broken counter cannot pass by finding nothing.
"""

import ast
import pathlib
from typing import Dict, List, Set

import diffusers_mask2dit

PACKAGE = pathlib.Path(diffusers_mask2dit.__file__).parent
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 60
EXAMPLE_PACKAGE = "shapes"  # the top floor: it uses the library, never the reverse
TOP_MODULES = ("cli",)  # the command table, above everything


def _docstring_lines(node: ast.AST) -> Set[int]:
    body = getattr(node, "body", [])
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return set(range(first.lineno, first.end_lineno + 1))
    return set()


def _code_lines(node: ast.AST, lines: List[str]) -> int:
    """Lines of ``node``'s body that hold code (not blank, not only a comment, not the docstring)."""
    docstring = _docstring_lines(node)
    numbers = range(node.body[0].lineno, node.end_lineno + 1)
    return sum(1 for n in numbers if n not in docstring and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#"))


def _long_functions(path: pathlib.Path, root: pathlib.Path = PACKAGE):
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            count = _code_lines(node, lines)
            if count > MAX_FUNCTION_LINES:
                yield f"{path.relative_to(root)}:{node.lineno} {node.name} ({count} code lines)"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name] + parts)


def _imports(path: pathlib.Path, root: pathlib.Path, modules: Set[str]) -> Set[str]:
    """The package modules ``path`` imports, anywhere in it (functions included), also by ``import_module("x")``."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` (not a module) runs pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            targets = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            targets = [node.value]  # a module named in a table that import_module walks (the command table)
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph(root: pathlib.Path = PACKAGE) -> Dict[str, Set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {_module_name(p, root) for p in paths}
    return {_module_name(p, root): _imports(p, root, modules) for p in paths}


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def upward_imports(graph: Dict[str, Set[str]], root_name: str = PACKAGE.name) -> List[str]:
    example = f"{root_name}.{EXAMPLE_PACKAGE}"
    top = {f"{root_name}.{name}" for name in TOP_MODULES}
    return sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        if not (source == example or source.startswith(example + ".")) and source not in top
        for target in targets
        if target == example or target.startswith(example + ".")
    )


def test_no_file_longer_than_700_lines():
    long_files = {
        str(path.relative_to(PACKAGE)): count
        for path in sorted(PACKAGE.rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    }
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"


def test_no_function_longer_than_60_code_lines():
    too_long = [entry for path in sorted(PACKAGE.rglob("*.py")) for entry in _long_functions(path)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} code lines (docstrings aside): {too_long}"


def test_the_counter_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}  # a comment\n\n    # only a comment" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "long.py"
    source.write_text(f'def f():\n    """Doc."""\n{body}\n    return 0\n\ndef g():\n{body}\n', encoding="utf-8")
    assert [entry.split(" ")[1] for entry in _long_functions(source, tmp_path)] == ["f"]


def test_no_import_cycle_between_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, f"import cycles (imports in functions and import_module included): {cycles}"


def test_the_example_world_is_imported_by_nothing_in_the_library():
    graph = import_graph()
    assert not upward_imports(graph), upward_imports(graph)
    assert f"{PACKAGE.name}.{EXAMPLE_PACKAGE}.demo" in graph[f"{PACKAGE.name}.cli"]  # the table does name it


def _write_package(root: pathlib.Path, files: Dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_the_import_counters_see_cycles_and_upward_imports(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b\n",  # inside a function
        "b.py": "import importlib\nimportlib.import_module('pkg.c')\n",  # by import_module
        "c.py": "from .a import f\n",
        "lib.py": "from .shapes.world import x\n",  # upward
        "cli.py": "MODULES = ('pkg.shapes.world',)\n",  # the top may name it
        "shapes/__init__.py": "",
        "shapes/world.py": "from ..lib import y\n",
    })
    graph = import_graph(package)
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.lib", "pkg.shapes.world"]]
    assert upward_imports(graph, "pkg") == ["pkg.lib -> pkg.shapes.world"]
