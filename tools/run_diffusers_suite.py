"""Run diffusers' own CogVideoX pipeline, model and LoRA tests on the stock classes and on ours; compare.

    python tools/run_diffusers_suite.py /path/to/diffusers-checkout [--junit-dir DIR] [-k EXPR]

The checkout's ``tests/`` folder is run twice against the installed diffusers, each run in its own
pytest process:

1. control: the stock ``CogVideoXPipeline`` / ``CogVideoXTransformer3DModel``;
2. swapped: the same tests with our `Mask2DiTPipeline` / `Mask2DiTTransformer3DModel` bound to those
   names (see ``diffusers_suite_plugin.py``).

It prints each test that passes on stock but not on ours, marked ``allowed`` when `ALLOWED` lists it
(our documented multi-scene semantics, each with its reason) and ``REGRESSION`` otherwise; the exit
status is 1 when there is a regression. Tests that fail on stock too (for instance because they compare
with numbers computed from Hub weights) say nothing about us and are only counted.

The tests load ``hf-internal-testing/tiny-random-t5`` from the Hub. To run offline, both runs get a
private Hugging Face cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``) holding a stand-in built here: a
random T5 encoder with the same widths and our tiny T5 tokenizer. Tests that compare with numbers
computed from the real weights fail in both runs. Needs ``pytest`` and ``parameterized`` (diffusers'
test dependencies). Not part of CI: it needs diffusers' sources.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

TEST_FILES = (
    "tests/pipelines/cogvideo/test_cogvideox.py",
    "tests/models/transformers/test_models_transformer_cogvideox.py",
    "tests/lora/test_lora_layers_cogvideox.py",
)
TINY_T5_ID = "hf-internal-testing/tiny-random-t5"

# Tests that may pass on stock and fail on ours, by regular expression on "file::Class::test", each with
# the reason: the behaviour differs on purpose (multi-scene semantics), not by mistake.
ALLOWED: Dict[str, str] = {
    r"test_cogvideox\.py::TestCogVideoXPipeline::test_inference_batch_consistent": (
        "a list of strings is the scenes of ONE video (one prompt per scene), not a batch of videos (a batch is a "
        "list of such lists); the test's list of prompts becomes one multi-scene video, whose 8-frame scenes are "
        "refused because several scenes need frame counts the VAE decodes back exactly"
    ),
    r"test_cogvideox\.py::TestCogVideoXPipeline::test_inference_batch_single_identical": (
        "the same multi-scene meaning of a list of prompts as test_inference_batch_consistent"
    ),
    r"test_models_transformer_cogvideox\.py::TestCogVideoX(15)?TransformerTraining::test_gradient_checkpointing_is_applied": (
        "the test expects the set of class names with checkpointing on to be exactly {'CogVideoXTransformer3DModel'}; "
        "ours is the same module under the name Mask2DiTTransformer3DModel (checkpointing is on, and equivalent)"
    ),
}


# --------------------------------------------------------------------------------------------------
# Offline stand-in for the Hub's tiny T5
# --------------------------------------------------------------------------------------------------


def build_offline_cache(cache_dir: Path) -> None:
    """A Hugging Face cache holding a stand-in ``hf-internal-testing/tiny-random-t5`` snapshot."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from diffusers_mask2dit.tiny import build_tiny_tokenizer

    repo = cache_dir / ("models--" + TINY_T5_ID.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    if (snapshot / "config.json").is_file():
        return
    snapshot.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(snapshot)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = T5Config(  # the widths of the Hub's tiny-random-t5
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
        )
        T5EncoderModel(config).save_pretrained(snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


# --------------------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------------------


def run_pytest(checkout: Path, junit: Path, swap: bool, cache_dir: Path, extra: List[str]) -> int:
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env.update(
        MASK2DIT_SWAP="1" if swap else "0",
        HF_HUB_CACHE=str(cache_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(here), env.get("PYTHONPATH", "")) if p),
    )
    command = [
        sys.executable, "-m", "pytest", *TEST_FILES, "-p", "diffusers_suite_plugin", "-p", "no:cacheprovider",
        "-q", "--no-header", "-rN", f"--junitxml={junit}", *extra,
    ]
    print(("swapped" if swap else "control") + ": " + " ".join(command), flush=True)
    return subprocess.run(command, cwd=checkout, env=env).returncode


def read_outcomes(junit: Path) -> Dict[str, str]:
    """``{"file::Class::test": "passed" | "failed" | "skipped"}`` from a JUnit XML report."""
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition(".")
        name = f"{module.rpartition('.')[2]}.py::{cls}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcomes[name] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    return outcomes


def allowed_reason(test: str) -> str:
    return next((reason for pattern, reason in ALLOWED.items() if re.search(pattern, test)), "")


def report(control: Dict[str, str], swapped: Dict[str, str], subset: bool = False) -> int:
    """With ``subset`` (a ``-k`` run against a full control report) only the tests the swapped run has count."""
    passed_stock = sorted(t for t, o in control.items() if o == "passed" and (t in swapped or not subset))
    lost = [t for t in passed_stock if swapped.get(t) != "passed"]
    regressions = [t for t in lost if not allowed_reason(t)]
    print(f"\n{len(passed_stock)} tests pass on the stock classes; {len(passed_stock) - len(lost)} of them pass on ours.")
    for test in lost:
        reason = allowed_reason(test)
        status = f"allowed ({reason})" if reason else "REGRESSION"
        print(f"  {swapped.get(test, 'missing'):8s} {test}: {status}")
    gained = sorted(t for t, o in swapped.items() if o == "passed" and control.get(t) != "passed")
    if gained:
        print(f"{len(gained)} tests pass on ours but not on stock: " + ", ".join(gained))
    failing_both = sum(1 for t, o in control.items() if o == "failed" and swapped.get(t) == "failed")
    print(f"{failing_both} tests fail on both (not about our classes); {len(regressions)} regression(s).")
    return 1 if regressions else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a diffusers source checkout (the folder holding tests/)")
    parser.add_argument("--junit-dir", type=Path, help="keep the two JUnit reports here (default: a temp dir)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run a subset")
    parser.add_argument(
        "--reuse-control", action="store_true", help="take control.xml from --junit-dir instead of running stock again"
    )
    args = parser.parse_args(argv)
    missing = [f for f in TEST_FILES if not (args.checkout / f).is_file()]
    if missing:
        parser.error(f"{args.checkout} is not a diffusers checkout with CogVideoX tests: missing {missing}")
    extra = ["-k", args.keyword] if args.keyword else []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.junit_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(tmp) / "hub"
        build_offline_cache(cache_dir)
        if not (args.reuse_control and (out / "control.xml").is_file()):
            run_pytest(args.checkout, out / "control.xml", False, cache_dir, extra)
        run_pytest(args.checkout, out / "swapped.xml", True, cache_dir, extra)
        return report(read_outcomes(out / "control.xml"), read_outcomes(out / "swapped.xml"), bool(args.keyword))


if __name__ == "__main__":
    sys.exit(main())
