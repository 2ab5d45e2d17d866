"""The package's shape rules (issue 13): functions fit on a screen, the pipeline file stays small.

Counted as the issue counts them: a function's lines from ``def`` to its last line, its docstring aside.
"""

import ast
import pathlib

import diffusers_mask2dit

PACKAGE = pathlib.Path(diffusers_mask2dit.__file__).parent
MAX_FUNCTION_LINES = 80
MAX_PIPELINE_LINES = 700


def _docstring_lines(node: ast.AST) -> int:
    body = getattr(node, "body", [])
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def _long_functions(path: pathlib.Path, root: pathlib.Path = PACKAGE):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
            if lines > MAX_FUNCTION_LINES:
                yield f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)"


def test_no_function_longer_than_a_screen():
    too_long = [entry for path in sorted(PACKAGE.rglob("*.py")) for entry in _long_functions(path)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (docstrings aside): {too_long}"


def test_the_counter_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "long.py"
    source.write_text(f'def f():\n    """Doc."""\n{body}\n', encoding="utf-8")
    assert [entry.split(" ")[1] for entry in _long_functions(source, tmp_path)] == ["f"]


def test_pipeline_file_is_small():
    lines = len((PACKAGE / "pipeline.py").read_text(encoding="utf-8").splitlines())
    assert lines < MAX_PIPELINE_LINES, f"pipeline.py has {lines} lines; keep it under {MAX_PIPELINE_LINES}"
