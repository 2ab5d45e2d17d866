"""The GPU proof in one call (issues 12 and 23), steps from a table, each with its own time budget, every figure
saved as soon as it is measured; ``benchmarks/gpu/run.sh`` installs the carried wheels and runs this.

    python benchmarks/gpu/run.py --out "$OUT"                        # on a lent H100/H200
    python benchmarks/gpu/run.py --dry-run --out /tmp/x              # CPU, tiny shapes: the same steps, a minute
    python benchmarks/gpu/run.py --out "$OUT" --steps attention_n6   # rerun some steps only

The steps, in order (:data:`STEPS`; another issue's steps go where the table says):

  smoke                 versions; ours[flash] and ours[sdpa] forward+backward on a small layout vs fp32 math. If it
                        fails the run stops at once: every later figure is about that kernel.
  pytest_cuda           the CUDA tests (``-m cuda``, in the files that have them), ``-v``, a per-test timeout, junit
                        XML in ``--out``; failed if no test passed on a GPU. The compiled-FlexAttention test waits.
  attention_n3          paper scale, 3 scenes: ours, unmasked flash, dense mask, the authors', FlexAttention last
  transformer_step_5b   one denoising step of a CogVideoX-5b-sized transformer, v2 vs full attention
  training_5b           the 5b LoRA training step's peak memory vs the estimate
  pytest_flex_compiled  the compiled-FlexAttention CUDA test (its compile is long)
  attention_n6          6 scenes, forward only, only if at least 200 s are left
  pytest_recipes_cuda   issue 22 (a call of its own, see STEPS): offload, bitsandbytes, torchao, Inductor compile
  memory_5b             5b step and VAE decode per recipe: peak memory and time, beside the estimate
  compile_5b            compiled (regional) vs eager, one 5b step, ours and stock CogVideoX

Each step runs in its own process group (``Popen(process_group=0)``: a crash or a CUDA error stays inside it; at
its time limit, or when this driver is stopped, the whole group is killed). A step's seconds count from its
process start, imports included; the budget a step does not use passes to the next, and no step runs past
``--deadline``. In a dry run consecutive benchmark steps share one process (one import of torch and diffusers).

``--out`` holds at most: ``summary.json`` (rewritten after every step: the machine, the versions, each step's
status, seconds and log tail, its headline figures and its whole JSON), ``log.txt``, one junit XML per pytest
step, and the JSON of the step in progress (saved by the benchmark as it measures; merged into the summary and
removed when the step ends, since the device tool returns at most 8 files). Killed at any moment, what was
measured is in one of them.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import importlib.util
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
ESTIMATE_5B = "benchmarks/results/training_cogvideox-5b_estimate.json"
GPU_DEADLINE_S = 420  # one device call of 8 minutes (timeout_s=480), with a minute for the wheels and start-up
DRY_DEADLINE_S = 400
COMPILED_FLEX_TEST = "tests/test_benchmarks.py::test_flex_baseline_compiled_matches_dense_reference_on_cuda"
CUDA_TEST_FILES = "{cuda test files}"  # expanded by step_args to the test files that hold CUDA tests
RECIPES_TEST_FILE = "tests/test_optimization_cuda.py"  # a step of its own, not in `pytest_cuda`


@dataclass
class Step:
    """One row of the table. ``kind``: "bench" (a script under benchmarks/, run as its command line) or "pytest".
    ``gpu``/``dry``: its arguments on the GPU and in a dry run; ``output``: the JSON (bench) or junit XML (pytest)
    it writes in ``--out``. ``required``: if it fails, the run stops. ``min_left_s``: on the GPU it starts only
    with that many seconds left before the deadline. ``per_test_timeout_s``: pytest's, per test."""

    name: str
    budget_s: int
    kind: str
    script: str = ""
    gpu: List[str] = field(default_factory=list)
    dry: List[str] = field(default_factory=list)
    output: Optional[str] = None
    required: bool = False
    min_left_s: int = 0
    per_test_timeout_s: int = 0


CUDA_BF16 = ["--device", "cuda", "--dtype", "bfloat16"]
CPU_FP32 = ["--device", "cpu", "--dtype", "float32"]


def attention_step(n: int, budget_s: int, repeats: int, skip: str, dry_shape: str, gpu_extra=(), dry_extra=(),
                   min_left_s: int = 0) -> Step:
    """Attention at paper scale: n x (226 + 17,550) tokens, batch 2 (CFG), 48 heads x 64, bf16."""
    common = ["--batch", "2", "--warmup", "1", "--skip", skip]
    return Step(f"attention_n{n}", budget_s, "bench", "bench_attention.py",
                gpu=CUDA_BF16 + ["--shape", f"{n},226,17550,48,64", "--repeats", str(repeats)] + common + list(gpu_extra),
                dry=CPU_FP32 + ["--shape", dry_shape, "--repeats", "1"] + common + list(dry_extra),
                output=f"attention_n{n}.json", min_left_s=min_left_s)


def pytest_step(name: str, budget_s: int, per_test_timeout_s: int, selection: List[str]) -> Step:
    """The CUDA tests ``selection`` picks; the same arguments on the GPU and in a dry run (where they skip)."""
    return Step(name, budget_s, "pytest", gpu=selection, dry=selection, output=f"{name}.xml",
                per_test_timeout_s=per_test_timeout_s)


TRAINING_ARGS = ["--modes", "lora", "--gradient-checkpointing", "--memory-only", "--compare-estimate", ESTIMATE_5B]
STEPS = [
    Step("smoke", 45, "bench", "gpu/smoke.py", gpu=CUDA_BF16, dry=CPU_FP32 + ["--quick"], output="smoke.json",
         required=True),
    pytest_step("pytest_cuda", 75, 30, [CUDA_TEST_FILES, "--deselect", COMPILED_FLEX_TEST]),
    attention_step(3, 120, repeats=3, skip="ours[dense]", dry_shape="3,8,120,2,16", dry_extra=["--flex", "compiled"]),
    # one denoising step of a CogVideoX-5b-sized transformer, 3 scenes x 49 frames at 480x720, CFG batch 2
    Step("transformer_step_5b", 100, "bench", "bench_pipeline.py",
         gpu=CUDA_BF16 + ["--transformer-step", "--model", "cogvideox-5b", "--repeats", "2"],
         dry=CPU_FP32 + ["--transformer-step", "--model", "quick", "--repeats", "1"],
         output="transformer_step_5b.json"),
    # the 5b LoRA training step at the same size, gradient checkpointing on: peak memory vs the estimate
    Step("training_5b", 90, "bench", "bench_training.py", gpu=CUDA_BF16 + ["--model", "cogvideox-5b"] + TRAINING_ARGS,
         dry=CPU_FP32 + ["--model", "quick"] + TRAINING_ARGS, output="training_5b.json"),
    pytest_step("pytest_flex_compiled", 100, 90, [COMPILED_FLEX_TEST]),
    # n = 6 last and forward only: the longest, and the goals are stated at n = 3. Past 65,536 tokens the
    # reference is fp32 math on sampled rows (the dry run asks for it explicitly, its sequence being short).
    attention_step(6, 150, repeats=2, skip="ours[dense],ours[sdpa]", dry_shape="6,4,40,2,16",
                   gpu_extra=["--modes", "forward"], dry_extra=["--modes", "forward", "--reference", "sampled",
                                                              "--flex", "eager"], min_left_s=200),
    # Issue 22, in a device call of its own (the steps above fill one): `run.sh --out "$OUT" --steps
    # pytest_recipes_cuda memory_5b compile_5b`. Offload, bitsandbytes, torchao and Inductor on the tiny model
    # (tests/test_optimization_cuda.py, its compile tests take minutes), then the 5b figures: memory and step time
    # per recipe beside the estimate, and compiled (regional) vs eager for ours and stock CogVideoX.
    pytest_step("pytest_recipes_cuda", 150, 240, [RECIPES_TEST_FILE]),
    Step("memory_5b", 150, "bench", "bench_memory_gpu.py", gpu=CUDA_BF16, dry=CPU_FP32 + ["--quick"],
         output="memory_5b.json"),
    Step("compile_5b", 240, "bench", "bench_compile.py", gpu=CUDA_BF16 + ["--modes", "eager", "blocks", "--repeats", "2"],
         dry=CPU_FP32 + ["--quick", "--modes", "eager", "--repeats", "1"], output="compile_5b.json"),
]
STEP_NAMES = [step.name for step in STEPS]


def step_by_name(name: str) -> Step:
    return STEPS[STEP_NAMES.index(name)]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def cuda_test_files() -> List[str]:
    """The test files that hold CUDA tests (a test or class decorated ``pytest.mark.cuda``, or a module
    ``pytestmark`` naming it), relative to the repository; read from the syntax tree, not imported."""
    def is_cuda(node: ast.AST) -> bool:
        return ast.unparse(node).startswith("pytest.mark.cuda")

    def has_cuda_tests(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if any(is_cuda(decorator) for decorator in node.decorator_list):
                    return True
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                if "pytest.mark.cuda" in ast.unparse(node.value):
                    return True
        return False

    files = (str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py") if has_cuda_tests(path))
    return sorted(name for name in files if name != RECIPES_TEST_FILE)


def step_args(step: Step, dry_run: bool, out: Path) -> List[str]:
    args = []
    for arg in step.dry if dry_run else step.gpu:
        args += cuda_test_files() if arg == CUDA_TEST_FILES else [arg]
    if step.kind == "bench":
        args += ["--output", str(out / step.output)]
    return args


# --------------------------------------------------------------------------------------------------
# Worker side: runs benchmark steps in this process, one status file per step.
# --------------------------------------------------------------------------------------------------


def run_bench(step: Step, dry_run: bool, out: Path) -> None:
    """The benchmark script as its command line would run it (``__main__``, these arguments)."""
    argv = sys.argv
    sys.argv = [str(BENCH / step.script)] + step_args(step, dry_run, out)
    print(f"$ python {' '.join(['benchmarks/' + step.script] + sys.argv[1:])}", flush=True)
    try:
        runpy.run_path(str(BENCH / step.script), run_name="__main__")
    finally:
        sys.argv = argv


def prepare_worker_process() -> None:
    """Import what every step imports, then freeze those objects out of the garbage collector's reach: the
    benchmarks call gc.collect() before each measurement, which then takes milliseconds instead of ~0.3 s of CPU.
    Only for a process of its own (a frozen object is never collected)."""
    import gc

    import diffusers  # noqa: F401
    import torch  # noqa: F401

    import diffusers_mask2dit  # noqa: F401

    gc.freeze()


def worker(names: List[str], dry_run: bool, out: Path, status_dir: Path) -> int:
    """Run the benchmark steps ``names`` here, in order; each one's status (and the wall clock when it ended,
    from which the driver counts its seconds) in ``status_dir``."""
    for name in names:
        print(f"\n######## {name} ({now()})", flush=True)
        status: Dict[str, Any] = {"status": "ok"}
        try:
            run_bench(step_by_name(name), dry_run, out)
        except BaseException as error:  # noqa: BLE001 - any failure of a step is recorded, the next step runs
            if not (isinstance(error, SystemExit) and error.code in (None, 0)):
                traceback.print_exc()
                status = {"status": "failed", "error": "".join(traceback.format_exception_only(type(error), error)).strip()}
            if isinstance(error, KeyboardInterrupt):
                raise
        finally:
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        status["finished_at"] = time.time()
        write_json(status_dir / f"{name}.json", status)
    return 0


# --------------------------------------------------------------------------------------------------
# Driver side: each group of steps in a child process group with a time limit; the summary.
# --------------------------------------------------------------------------------------------------


# the signal that stopped the driver (SIGTERM, SIGINT) and the step process running then
_STOP: Dict[str, Any] = {"signal": None, "process": None}


def _on_stop_signal(signum, frame) -> None:
    """Kill the running step's process group; the driver then records it, writes the summary and starts nothing
    more. Nothing is raised here, so no write of the summary is ever cut in half."""
    _STOP["signal"] = signal.Signals(signum).name
    process = _STOP["process"]
    if process is not None and process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to ``process``'s group (the step and all it started), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_process(command: List[str], timeout_s: float, log) -> Dict[str, Any]:
    """Run ``command`` in a process group of its own (its output to stdout and ``log``); kill the group after
    ``timeout_s`` or when this driver is interrupted (then ``interrupted`` names the signal)."""
    started_at, start = time.time(), time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               process_group=0)
    lines: List[str] = []

    def pump():
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            del lines[:-60]
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    _STOP["process"], timed_out = process, False
    try:
        process.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _STOP["process"] = None
        if process.poll() is None:
            kill_group(process)
    reader.join(timeout=10)
    return {"pid": process.pid, "returncode": process.returncode, "timed_out": timed_out, "interrupted": _STOP["signal"],
            "started_at": started_at, "seconds": round(time.perf_counter() - start, 2),
            "log_tail": "".join(lines[-40:])}


def junit_to_json(xml_path: Path, command: List[str], returncode: Optional[int]) -> Dict[str, Any]:
    """pytest's junit XML as JSON: counts and every test's outcome (a skip is a skip, never a pass)."""
    tests, counts = [], {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    root = read_xml(xml_path)
    for case in root.iter("testcase") if root is not None else []:
        outcome, message = "passed", ""
        for tag, label in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            child = case.find(tag)
            if child is not None:
                outcome, message = label, (child.get("message") or "")[:500]
                break
        counts[outcome] += 1
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return {"command": " ".join(command), "returncode": returncode, "junit": xml_path.name,
            "junit_readable": root is not None, "counts": counts, "tests": tests}


def read_xml(path: Path):
    try:
        return ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None


def pytest_command(step: Step, dry_run: bool, out: Path) -> List[str]:
    """``python -m pytest`` for ``step``: verbose, every outcome in junit XML, the per-test timeout when the
    pytest-timeout plugin is installed (the device image has it)."""
    command = ["python", "-m", "pytest", "-m", "cuda", "-v", "-rA", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={out / step.output}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={step.per_test_timeout_s}")
    return command + step_args(step, dry_run, out)


def run_pytest(step: Step, dry_run: bool, out: Path, timeout_s: float, log) -> Dict[str, Any]:
    """The pytest step; its status: timeout, failed (a test failed, pytest could not run, or on a GPU no test
    passed: a run where every CUDA test skipped proves nothing) or ok. The per-test report goes to ``results``."""
    shown = pytest_command(step, dry_run, out)
    print(f"\n######## {step.name} ({now()})\n$ {' '.join(shown)}", flush=True)
    result = run_process([sys.executable] + shown[1:], timeout_s, log)
    report = junit_to_json(out / step.output, shown, result["returncode"])
    report["per_test_timeout_s"] = step.per_test_timeout_s if any(a.startswith("--timeout=") for a in shown) else None
    if result["timed_out"] or result["interrupted"]:
        status = "timeout" if result["timed_out"] else "killed"
    elif result["returncode"] not in (0, 5):  # 5: no test selected
        status = "failed"
    elif not dry_run and report["counts"]["passed"] == 0:
        status, result["reason"] = "failed", "0 tests passed on a GPU"
    else:
        status = "ok"
    return {step.name: {**result, "status": status, "tests": report["counts"], "results": report}}


def run_group(names: List[str], dry_run: bool, out: Path, work: Path, timeout_s: float, log) -> Dict[str, Dict[str, Any]]:
    """Run the benchmark steps ``names`` in one child process; each step's record from its status file, its
    seconds from the end of the one before (the first from the process start: imports count), its JSON (whole or,
    if the process was cut short, as far as it was saved) in ``results``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(names), "--out", str(out),
               "--status-dir", str(work)] + (["--dry-run"] if dry_run else [])
    result = run_process(command, timeout_s, log)
    records, cut_short, boundary = {}, False, result["started_at"]
    for name in names:
        record = read_json(work / f"{name}.json")
        if record is not None:
            record["seconds"] = round(record.pop("finished_at") - boundary, 2)
            boundary += record["seconds"]
        elif not cut_short:  # the step that was running when the process ended
            cut_short = True
            status = "timeout" if result["timed_out"] else ("killed" if result["interrupted"] else "crashed")
            record = {"status": status, "returncode": result["returncode"],
                      "seconds": round(result["started_at"] + result["seconds"] - boundary, 2)}
        else:
            record = {"status": "not run", "reason": "an earlier step of its process ended it"}
        record["log_tail"] = result["log_tail"] if record["status"] != "ok" else ""
        record.update(interrupted=result["interrupted"], pid=result["pid"])
        record["results"] = read_json(out / step_by_name(name).output)
        records[name] = record
    return records


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON at ``path``; None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Atomically: a temporary file renamed over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def headline(name: str, data: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The figures the issues ask for, read off a step's JSON (None where a step did not produce them)."""
    if data is None:
        return {}
    if name.startswith("attention"):
        result = (data.get("results") or [{}])[-1]
        picked = {"complete": data.get("complete"), "ours": result.get("ours"), "reference": result.get("reference"),
                  "out_of_memory": result.get("out_of_memory"), "failed": result.get("failed")}
        for mode in ("forward", "forward_backward"):
            ratios = _get(result, "modes", mode, "ratios") or {}
            picked[mode] = {k: ratios.get(k) for k in ("ours_over_unmasked", "flex_over_ours", "authors_over_ours",
                                                       "dense_over_ours", "mem_ours_over_authors", "mem_ours_over_dense")}
            picked[mode]["goals_met"] = _get(result, "modes", mode, "goals_met")
        return picked
    if name == "smoke":
        return {"ok": data.get("ok"), "within_tolerance": data.get("within_tolerance"), "gpu": _get(data, "environment", "gpu"),
                "relative_error": {k: _get(v, "relative_error") for k, v in (data.get("checks") or {}).items()}}
    if name.startswith("transformer_step"):
        return {"complete": data.get("complete"), "ratios": data.get("ratios"), "goals_met": data.get("goals_met"),
                "peak_total_bytes": {k: v.get("peak_total_bytes") for k, v in (data.get("runs") or {}).items()}}
    if name.startswith("training"):
        return {"complete": data.get("complete"), "lora_v2_memory": _get(data, "results", "lora", "runs", "v2", "memory"),
                "goals_met": data.get("goals_met"), "error": _get(data, "results", "lora", "error")}
    if name.startswith("memory"):
        return {"complete": data.get("complete"), "table": data.get("table")}
    if name.startswith("compile"):
        return {"ratios": _get(data, "results", "ratios"), "first_call_seconds": _get(data, "results", "first_call_seconds")}
    if name.startswith("pytest"):
        return {"counts": data.get("counts"),
                "not_passed": [t["test"] for t in data.get("tests", []) if t["outcome"] in ("failed", "errors")]}
    return {"complete": data.get("complete")}


def plan_groups(names: List[str], dry_run: bool) -> List[List[str]]:
    """Each step alone on the GPU; in a dry run consecutive benchmark steps share one process."""
    if not dry_run:
        return [[name] for name in names]
    groups: List[List[str]] = []
    for name in names:
        if step_by_name(name).kind == "bench" and groups and step_by_name(groups[-1][-1]).kind == "bench":
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def why_not_run(group: List[str], left: float, dry_run: bool, stopped: Optional[str], deadline_s: float) -> Optional[str]:
    """Why the steps of ``group`` are not started now (None: they are)."""
    if _STOP["signal"]:
        return f"the run was stopped ({_STOP['signal']})"
    if stopped:
        return stopped
    if left < 5:
        return f"the {deadline_s:.0f} s deadline passed"
    needed = 0 if dry_run else step_by_name(group[0]).min_left_s
    if left < needed:
        return f"it starts only with {needed} s left before the deadline; {left:.0f} s were left"
    return None


def run_step_group(group: List[str], dry_run: bool, out: Path, work: Path, timeout_s: float, log):
    for name in group:  # no file left from an earlier run may pass for this one's
        (out / step_by_name(name).output).unlink(missing_ok=True)
    if step_by_name(group[0]).kind == "pytest":
        return run_pytest(step_by_name(group[0]), dry_run, out, timeout_s, log)
    return run_group(group, dry_run, out, work, timeout_s, log)


def record_group(summary: Dict[str, Any], records: Dict[str, Dict[str, Any]], out: Path, timeout_s: float) -> None:
    """Put ``records`` into the summary, write it, then remove the step JSON files it now holds."""
    for name, record in records.items():
        step = step_by_name(name)
        record.update(budget_s=step.budget_s, timeout_s=round(timeout_s, 1))
        results = record.pop("results", None)
        summary["results"][name] = results
        summary["headline"][name] = headline(name, results)
        if name == "smoke" and results:
            summary["environment"] = results.get("environment")
        summary["steps"][name] = record
    write_json(out / "summary.json", summary)
    for name in records:
        if step_by_name(name).kind == "bench":
            (out / step_by_name(name).output).unlink(missing_ok=True)


def drive(names: List[str], dry_run: bool, out: Path, deadline_s: float) -> Dict[str, Any]:
    """Run the steps ``names`` in order within ``deadline_s``; the summary (also written to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {"started": now(), "dry_run": dry_run, "deadline_s": deadline_s, "argv": sys.argv[1:],
                               "steps": {}, "headline": {}, "results": {}}
    start, slack, stopped = time.perf_counter(), 0.0, None
    with tempfile.TemporaryDirectory(prefix="mask2dit-gpu-") as work, open(out / "log.txt", "a") as log:
        for group in plan_groups(names, dry_run):
            left = deadline_s - (time.perf_counter() - start)
            reason = why_not_run(group, left, dry_run, stopped, deadline_s)
            if reason:
                summary["steps"].update({name: {"status": "not run", "reason": reason} for name in group})
                write_json(out / "summary.json", summary)
                continue
            budget = sum(step_by_name(name).budget_s for name in group)
            # a dry run's CPU times say nothing of the GPU's: only its deadline binds (budgets: tested apart)
            timeout_s = left if dry_run else min(budget + slack, left)
            records = run_step_group(group, dry_run, out, Path(work), timeout_s, log)
            used = sum(r.get("seconds") or 0 for r in records.values())
            slack = 0.0 if any(r["status"] == "timeout" for r in records.values()) else max(0.0, budget + slack - used)
            summary["elapsed_s"] = round(time.perf_counter() - start, 1)
            record_group(summary, records, out, timeout_s)
            failed_required = [n for n, r in records.items() if step_by_name(n).required and r["status"] != "ok"]
            if failed_required and not stopped:
                stopped = f"the required step {failed_required[0]} did not pass: nothing after it would mean anything"
    if _STOP["signal"]:
        stopped = f"the run was stopped ({_STOP['signal']})"
    summary.update(finished=now(), elapsed_s=round(time.perf_counter() - start, 1), stopped=stopped)
    write_json(out / "summary.json", summary)
    print(f"\n######## summary ({summary['elapsed_s']} s): "
          + ", ".join(f"{name} {record['status']}" for name, record in summary["steps"].items()), flush=True)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the results (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the whole script in a minute")
    parser.add_argument("--steps", default=",".join(STEP_NAMES), help=f"comma list, in order, of {STEP_NAMES}")
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"seconds for all steps (default {GPU_DEADLINE_S}; {DRY_DEADLINE_S} with --dry-run)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--status-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is needed (or $OUT set)")
    out = Path(args.out)
    if args.worker:
        prepare_worker_process()
        return worker(args.worker.split(","), args.dry_run, out, Path(args.status_dir))
    names = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEP_NAMES]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; the steps are {STEP_NAMES}")
    for signum in (signal.SIGTERM, signal.SIGINT):  # stopped: kill the step's group, write the summary
        signal.signal(signum, _on_stop_signal)
    summary = drive(names, args.dry_run, out, args.deadline or (DRY_DEADLINE_S if args.dry_run else GPU_DEADLINE_S))
    if _STOP["signal"]:
        return 128 + signal.Signals[_STOP["signal"]].value
    return 0 if all(record["status"] == "ok" for record in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
