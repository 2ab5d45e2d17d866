"""The prepared GPU run (benchmarks/gpu/run.sh + run.py + smoke.py): a dry run on CPU goes through every step end to
end; the driver records failures, crashes, overruns and a stop, kills whole process groups, keeps every figure
measured before a kill, and refuses to start without the carried wheels, so that no device minute is lost."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "benchmarks" / "gpu" / "run.sh"


def _driver():
    spec = importlib.util.spec_from_file_location("_gpu_run", REPO / "benchmarks" / "gpu" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def _env(tmp_path, wheels="no-wheels"):
    env = dict(os.environ, PYTHON=sys.executable, MASK2DIT_WHEELS=str(tmp_path / wheels),
               MASK2DIT_SITE=str(tmp_path / "site"), PYTHONPATH=str(REPO / "src"))
    env.pop("OUT", None)
    return env


def _gone(pid: int, wait_s: float = 10) -> bool:
    """``pid`` has ended (or is a zombie, which runs nothing) within ``wait_s``: a SIGKILL is delivered, not awaited."""
    deadline = time.time() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.05)


def test_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(RUN_SH), "--dry-run", "--out", str(out)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no wheels" in done.stdout

    driver = _driver()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and list(summary["steps"]) == driver.STEP_NAMES and summary["stopped"] is None
    assert {name: step["status"] for name, step in summary["steps"].items()} == dict.fromkeys(driver.STEP_NAMES, "ok")
    assert all(step["seconds"] > 0 for step in summary["steps"].values())
    # what comes back from the device: at most 8 plain files; each step's JSON is in the summary, the junit XML apart
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) and (out / name).is_file() for name in files)
    assert set(files) == {"summary.json", "log.txt", "pytest_cuda.xml", "pytest_flex_compiled.xml", "pytest_recipes_cuda.xml"}
    environment = summary["environment"]
    assert environment["package_from"] == str(REPO / "src" / "diffusers_mask2dit") and environment["versions"]["diffusers"]
    results = summary["results"]
    assert results["smoke"]["ok"] and results["smoke"]["checks"]["sdpa"]["relative_error"]["dq"] < 1e-5

    tests = results["pytest_cuda"]
    assert "-v" in tests["command"].split() and tests["junit_readable"]
    assert tests["counts"]["failed"] == tests["counts"]["errors"] == 0
    assert sum(tests["counts"].values()) == len(tests["tests"]) > 0  # the CUDA tests were selected (skipped here)
    assert tests["per_test_timeout_s"] == driver.step_by_name("pytest_cuda").per_test_timeout_s
    assert driver.COMPILED_FLEX_TEST.split("::")[1] not in json.dumps(tests["tests"])
    assert [t["test"].split("::")[1] for t in results["pytest_flex_compiled"]["tests"]] == [
        driver.COMPILED_FLEX_TEST.split("::")[1]]

    n3, n6 = results["attention_n3"], results["attention_n6"]
    assert n3["complete"] and n3["flex"] == "compiled" and n3["results"][0]["reference"] == "dense_mask"
    assert n3["results"][0]["shape"]["batch"] == 2 and "ours[dense]" not in n3["results"][0]["modes"]["forward"]["methods"]
    assert "flex" in n3["results"][0]["max_abs_diff_vs_reference"]  # compiled FlexAttention, checked before timing
    assert n6["complete"] and n6["results"][0]["reference"].startswith("fp32 math on")
    assert list(n6["results"][0]["modes"]) == ["forward"]
    headline = summary["headline"]
    for name in ("attention_n3", "attention_n6"):
        assert headline[name]["failed"] == {} and headline[name]["forward"]["flex_over_ours"] > 0
    assert set(results["transformer_step_5b"]["runs"]) == {"v2", "full_attention"}
    assert headline["transformer_step_5b"]["ratios"]["time_v2_over_full_attention"] > 0
    assert headline["training_5b"]["lora_v2_memory"]["measured_over_estimate"] > 0
    # issue 22's steps: the recipe tests selected (skipped here, and only in their own step), the two benchmarks
    recipes, module = results["pytest_recipes_cuda"], driver.RECIPES_TEST_FILE[:-3].replace("/", ".") + "::"
    assert recipes["tests"] and all(t["test"].startswith(module) for t in recipes["tests"])
    assert module not in json.dumps(tests["tests"])
    assert headline["memory_5b"]["complete"] and "fp8-layerwise + VAE tiling" in headline["memory_5b"]["table"]
    assert "mask2dit/eager" in headline["compile_5b"]["first_call_seconds"]


def test_stopped_mid_step_the_partial_json_is_kept_and_the_step_group_killed(tmp_path):
    # a run stopped while the n=3 attention step is measuring (the device call's time limit): what that step saved
    # so far is whole JSON at every moment, and the driver kills the step's process group and writes the summary
    out = tmp_path / "out"
    partial = out / "attention_n3.json"
    driver = subprocess.Popen(["bash", str(RUN_SH), "--dry-run", "--steps", "attention_n3", "--out", str(out)],
                              cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 600
        while not partial.exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        seen = json.loads(partial.read_text())  # written atomically: never half a file
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert seen["complete"] is False and seen["results"][0]["reference"] == "dense_mask"
    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"]["attention_n3"]
    assert step["status"] == "killed" and step["interrupted"] == "SIGTERM" and _gone(step["pid"])
    assert summary["results"]["attention_n3"]["complete"] is False  # the partial figures, merged
    assert summary["stopped"] == "the run was stopped (SIGTERM)"
    assert not partial.exists()


@pytest.mark.parametrize("wheels", [[], ["diffusers-0.41.0-py3-none-any.whl", "peft-0.21.2-py3-none-any.whl"]],
                         ids=["absent", "other-version"])
def test_without_the_carried_wheels_a_gpu_run_refuses_to_start(tmp_path, wheels):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name in wheels:
        (folder / name).write_bytes(b"")
    done = subprocess.run(["bash", str(RUN_SH), "--out", str(tmp_path / "out")], cwd=tmp_path,
                          env=_env(tmp_path, "wheels"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.sh: refusing to start: carried wheels in"), done.stderr
    assert ("diffusers 0.42.1 is missing" if not wheels else "diffusers-0.41.0-py3-none-any.whl is not diffusers 0.42.1") in lines[0]
    assert "fetch_wheels.sh" in lines[0] and not (tmp_path / "out").exists()


def test_steps_are_in_the_issue_order_with_paper_scale_shapes():
    # the GPU arguments are not run here: check that they ask for what issues 12, 23 and 22 measure, in that order
    driver = _driver()
    assert driver.STEP_NAMES == ["smoke", "pytest_cuda", "attention_n3", "transformer_step_5b", "training_5b",
                                 "pytest_flex_compiled", "attention_n6", "pytest_recipes_cuda", "memory_5b", "compile_5b"]
    steps = {step.name: step for step in driver.STEPS}
    assert steps["smoke"].required and not any(step.required for step in driver.STEPS[1:])
    out = Path("/out")
    n3 = driver.step_args(steps["attention_n3"], False, out)
    assert n3[n3.index("--shape") + 1] == "3,226,17550,48,64" and n3[n3.index("--batch") + 1] == "2"
    assert n3[-2:] == ["--output", "/out/attention_n3.json"]
    n6 = driver.step_args(steps["attention_n6"], False, out)
    assert n6[n6.index("--shape") + 1] == "6,226,17550,48,64" and n6[n6.index("--modes") + 1] == "forward"
    assert steps["attention_n6"].min_left_s == 200
    assert "blocks" in steps["compile_5b"].gpu and "--quick" not in steps["memory_5b"].gpu  # 5b-sized on the GPU
    for name in ("smoke", "attention_n3", "attention_n6", "transformer_step_5b", "training_5b", "memory_5b", "compile_5b"):
        args = driver.step_args(steps[name], False, out)
        assert args[args.index("--device") + 1] == "cuda" and args[args.index("--dtype") + 1] == "bfloat16", name
    assert "cogvideox-5b" in steps["transformer_step_5b"].gpu and "cogvideox-5b" in steps["training_5b"].gpu
    assert "--gradient-checkpointing" in steps["training_5b"].gpu
    assert (REPO / driver.ESTIMATE_5B).exists()
    # the CUDA tests: every file that has them, the compiled-FlexAttention one apart, after the benchmarks
    cuda_files = driver.cuda_test_files()
    assert "tests/test_attention.py" in cuda_files and "tests/test_gpu_script.py" not in cuda_files
    pytest_cuda = driver.step_args(steps["pytest_cuda"], False, out)
    assert pytest_cuda[: len(cuda_files)] == cuda_files and pytest_cuda[-2:] == ["--deselect", driver.COMPILED_FLEX_TEST]
    path, name = driver.COMPILED_FLEX_TEST.split("::")
    assert f"def {name}(" in (REPO / path).read_text()
    assert sum(step.budget_s for step in driver.STEPS) >= driver.GPU_DEADLINE_S  # the deadline, not the budgets, binds
    assert driver.GPU_DEADLINE_S <= 8 * 60 - 60  # one call of 8 minutes, with a minute for the wheels and start-up


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("name", ["smoke", "attention_n3", "attention_n6", "transformer_step_5b", "training_5b"])
def test_gpu_arguments_parse(name, monkeypatch):
    # the GPU-only values (cuda, bf16, paper-scale shapes, cogvideox-5b) pass each script's own parser: stop
    # right after parsing, where the script would ask for the GPU
    import runpy

    driver = _driver()
    step = driver.step_by_name(name)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import common

    def parsed(args):
        raise _Parsed(vars(args))

    monkeypatch.setattr(common, "setup", parsed)
    monkeypatch.setattr(sys, "argv", [step.script] + driver.step_args(step, False, Path("/out")))
    with pytest.raises(_Parsed) as caught:
        runpy.run_path(str(REPO / "benchmarks" / step.script), run_name="__main__")
    args = caught.value.args[0]
    assert args["device"] == "cuda" and args["dtype"] == "bfloat16" and args["output"] == f"/out/{step.output}"


def test_a_process_past_its_budget_is_killed_with_its_group(tmp_path):
    driver = _driver()
    spawns = "import subprocess, time; p = subprocess.Popen(['sleep', '60']); print('child', p.pid, flush=True); time.sleep(60)"
    with open(tmp_path / "log.txt", "w") as log:
        result = driver.run_process([sys.executable, "-c", spawns], 2.0, log)
    assert result["timed_out"] and result["returncode"] == -signal.SIGKILL and result["seconds"] < 30
    assert "child" in result["log_tail"] and "child" in (tmp_path / "log.txt").read_text()
    child = int(re.search(r"child (\d+)", result["log_tail"]).group(1))
    assert _gone(result["pid"]) and _gone(child)  # the step and what it started


def test_a_step_runs_in_its_own_process_group_within_the_callers_session(tmp_path):
    # its own group: it and its children can be killed at once; the same session: should the device tool kill the
    # call, no step outlives it holding the GPU (a new session, as with start_new_session, would)
    driver = _driver()
    with open(tmp_path / "log.txt", "w") as log:
        result = driver.run_process([sys.executable, "-c", "import os; print(os.getpgid(0), os.getsid(0))"], 30, log)
    group, session = map(int, result["log_tail"].split())
    assert group == result["pid"] != os.getpgid(0) and session == os.getsid(0)


def test_worker_records_a_failing_step_and_runs_the_next(tmp_path, monkeypatch):
    driver = _driver()
    failing, passing = tmp_path / "failing.py", tmp_path / "passing.py"
    failing.write_text("raise RuntimeError('CUDA error: an illegal memory access')\n")
    passing.write_text(textwrap.dedent("""
        import sys
        out = sys.argv[sys.argv.index("--output") + 1]
        open(out, "w").write('{"ok": true}')
    """))
    steps = [driver.Step("broken", 10, "bench", str(failing), dry=["--x"], output="broken.json"),
             driver.Step("fine", 10, "bench", str(passing), dry=["--y"], output="fine.json")]
    monkeypatch.setattr(driver, "STEPS", steps)
    monkeypatch.setattr(driver, "STEP_NAMES", [step.name for step in steps])
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    driver.worker(["broken", "fine"], True, tmp_path, status_dir)
    broken = json.loads((status_dir / "broken.json").read_text())
    assert broken["status"] == "failed" and "illegal memory access" in broken["error"]
    assert json.loads((status_dir / "fine.json").read_text())["status"] == "ok"
    assert json.loads((tmp_path / "fine.json").read_text()) == {"ok": True}


CUDA_TESTS = """
import time
import pytest

@pytest.mark.cuda
def test_skips():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.cuda
def test_hangs():
    time.sleep(60)

@pytest.mark.cuda
def test_passes():
    pass
"""


def test_pytest_step_times_out_a_hung_test_and_goes_on(tmp_path):
    pytest.importorskip("pytest_timeout")
    driver = _driver()
    (tmp_path / "test_cuda_things.py").write_text(CUDA_TESTS)
    step = driver.Step("cuda_things", 60, "pytest", gpu=[str(tmp_path / "test_cuda_things.py")],
                       output="cuda_things.xml", per_test_timeout_s=3)
    with open(tmp_path / "log.txt", "w") as log:
        record = driver.run_pytest(step, False, tmp_path, 50, log)["cuda_things"]
    assert record["status"] == "failed" and record["seconds"] < 40
    outcomes = {t["test"].split("::")[-1]: t["outcome"] for t in record["results"]["tests"]}
    assert outcomes == {"test_skips": "skipped", "test_hangs": "failed", "test_passes": "passed"}
    assert "Timeout" in record["results"]["tests"][1]["message"]
    assert (tmp_path / "cuda_things.xml").exists()


def test_on_a_gpu_a_pytest_step_where_nothing_passed_failed(tmp_path):
    driver = _driver()
    (tmp_path / "test_skipping.py").write_text(CUDA_TESTS.split("@pytest.mark.cuda\ndef test_hangs")[0])
    step = driver.Step("skipping", 60, "pytest", gpu=[str(tmp_path / "test_skipping.py")],
                       dry=[str(tmp_path / "test_skipping.py")], output="skipping.xml", per_test_timeout_s=10)
    with open(tmp_path / "log.txt", "w") as log:
        on_gpu = driver.run_pytest(step, False, tmp_path, 50, log)["skipping"]
        dry = driver.run_pytest(step, True, tmp_path, 50, log)["skipping"]
    assert on_gpu["tests"] == dry["tests"] == {"passed": 0, "failed": 0, "errors": 0, "skipped": 1}
    assert on_gpu["status"] == "failed" and on_gpu["reason"] == "0 tests passed on a GPU"
    assert dry["status"] == "ok"  # a dry run on a CPU skips them all


def test_pytest_report_counts_skips_apart_from_passes(tmp_path):
    xml = tmp_path / "report.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite>
          <testcase classname="tests.test_attention" name="test_a" time="0.5"/>
          <testcase classname="tests.test_attention" name="test_b" time="0.1"><skipped message="needs a CUDA GPU"/></testcase>
          <testcase classname="tests.test_attention" name="test_c" time="0.2"><failure message="bf16 error 0.3"/></testcase>
        </testsuite></testsuites>
    """))
    report = _driver().junit_to_json(xml, ["python", "-m", "pytest"], 1)
    assert report["counts"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert [t["outcome"] for t in report["tests"]] == ["passed", "skipped", "failed"]
    assert report["tests"][2]["message"] == "bf16 error 0.3"
    xml.write_text("<testsuites><testsuite><testcase")  # pytest killed while writing it
    assert not _driver().junit_to_json(xml, ["pytest"], None)["junit_readable"]


def test_steps_share_a_process_only_in_a_dry_run():
    driver = _driver()
    names = driver.STEP_NAMES
    assert driver.plan_groups(names, dry_run=False) == [[name] for name in names]
    assert driver.plan_groups(names, dry_run=True) == [
        ["smoke"], ["pytest_cuda"], ["attention_n3", "transformer_step_5b", "training_5b"], ["pytest_flex_compiled"],
        ["attention_n6"], ["pytest_recipes_cuda"], ["memory_5b", "compile_5b"]]


def test_unknown_step_is_refused():
    with pytest.raises(SystemExit):
        _driver().main(["--out", "/tmp/unused", "--steps", "attention_n9"])


def test_past_the_deadline_steps_are_recorded_as_not_run(tmp_path):
    driver = _driver()
    summary = driver.drive(["smoke", "attention_n3"], dry_run=False, out=tmp_path, deadline_s=1)
    assert {name: step["status"] for name, step in summary["steps"].items()} == {"smoke": "not run", "attention_n3": "not run"}
    assert json.loads((tmp_path / "summary.json").read_text())["steps"]["smoke"]["reason"].startswith("the 1 s deadline")


def test_n6_starts_only_with_200_seconds_left(tmp_path):
    summary = _driver().drive(["attention_n6"], dry_run=False, out=tmp_path, deadline_s=150)
    assert summary["steps"]["attention_n6"]["status"] == "not run"
    assert "only with 200 s left" in summary["steps"]["attention_n6"]["reason"]


def test_a_cut_off_json_is_reported_not_fatal(tmp_path):
    driver = _driver()
    (tmp_path / "attention_n3.json").write_text('{"results": [{"shape"')  # not written by save_json (atomic)
    assert driver.read_json(tmp_path / "attention_n3.json") is None and driver.headline("attention_n3", None) == {}


def _bench(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"_bench_{name.replace('/', '_')}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampled_rows_reference_is_the_dense_result_at_those_rows():
    import torch

    from diffusers_mask2dit import SceneLayout, build_dense_mask

    baselines = _bench("baselines")
    layout = SceneLayout([3, 5, 4], [7, 9, 6])
    rows = baselines.sample_query_rows(layout, per_segment=3)
    assert all(((rows >= start) & (rows < end)).sum() == 3 for kind in ("text", "video")
               for start, end in layout.segments(kind))  # every scene's text and video rows are sampled
    mask = build_dense_mask(layout, "v2")
    assert torch.equal(baselines.mask_rows(layout, "v2", rows), mask[rows])
    q, k, v = (torch.randn(2, 3, layout.total, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, layout.total, 8, dtype=torch.float64)
    out = baselines.dense_mask_attention(q, k, v, mask)
    (dq,) = torch.autograd.grad(out, [q], grad_out)
    out_rows, dq_rows = baselines.sampled_rows_attention(q, k, v, mask[rows], rows, grad_out, chunk=5)
    torch.testing.assert_close(out_rows, out[:, :, rows].detach().float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(dq_rows, dq[:, :, rows].float(), atol=1e-5, rtol=0)


def test_past_the_dense_limit_a_wrong_method_fails_the_sampled_reference_and_the_dense_mask_is_timed_only(
        tmp_path, monkeypatch):
    bench = _bench("bench_attention")
    monkeypatch.setattr(bench, "DENSE_REFERENCE_MAX_LENGTH", 40)  # the shape below has 48 tokens
    make_methods = bench.make_methods

    def with_wrong_methods(*args, **kwargs):
        methods = make_methods(*args, **kwargs)
        methods["ours[dense]"] = methods["dense_mask"] = bench.unmasked_attention  # no mask: wrong
        return methods

    monkeypatch.setattr(bench, "make_methods", with_wrong_methods)
    out = tmp_path / "attention.json"
    with pytest.raises(SystemExit, match="failed their check"):
        bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--shape", "2,4,20,1,8", "--flex", "off",
                    "--modes", "forward", "--output", str(out)])
    (result,) = json.loads(out.read_text())["results"]
    assert result["reference"].startswith("fp32 math on") and set(result["failed"]) == {"ours[dense]"}
    assert "differs from fp32 math" in result["failed"]["ours[dense]"]
    assert result["max_abs_diff_vs_reference"]["dense_mask"] > 0.01 and "dense_mask" in result["timed_only"]
    assert "dense_mask" in result["modes"]["forward"]["methods"] and list(result["modes"]) == ["forward"]


def test_the_transformer_step_is_saved_after_every_figure(tmp_path):
    import argparse

    import torch

    bench = _bench("bench_pipeline")
    common = sys.modules["common"]
    args = argparse.Namespace(no_save=False, output=str(tmp_path / "step.json"), quick=True)
    saver = common.ProgressSaver({"benchmark": "transformer_step", "runs": {}}, "transformer_step", args)
    snapshots = []
    save = saver.save
    saver.save = lambda **fields: (save(**fields), snapshots.append(json.loads((tmp_path / "step.json").read_text())))
    runs = {"v2": lambda: torch.ones(1000), "full_attention": lambda: torch.ones(2000)}
    payload = bench.measure_transformer_step(runs, saver, torch.device("cpu"), 0, 2, 100, 0.5, "test")
    assert [sorted(s["runs"]) for s in snapshots] == [["v2"], ["full_attention", "v2"]] + [["full_attention", "v2"]] * 2
    assert not any(s["complete"] for s in snapshots) and payload["complete"]
    assert [s["runs"]["v2"].get("repeats") for s in snapshots] == [None, None, 1, 2]  # one save per timing round
    assert json.loads((tmp_path / "step.json").read_text())["complete"]
    assert [path.name for path in tmp_path.iterdir()] == ["step.json"]  # atomic writes leave no temporary file


def test_the_smoke_step_fails_on_a_wrong_kernel(tmp_path, monkeypatch):
    import torch.nn.functional as F

    smoke = _bench("gpu/smoke")
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--dtype", "float32", "--quick", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] and json.loads(out.read_text())["within_tolerance"]
    monkeypatch.setattr(smoke, "scene_attention", lambda q, k, v, *args, **kwargs: F.scaled_dot_product_attention(q, k, v))
    assert smoke.main(["--device", "cpu", "--dtype", "float32", "--quick", "--output", str(out)]) == 1
    saved = json.loads(out.read_text())
    assert not saved["ok"] and not saved["within_tolerance"] and saved["complete"]
    assert saved["checks"]["sdpa"]["relative_error"]["out"] > smoke.BROKEN  # a wrong mask: broken, not imprecise
