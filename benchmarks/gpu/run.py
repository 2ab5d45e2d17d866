"""Issue 12's GPU proof in one call: the CUDA tests, paper-scale attention, a 5b-sized denoising step and the 5b
LoRA training step, each a step with its own time budget, each writing JSON under ``--out`` ($OUT on the device).

    python benchmarks/gpu/run.py --out "$OUT"            # on a lent H100/H200 (benchmarks/gpu/run.sh installs the wheels)
    python benchmarks/gpu/run.py --dry-run --out /tmp/x  # CPU, tiny shapes: the same steps, seconds
    python benchmarks/gpu/run.py --out "$OUT" --steps attention_n6   # rerun some steps only

A step that fails, crashes or runs past its budget is recorded as such and the next one runs. ``summary.json``
(written after every step, so it survives a kill) holds the machine, the versions, every step's status, time
and the end of its log, and the headline ratios of each step's JSON; ``log.txt`` holds all output.

On the GPU each step runs in its own process (a crash or a CUDA error stays inside it; a step past its budget is
killed); the budget a step does not use passes to the next, and no step runs past ``--deadline``. In a dry run
the Python steps share one process (one import of torch and diffusers instead of five); the commands and code
paths are the same.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
GPU_DEADLINE_S = 420  # the issue's one call of at most 8 minutes, with room for the wheels' install
DRY_DEADLINE_S = 300


@dataclass
class Step:
    """One step: ``kind`` "env" (machine and versions), "pytest" or "bench" (a benchmark script's command line).
    ``gpu``/``dry`` are the arguments on the GPU and in a dry run; ``output`` the JSON file it writes."""

    name: str
    budget_s: int
    kind: str
    script: str = ""
    gpu: List[str] = field(default_factory=list)
    dry: List[str] = field(default_factory=list)
    output: Optional[str] = None


CUDA_BF16 = ["--device", "cuda", "--dtype", "bfloat16"]
CPU_FP32 = ["--device", "cpu", "--dtype", "float32"]


def attention_step(n: int, budget_s: int, repeats: int, skip: str, dry_shape: str) -> Step:
    """Attention at paper scale: n x (226 + 17,550) tokens, batch 2 (CFG), 48 heads x 64, bf16."""
    common = ["--batch", "2", "--warmup", "1", "--skip", skip]
    return Step(f"attention_n{n}", budget_s, "bench", "bench_attention.py",
                gpu=CUDA_BF16 + ["--shape", f"{n},226,17550,48,64", "--repeats", str(repeats)] + common,
                dry=CPU_FP32 + ["--shape", dry_shape, "--repeats", "1", "--flex", "eager"] + common,
                output=f"attention_n{n}.json")


TRAINING_ARGS = ["--modes", "lora", "--gradient-checkpointing", "--memory-only", "--compare-estimate", ESTIMATE_5B]
STEPS = [
    # the CUDA tests (all of them on the GPU; in a dry run one file's, which skip there)
    Step("pytest_cuda", 90, "pytest", gpu=["tests"], dry=["tests/test_attention.py"], output="pytest_cuda.json"),
    Step("env", 30, "env"),
    attention_step(3, 110, repeats=3, skip="ours[dense]", dry_shape="3,8,120,2,16"),
    # one denoising step of a CogVideoX-5b-sized transformer, 3 scenes x 49 frames at 480x720, CFG batch 2
    Step("transformer_step_5b", 110, "bench", "bench_pipeline.py",
         gpu=CUDA_BF16 + ["--transformer-step", "--model", "cogvideox-5b", "--repeats", "2"],
         dry=CPU_FP32 + ["--transformer-step", "--model", "quick", "--repeats", "1"],
         output="transformer_step_5b.json"),
    # the 5b LoRA training step at the same size, gradient checkpointing on: peak memory vs the estimate
    Step("training_5b", 100, "bench", "bench_training.py", gpu=CUDA_BF16 + ["--model", "cogvideox-5b"] + TRAINING_ARGS,
         dry=CPU_FP32 + ["--model", "quick"] + TRAINING_ARGS, output="training_5b.json"),
    # n = 6 last: the longest, and the goals are stated at n = 3
    attention_step(6, 150, repeats=2, skip="ours[dense],ours[sdpa]", dry_shape="6,4,40,2,16"),
]
STEP_NAMES = [step.name for step in STEPS]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def step_args(step: Step, dry_run: bool, out: Path) -> List[str]:
    args = list(step.dry if dry_run else step.gpu)
    if step.kind == "bench":
        args += ["--output", str(out / step.output)]
    return args


# --------------------------------------------------------------------------------------------------
# Worker side: runs steps in this process, one status file per step.
# --------------------------------------------------------------------------------------------------


def environment() -> Dict[str, Any]:
    """Machine, accelerator and the versions (and locations) of what the steps import."""
    import importlib.metadata
    import platform

    import torch

    info: Dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    gpu_memory_gib=round(props.total_memory / (1 << 30), 1))
    names = ["diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "tokenizers",
             "sentencepiece", "triton", "flash_attn", "pytest"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    import diffusers

    import diffusers_mask2dit
    from diffusers_mask2dit.attention import flash_varlen_available

    info["diffusers_from"] = str(Path(diffusers.__file__).parent)
    info["package_from"] = str(Path(diffusers_mask2dit.__file__).parent)
    info["flash_varlen_available"] = bool(flash_varlen_available())
    info["aten_flash_varlen"] = hasattr(torch.ops.aten, "_flash_attention_forward")
    try:
        from torch.nn.attention import flex_attention  # noqa: F401

        info["flex_attention"] = True
    except ImportError:
        info["flex_attention"] = False
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia_smi"] = f"not run: {error}"
    print(json.dumps(info, indent=2), flush=True)
    return info


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
    for name in names:
        step = STEPS[STEP_NAMES.index(name)]
        print(f"\n######## {name} ({now()})", flush=True)
        start = time.perf_counter()
        status: Dict[str, Any] = {"status": "ok"}
        try:
            if step.kind == "env":
                status["environment"] = environment()
            else:
                run_bench(step, dry_run, out)
        except BaseException as error:  # noqa: BLE001 - any failure of a step is recorded, the next step runs
            if isinstance(error, SystemExit) and error.code in (None, 0):
                pass
            else:
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
        status["seconds"] = round(time.perf_counter() - start, 2)
        (status_dir / f"{name}.json").write_text(json.dumps(status, default=str))
    return 0


# --------------------------------------------------------------------------------------------------
# Driver side: runs each group of steps in a child process with a time limit, keeps the summary.
# --------------------------------------------------------------------------------------------------


def run_process(command: List[str], timeout_s: float, log) -> Dict[str, Any]:
    """Run ``command`` (its output to stdout and ``log``), killing its process group after ``timeout_s``."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
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
    timed_out = False
    try:
        process.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)  # the group this call started: the step and anything it spawned
        process.wait()
    reader.join(timeout=10)
    return {"returncode": process.returncode, "timed_out": timed_out, "seconds": round(time.perf_counter() - start, 2),
            "log_tail": "".join(lines[-40:])}


def junit_to_json(xml_path: Path, command: List[str], returncode: int) -> Dict[str, Any]:
    """pytest's junit XML as JSON: counts and every test's outcome (a skip is a skip, never a pass)."""
    tests, counts = [], {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if xml_path.exists():
        for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag, label in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                child = case.find(tag)
                if child is not None:
                    outcome, message = label, (child.get("message") or "")[:500]
                    break
            counts[outcome] += 1
            tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time") or 0), "message": message})
    return {"command": " ".join(command), "returncode": returncode, "counts": counts, "tests": tests}


def run_pytest(step: Step, dry_run: bool, out: Path, work: Path, timeout_s: float, log) -> Dict[str, Any]:
    xml_path = work / "pytest_cuda.xml"
    shown = ["python", "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
             "--continue-on-collection-errors"] + step_args(step, dry_run, out)
    print(f"\n######## {step.name} ({now()})\n$ {' '.join(shown)}", flush=True)
    result = run_process([sys.executable] + shown[1:] + [f"--junitxml={xml_path}"], timeout_s, log)
    report = junit_to_json(xml_path, shown, result["returncode"])
    (out / step.output).write_text(json.dumps(report, indent=2) + "\n")
    # 0: all selected tests passed or skipped; 5: none selected. Anything else is a failure (or a crash).
    ok = not result["timed_out"] and result["returncode"] in (0, 5)
    return {**result, "status": "timeout" if result["timed_out"] else ("ok" if ok else "failed"),
            "tests": report["counts"]}


def run_group(names: List[str], dry_run: bool, out: Path, work: Path, timeout_s: float, log) -> Dict[str, Dict[str, Any]]:
    """Run the worker steps ``names`` in one child process; each step's record from its status file."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(names), "--out", str(out),
               "--status-dir", str(work)] + (["--dry-run"] if dry_run else [])
    result = run_process(command, timeout_s, log)
    records, cut_short = {}, False
    for name in names:
        record = read_json(work / f"{name}.json")
        if record is not None:
            records[name] = record
        elif not cut_short:  # the step that was running when the process ended
            cut_short = True
            records[name] = {"status": "timeout" if result["timed_out"] else "crashed",
                             "returncode": result["returncode"], "seconds": None}
        else:
            records[name] = {"status": "not run", "reason": "an earlier step of its process ended it"}
        records[name]["log_tail"] = result["log_tail"] if records[name]["status"] != "ok" else ""
    return records


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON at ``path``; None if it is missing or was cut off (a process killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def headline(name: str, path: Path) -> Dict[str, Any]:
    """The figures the issue asks for, read off a step's JSON (None where a step did not produce them)."""
    data = read_json(path)
    if data is None:
        return {"unreadable": str(path.name)} if path.exists() else {}
    if name.startswith("attention"):
        result = (data.get("results") or [{}])[0]
        picked = {"complete": data.get("complete"), "ours": result.get("ours"), "out_of_memory": result.get("out_of_memory"),
                  "failed": result.get("failed")}
        for mode in ("forward", "forward_backward"):
            ratios = _get(result, "modes", mode, "ratios") or {}
            picked[mode] = {k: ratios.get(k) for k in ("ours_over_unmasked", "flex_over_ours", "authors_over_ours",
                                                       "dense_over_ours", "mem_ours_over_authors", "mem_ours_over_dense")}
            picked[mode]["goals_met"] = _get(result, "modes", mode, "goals_met")
        return picked
    if name.startswith("transformer_step"):
        return {"ratios": data.get("ratios"), "goals_met": data.get("goals_met"),
                "peak_total_bytes": {k: v.get("peak_total_bytes") for k, v in (data.get("runs") or {}).items()}}
    if name.startswith("training"):
        run = _get(data, "results", "lora", "runs", "v2", "memory")
        return {"lora_v2_memory": run, "goals_met": data.get("goals_met"), "error": _get(data, "results", "lora", "error")}
    if name.startswith("pytest"):
        return {"counts": data.get("counts"),
                "not_passed": [t["test"] for t in data.get("tests", []) if t["outcome"] in ("failed", "errors")]}
    return {}


def write_summary(out: Path, summary: Dict[str, Any]) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, out / "summary.json")


def plan_groups(names: List[str], dry_run: bool) -> List[List[str]]:
    """Each step alone on the GPU; in a dry run the worker steps share one process."""
    if not dry_run:
        return [[name] for name in names]
    groups: List[List[str]] = []
    for name in names:
        kind = STEPS[STEP_NAMES.index(name)].kind
        if kind != "pytest" and groups and STEPS[STEP_NAMES.index(groups[-1][0])].kind != "pytest":
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def drive(names: List[str], dry_run: bool, out: Path, deadline_s: float) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {"started": now(), "dry_run": dry_run, "deadline_s": deadline_s, "argv": sys.argv[1:],
                               "steps": {}, "headline": {}}
    start, slack = time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory(prefix="mask2dit-gpu-") as work, open(out / "log.txt", "a") as log:
        for group in plan_groups(names, dry_run):
            budget = sum(STEPS[STEP_NAMES.index(name)].budget_s for name in group)
            left = deadline_s - (time.perf_counter() - start)
            if left < 5:
                for name in group:
                    summary["steps"][name] = {"status": "not run", "reason": f"the {deadline_s:.0f} s deadline passed"}
                continue
            timeout_s = min(budget + slack, left)
            for name in group:  # no file left from an earlier run may pass for this one's
                output = STEPS[STEP_NAMES.index(name)].output
                if output:
                    (out / output).unlink(missing_ok=True)
            step = STEPS[STEP_NAMES.index(group[0])]
            if step.kind == "pytest":
                records = {step.name: run_pytest(step, dry_run, out, Path(work), timeout_s, log)}
            else:
                records = run_group(group, dry_run, out, Path(work), timeout_s, log)
            used = sum(r.get("seconds") or 0 for r in records.values())
            slack = max(0.0, budget + slack - used) if all(r["status"] != "timeout" for r in records.values()) else 0.0
            for name, record in records.items():
                record.update(budget_s=STEPS[STEP_NAMES.index(name)].budget_s, timeout_s=round(timeout_s, 1))
                if name == "env":
                    summary["environment"] = record.pop("environment", None)
                output = STEPS[STEP_NAMES.index(name)].output
                record["output"] = output if output and (out / output).exists() else None
                summary["steps"][name] = record
                summary["headline"][name] = headline(name, out / output) if output else {}
            summary["elapsed_s"] = round(time.perf_counter() - start, 1)
            write_summary(out, summary)
    summary.update(finished=now(), elapsed_s=round(time.perf_counter() - start, 1))
    write_summary(out, summary)
    print(f"\n######## summary ({summary['elapsed_s']} s): "
          + ", ".join(f"{name} {record['status']}" for name, record in summary["steps"].items()), flush=True)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON files (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the whole script in seconds")
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
    deadline = args.deadline or (DRY_DEADLINE_S if args.dry_run else GPU_DEADLINE_S)
    summary = drive(names, args.dry_run, out, deadline)
    return 0 if all(record["status"] == "ok" for record in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
