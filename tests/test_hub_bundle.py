"""The bundler that turns the package modules into the one-file Hub ``pipeline.py``."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import types
from pathlib import Path

import pytest

from diffusers_mask2dit.hub.bundle import (
    GUARANTEED_MODULES,
    BundleError,
    bundle_pipeline,
    scan_like_diffusers,
)

# The package modules the one-file Hub pipeline bundles, in dependency order.
BUNDLED_MODULES = [
    "layout", "attention", "pipeline_inputs", "parallel", "scene_norms", "transformer", "generation_plan", "ditctrl",
    "release_loading",
    "pipeline",
]


def _package(tmp_path: Path, files: dict, name: str = "fakepkg") -> Path:
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text('__version__ = "9.9.9"\n')
    for filename, source in files.items():
        (root / filename).write_text(textwrap.dedent(source).lstrip("\n"))
    return root


def _exec(source: str, module_name: str) -> types.ModuleType:
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module  # dataclasses and `from __future__ import annotations` look it up
    try:
        exec(compile(source, f"<{module_name}>", "exec"), module.__dict__)
    finally:
        sys.modules.pop(module_name, None)
    return module


FAKE = {
    "a.py": '''
        """Module a: a docstring that becomes comments."""
        from __future__ import annotations

        import math
        import os.path
        from typing import List

        SHARED = "same in a and b"
        CONST = 3


        def helper(values: List[int]) -> int:
            return len(values) + CONST + int(math.floor(0.5))
    ''',
    "b.py": '''
        from __future__ import annotations

        import os
        from typing import Dict, List

        from .a import CONST as BASE
        from .a import helper

        SHARED = "same in a and b"
        __all__ = ["use"]


        def use() -> int:
            try:
                from flash_attn import flash_attn_interface  # optional accelerator
            except ImportError:
                flash_attn_interface = None
            from .c import late as later

            table: Dict[str, List[int]] = {"x": [1]}
            return helper(table["x"]) + BASE + later() + (0 if flash_attn_interface is None else 100)
    ''',
    "c.py": '''
        def late():
            return 5
    ''',
    "pipeline.py": '''
        from dataclasses import dataclass

        import numpy as np

        from .b import use


        @dataclass
        class Output:
            value: int


        VALUE = Output(use())  # runs at import time: needs c (imported lazily by b) defined before
        ARRAY = np.zeros(2)
    ''',
}


def test_bundle_fake_package(tmp_path):
    pkg = _package(tmp_path, FAKE)
    bundle = bundle_pipeline(pkg_dir=pkg, package="fakepkg")
    source = bundle.source
    # Dependency order: a before b, c (lazy) before the entry whose import-time code calls it.
    assert bundle.modules.index("a") < bundle.modules.index("b") < bundle.modules.index("pipeline")
    assert bundle.modules.index("c") < bundle.modules.index("pipeline")
    assert bundle.version == "9.9.9" and "diffusers-mask2dit 9.9.9" in source
    # Imports merged and de-duplicated; package imports gone; aliases kept as assignments.
    assert source.count("from __future__ import annotations") == 1
    assert source.index("from __future__ import annotations") < source.index("import math")
    assert source.count("import math\n") == 1
    assert "from typing import Dict, List\n" in source
    assert "from .a" not in source and "from .c" not in source and "fakepkg" not in source.split('"""', 2)[2].replace("# fakepkg/", "")
    assert "BASE = CONST" in source and "later = late" in source
    # The optional import is hidden from diffusers' line scanner but behaves the same.
    assert "__import__('flash_attn', fromlist=['flash_attn_interface'])" in source
    modules, relative = scan_like_diffusers(source)
    assert "flash_attn" not in modules and relative == []
    # Identical definitions in two modules appear once; __all__ is dropped; docstrings become comments.
    assert source.count('SHARED = "same in a and b"') == 1
    assert "__all__" not in source
    assert "# Module a: a docstring that becomes comments." in source
    module = _exec(source, "bundled_fake")
    assert module.VALUE.value == 1 + 3 + 3 + 5
    assert bundle_pipeline(pkg_dir=pkg, package="fakepkg").source == source  # deterministic


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.py": "def f():\n    return 1\n", "pipeline.py": "from .a import f\n\ndef f2():\n    return 2\nf = 3\n"},
         "defined differently"),
        ({"a.py": "X = 1\n", "pipeline.py": "from .a import *\n"}, "import \\*"),
        ({"pipeline.py": "import flash_attn\n"}, "may not have"),
        ({"pipeline.py": 'def f():\n    """Example:\n\n    from somewhere_else import thing\n    """\n'}, "somewhere_else"),
        ({"a.py": "from .pipeline import Y\nX = 1\n", "pipeline.py": "from .a import X\nY = 2\n"}, "Circular"),
        ({"pipeline.py": "from .a import missing_name\n", "a.py": "X = 1\n"}, "missing_name"),
        ({"pipeline.py": "from . import a\n", "a.py": "X = 1\n"}, "import from the package itself"),
        ({"pipeline.py": "import fakepkg.a\n", "a.py": "X = 1\n"}, "cannot be bundled"),
    ],
    ids=["clash", "star", "optional-top-level", "docstring-import-line", "cycle", "missing-name", "from-dot", "absolute"],
)
def test_bundle_refuses_unsafe_sources(tmp_path, files, message):
    pkg = _package(tmp_path, files)
    with pytest.raises(BundleError, match=message):
        bundle_pipeline(pkg_dir=pkg, package="fakepkg")


def test_bundle_absolute_package_imports_are_internal(tmp_path):
    pkg = _package(tmp_path, {"a.py": "X = 1\n", "pipeline.py": "from fakepkg.a import X\nY = X + 1\n"})
    bundle = bundle_pipeline(pkg_dir=pkg, package="fakepkg")
    assert bundle.modules == ["a", "pipeline"]
    assert _exec(bundle.source, "bundled_abs").Y == 2


def test_bundle_of_the_real_package_loads_like_diffusers_does(tmp_path):
    import diffusers_mask2dit
    from diffusers.utils.dynamic_modules_utils import find_pipeline_class

    bundle = bundle_pipeline()
    assert bundle.modules == BUNDLED_MODULES
    assert bundle.version == diffusers_mask2dit.__version__
    assert f"Generated from diffusers-mask2dit {diffusers_mask2dit.__version__}" in bundle.source
    modules, relative = scan_like_diffusers(bundle.source)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert relative == []
    assert set(modules) <= stdlib | GUARANTEED_MODULES, set(modules) - stdlib - GUARANTEED_MODULES
    assert "diffusers_mask2dit" not in modules

    path = tmp_path / "pipeline.py"
    bundle.write(path)
    spec = importlib.util.spec_from_file_location("bundled_mask2dit_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        # diffusers takes the one DiffusionPipeline subclass defined outside diffusers: ours, and only ours.
        assert find_pipeline_class(module) is module.Mask2DiTPipeline
        assert module.Mask2DiTPipeline is not diffusers_mask2dit.Mask2DiTPipeline
        assert module.Mask2DiTTransformer3DModel.__module__ == "bundled_mask2dit_pipeline"
    finally:
        sys.modules.pop(spec.name, None)


def test_cli_bundle_writes_the_file(tmp_path, capsys):
    from diffusers_mask2dit.cli import main

    out = tmp_path / "pipeline.py"
    assert main(["hub", "bundle", "--out", str(out)]) == 0
    assert out.read_text() == bundle_pipeline().source
    assert ", ".join(BUNDLED_MODULES) in capsys.readouterr().out
