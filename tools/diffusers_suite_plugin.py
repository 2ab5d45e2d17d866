"""pytest plugin for `run_diffusers_suite.py`: run diffusers' CogVideoX tests on our classes.

With ``MASK2DIT_SWAP=1`` in the environment, the names the test modules import from ``diffusers``
(``CogVideoXPipeline``, ``CogVideoXTransformer3DModel``) are bound to `Mask2DiTPipeline` and
`Mask2DiTTransformer3DModel` before any test module is imported, so every test class built from them
(``pipeline_class``, ``model_class``, ``transformer_cls``) exercises ours. Without it the plugin does
nothing: that is the control run on the stock classes.

Our package is imported first, so its own base classes are the real stock ones. Our classes are also
made visible under their own names in ``diffusers.pipelines`` / ``diffusers.models``: diffusers' test
helpers find a class's source by looking it up there (``ReturnNameVisitor`` in
``test_encode_prompt_works_in_isolation``), which a class from another package otherwise fails.
"""

from __future__ import annotations

import os

SWAPPED_NAMES = {
    "CogVideoXPipeline": "Mask2DiTPipeline",
    "CogVideoXTransformer3DModel": "Mask2DiTTransformer3DModel",
}


def pytest_configure(config):
    if os.environ.get("MASK2DIT_SWAP") != "1":
        return
    import diffusers

    import diffusers_mask2dit

    for stock_name, our_name in SWAPPED_NAMES.items():
        setattr(diffusers, stock_name, getattr(diffusers_mask2dit, our_name))
    diffusers.pipelines.Mask2DiTPipeline = diffusers_mask2dit.Mask2DiTPipeline
    diffusers.models.Mask2DiTTransformer3DModel = diffusers_mask2dit.Mask2DiTTransformer3DModel


def pytest_report_header(config):
    if os.environ.get("MASK2DIT_SWAP") == "1":
        return "mask2dit: " + ", ".join(f"{a} -> {b}" for a, b in SWAPPED_NAMES.items())
    return "mask2dit: stock diffusers classes (control)"
