"""Smoke tests of the benchmark scripts (``--quick``: tiny shapes, one repeat) and of the authors' baseline.

No timing is asserted: only that each script runs, checks itself and writes the ratio fields.
"""

import importlib.util
import json
import logging
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, tmp_path, *extra):
    out = tmp_path / f"{name}.json"
    payload = _load(name).main(["--quick", "--repeats", "1", "--warmup", "0", "--output", str(out), *extra])
    with open(out) as handle:
        saved = json.load(handle)
    assert saved["machine"]["versions"]["torch"] == torch.__version__
    assert saved["machine"]["date"] and saved["machine"]["cpu"]
    return payload, saved


@pytest.mark.parametrize(
    "layout_args", [(1, 5, 7), (2, 3, 9), (3, 5, 11), (6, 2, 4)], ids=["1scene", "2scenes", "3scenes", "6scenes"]
)
def test_authors_baseline_matches_dense_mask(layout_args):
    baselines = _load("baselines")
    from diffusers_mask2dit import SceneLayout

    assert baselines.check_authors_matches_dense(SceneLayout.uniform(*layout_args)) < 1e-10


def test_authors_baseline_needs_equal_scenes():
    baselines = _load("baselines")
    from diffusers_mask2dit import SceneLayout

    layout = SceneLayout([3, 3], [4, 5])
    q = torch.randn(1, 1, layout.total, 4)
    with pytest.raises(ValueError, match="equal"):
        baselines.authors_scene_attention(q, q, q, layout)


def test_live_bytes_counts_extra_memory_only():
    common = _load("common")
    x = torch.randn(256, 256)  # an input: not counted

    def fn():
        y = x * 2  # 256 KiB, freed before the next one
        del y
        z = torch.empty(512, 256)  # 512 KiB
        return z.view(-1)  # a view: no new storage

    assert common.measure_memory(fn, torch.device("cpu")) == 512 * 256 * 4


def test_bench_attention_quick(tmp_path):
    _, saved = _run("bench_attention", tmp_path, "--shape", "3,8,24,2,16")
    (result,) = saved["results"]
    assert set(result["max_abs_diff_vs_reference"]) >= {"ours[sdpa]", "ours[dense]", "authors", "flex"}
    assert saved["flex"] == "eager" and result["shape"]["batch"] == 1 and saved["complete"]
    assert result["failed"] == {} and result["out_of_memory"] == []
    for mode in ("forward", "forward_backward"):
        ratios = result["modes"][mode]["ratios"]
        for key in ("ours_over_unmasked", "dense_over_ours", "authors_over_ours", "mem_ours_over_dense", "mem_ours_over_authors"):
            assert ratios[key] > 0, key
        for name, method in result["modes"][mode]["methods"].items():
            assert method["median_s"] > 0, name
            if name in result["memory_not_measured"]:
                assert method["peak_extra_bytes"] is None, name
            else:
                assert method["peak_extra_bytes"] > 0, name
    # FlexAttention runs in the forward table; in forward+backward only where its backward runs on this device
    assert result["modes"]["forward"]["ratios"]["flex_over_ours"] > 0
    no_backward = _load("baselines").flex_backward_error(torch.device("cpu"), torch.float32)
    assert ("flex" in result["modes"]["forward_backward"]["methods"]) == (no_backward is None)
    assert result["not_run"]["forward_backward"].get("flex") == no_backward


def test_bench_attention_skip_and_batch(tmp_path):
    _, saved = _run("bench_attention", tmp_path, "--shape", "2,4,20,1,8", "--batch", "2", "--flex", "off",
                    "--skip", "ours[dense],ours[sdpa]")
    (result,) = saved["results"]
    assert result["shape"]["batch"] == 2
    # what backend="auto" runs is never skipped (here on CPU: ours[sdpa])
    assert set(result["modes"]["forward"]["methods"]) == {"ours[sdpa]", "unmasked", "dense_mask", "authors"}
    with pytest.raises(SystemExit, match="unknown"):
        _run("bench_attention", tmp_path, "--shape", "2,4,20,1,8", "--skip", "xformers")


def test_bench_attention_leaves_out_a_method_that_fails_its_check(tmp_path, monkeypatch):
    # a broken method is recorded and not timed; the others are still measured and saved; the run exits non-zero
    bench = _load("bench_attention")
    make_methods = bench.make_methods

    def with_broken_methods(*args, **kwargs):
        methods = make_methods(*args, **kwargs)
        methods["ours[dense]"] = bench.unmasked_attention  # wrong: no mask

        def raising(q, k, v):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        methods["authors"] = raising
        return methods

    monkeypatch.setattr(bench, "make_methods", with_broken_methods)
    out = tmp_path / "attention.json"
    with pytest.raises(SystemExit, match="failed their check"):
        bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--shape", "2,4,20,1,8", "--flex", "off",
                    "--output", str(out)])
    (result,) = json.loads(out.read_text())["results"]
    assert set(result["failed"]) == {"ours[dense]", "authors"}
    assert "differs from dense_mask" in result["failed"]["ours[dense]"]
    assert "illegal memory access" in result["failed"]["authors"]
    for mode in ("forward", "forward_backward"):
        assert set(result["modes"][mode]["methods"]) == {"ours[sdpa]", "unmasked", "dense_mask"}
        assert result["modes"][mode]["ratios"]["ours_over_unmasked"] > 0


LAYOUTS = {"3scenes": ((8, 8, 8), (24, 24, 24)), "uneven": ((3, 5, 4), (20, 7, 33)), "1scene": ((6,), (30,))}


@pytest.mark.parametrize("variant", ["v1", "v2", "v3", "full"])
@pytest.mark.parametrize("lengths", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_flex_mask_mod_allows_the_dense_mask_pairs(lengths, variant):
    # The FlexAttention baseline's mask_mod, evaluated on every pair, is the reference L x L mask exactly.
    from torch.nn.attention.flex_attention import create_mask

    from diffusers_mask2dit import SceneLayout, build_dense_mask

    layout = SceneLayout(*lengths)
    mask_mod = _load("baselines").flex_mask_mod(layout, variant, torch.device("cpu"))
    got = create_mask(mask_mod, 1, 1, layout.total, layout.total, device="cpu")[0, 0]
    assert torch.equal(got, build_dense_mask(layout, variant))


def _flex_vs_dense(layout, variant, device, dtype, compiled, grads):
    from diffusers_mask2dit import build_dense_mask

    baselines = _load("baselines")
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 3, layout.total, 16, generator=generator, dtype=torch.float64) for _ in range(4)]
    grad_out = tensors.pop()
    ours = [t.to(device, dtype).requires_grad_(grads) for t in tensors]
    ref = [t.requires_grad_(grads) for t in tensors]
    block_mask = baselines.flex_block_mask(layout, variant, device, block_size=16 if device.type == "cpu" else 128)
    out = baselines.flex_scene_attention(*ours, block_mask, compiled=compiled)
    expected = baselines.dense_mask_attention(*ref, build_dense_mask(layout, variant))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), expected.detach(), atol=tolerance, rtol=0)
    if grads:
        got = torch.autograd.grad(out, ours, grad_out.to(device, dtype))
        want = torch.autograd.grad(expected, ref, grad_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double().cpu(), w, atol=2 * tolerance, rtol=2 * tolerance)


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
@pytest.mark.parametrize("lengths", [LAYOUTS["3scenes"], LAYOUTS["uneven"]], ids=["3scenes", "uneven"])
def test_flex_baseline_matches_dense_reference_on_cpu(lengths, variant):
    # eager FlexAttention (what torch 2.13 runs on CPU without compiling); gradients where its backward runs here
    from diffusers_mask2dit import SceneLayout

    cpu = torch.device("cpu")
    no_backward = _load("baselines").flex_backward_error(cpu, torch.float32)
    _flex_vs_dense(SceneLayout(*lengths), variant, cpu, torch.float32, compiled=False, grads=no_backward is None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_flex_baseline_compiled_matches_dense_reference_on_cuda():
    # the benchmark's configuration: compiled FlexAttention, bf16, v2, forward and gradients vs an fp64 reference
    from diffusers_mask2dit import SceneLayout

    assert _load("baselines").flex_backward_error(torch.device("cuda"), torch.bfloat16) is None
    layout = SceneLayout([226, 226, 226], [700, 350, 700])
    _flex_vs_dense(layout, "v2", torch.device("cuda"), torch.bfloat16, compiled=True, grads=True)


def test_transformer_step_quick(tmp_path):
    _, saved = _run("bench_pipeline", tmp_path, "--transformer-step")
    assert saved["benchmark"] == "transformer_step" and saved["batch"] == 2
    assert set(saved["runs"]) == {"v2", "full_attention"}
    for run in saved["runs"].values():
        assert run["median_s"] > 0 and run["peak_extra_bytes"] > 0
        assert run["peak_total_bytes"] == run["peak_extra_bytes"] + saved["model"]["weights_bytes"]
    assert saved["ratios"]["time_v2_over_full_attention"] > 0
    assert list(saved["goals_met"]) == ["step_v2_within_1.03x_of_full"]
    # a RoPE model (as the 5b) runs with its RoPE, as in generation
    assert saved["model"]["config"]["use_rotary_positional_embeddings"]
    assert saved["rotary_embeddings"] in ("passed to the model", "built by the model")


def test_training_memory_only_compared_with_an_estimate(tmp_path):
    estimate = tmp_path / "estimate.json"
    _load("bench_training").main(["--estimate-memory", "--quick", "--modes", "lora", "--dtype", "float32",
                                  "--gradient-checkpointing", "--lora-rank", "64", "--output", str(estimate)])
    _, saved = _run("bench_training", tmp_path, "--modes", "lora", "--memory-only", "--gradient-checkpointing",
                    "--compare-estimate", str(estimate))
    assert saved["repeats"] == 0
    with open(estimate) as handle:
        estimated = json.load(handle)["results"]["lora"]
    for label in ("v2", "full_attention"):
        memory = saved["results"]["lora"]["runs"][label]["memory"]
        assert "median_s" not in saved["results"]["lora"]["runs"][label]  # no timing
        assert memory["estimated_peak_total_bytes"] == estimated[label]["peak_total_bytes"]
        assert memory["measured_over_estimate"] == memory["peak_total_bytes"] / estimated[label]["peak_total_bytes"]
        # the estimate routes the step as on a GPU (FlashAttention, foreach AdamW): close to, not equal to, a CPU step
        assert memory["measured_over_estimate"] == pytest.approx(1.0, abs=0.02), label


def test_bench_pipeline_quick(tmp_path):
    _, saved = _run("bench_pipeline", tmp_path, "--steps", "1")
    ratios = saved["ratios"]
    for key in ("mask2dit_over_cogvideox", "expected_from_sequence_lengths", "extend_1scene_over_fresh_3scenes",
                "mem_mask2dit_over_cogvideox"):
        assert ratios[key] > 0, key
    assert set(saved["runs"]) == {
        "cogvideox_1prompt", "mask2dit_3scenes", "mask2dit_3scenes_full", "extend_1scene", "cogvideox_same_tokens"
    }
    assert ratios["mask2dit_over_cogvideox_same_tokens"] > 0


def test_bench_training_quick(tmp_path):
    _, saved = _run("bench_training", tmp_path)
    for mode in ("lora", "full"):
        entry = saved["results"][mode]
        assert entry["trainable_parameters"] > 0
        assert entry["ratios"]["time_v2_over_full_attention"] > 0
        assert entry["ratios"]["mem_v2_over_full_attention"] > 0
    assert saved["results"]["lora"]["trainable_parameters"] < saved["results"]["full"]["trainable_parameters"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_memory_estimate_equals_a_real_cpu_step(mode, dtype):
    # The fake-tensor estimate behind `bench_training.py --estimate-memory` must count exactly what a real
    # step allocates: same step on real CPU tensors, same kernels, measured by the same LiveBytes.
    bench = _load("bench_training")
    kwargs = dict(dtype=dtype, scenes=3, lora_rank=4, checkpointing=True, gpu_kernels=False)
    real = bench.step_peak_memory("quick", mode, "v2", fake=False, **kwargs)
    estimated = bench.step_peak_memory("quick", mode, "v2", fake=True, **kwargs)
    assert real["peak_extra_bytes"] > 0
    assert estimated["weights_bytes"] == real["weights_bytes"]
    if dtype == torch.float32:
        assert estimated == real
    else:
        # One known difference: for bf16 inputs the fake layer_norm returns bf16 mean/rstd where the real
        # kernel keeps them fp32, 4 bytes per token per saved norm, i.e. ~1/hidden of the activations
        # (1/32 here at most, < 0.1% at the 5b's 3072).
        assert abs(estimated["peak_extra_bytes"] - real["peak_extra_bytes"]) <= 0.02 * real["peak_extra_bytes"]


def test_training_memory_estimate_grows_with_the_video(tmp_path):
    payload = _load("bench_training").main(
        ["--estimate-memory", "--quick", "--modes", "lora", "--output", str(tmp_path / "estimate.json")]
    )
    figures = payload["results"]["lora"]["v2"]
    assert figures["peak_total_bytes"] == figures["weights_bytes"] + figures["peak_extra_bytes"]
    bench = _load("bench_training")
    one_scene = bench.step_peak_memory("quick", "lora", "v2", dtype=torch.bfloat16, scenes=1, lora_rank=64)
    assert one_scene["weights_bytes"] == figures["weights_bytes"]
    assert one_scene["peak_extra_bytes"] < figures["peak_extra_bytes"]


def test_conditional_sample_needs_the_memory_of_an_unconditional_one():
    # The estimate runs unconditional samples only (fake tensors cannot take the model's test of whether the
    # scenes' timesteps differ); this measures for real that the SFT sample's per-scene path costs the same.
    bench = _load("bench_training")
    kwargs = dict(dtype=torch.float32, scenes=3, lora_rank=4, checkpointing=True, fake=False, gpu_kernels=False)
    unconditional = bench.step_peak_memory("quick", "lora", "v2", **kwargs)["peak_extra_bytes"]
    conditional = bench.step_peak_memory("quick", "lora", "v2", conditional=True, **kwargs)["peak_extra_bytes"]
    assert abs(conditional - unconditional) < 0.01 * unconditional


def test_attention_memory_estimate_equals_real_cpu_runs(tmp_path):
    # `bench_attention.py --estimate-memory` runs the methods on fake tensors; on CPU the same calls on real
    # tensors, measured by the same LiveBytes, must give the same bytes (fp32: no dtype-dependent kernel detail).
    bench = _load("bench_attention")
    common = _load("common")
    shape = (3, 8, 24, 2, 16)
    estimated = bench.estimate_memory(shape, batch=2, dtype=torch.float32)
    from diffusers_mask2dit import SceneLayout, scene_attention

    layout = SceneLayout.uniform(*shape[:3])
    q, k, v = (torch.randn(2, 2, layout.total, 16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    real = {
        "ours[sdpa]": lambda: scene_attention(q, k, v, layout, "v2", backend="sdpa"),
        "authors": lambda: bench.authors_scene_attention(q, k, v, layout),
    }
    for name, fn in real.items():
        both = common.measure_memory(lambda: torch.autograd.grad(fn(), (q, k, v), grad_out), torch.device("cpu"))
        assert estimated[name]["forward_backward"] == both, name
    assert estimated["dense_mask (mask only)"]["forward"] == layout.total**2
    payload = bench.main(["--estimate-memory", "--quick", "--output", str(tmp_path / "estimate.json")])
    assert {r["batch"] for r in payload["results"]} == {1, 2}


def test_bench_parallel_quick_counts_the_bytes_it_computes(tmp_path):
    # 1 and 2 gloo processes; the script itself refuses an output that differs from one process's.
    _, saved = _run("bench_parallel", tmp_path)
    single, two = saved["layouts"]
    assert (single["processes"], two["processes"]) == (1, 2)
    assert two["bytes_per_layer_counted"] == two["bytes_per_layer_computed"] > 0
    assert two["max_abs_error"] <= 1e-5 and two["speedup"] > 0


def test_bench_parallel_bytes_and_estimate():
    bench = _load("bench_parallel")
    # Even heads: q, k, v out and the output back, each (d - 1)/d of the rank's tokens x all heads.
    even = bench.ulysses_bytes_per_layer(2, 40, 160, heads=8, head_dim=4, degree=4, element_size=2)
    assert even["total"] == 4 * 2 * (200 // 4) * 8 * 4 * 3 // 4 * 2
    # Uneven heads (30 over 4: 8, 8, 7, 7) and padding (201 -> 204 tokens): the busiest rank.
    uneven = bench.ulysses_bytes_per_layer(1, 1, 200, heads=30, head_dim=1, degree=4, element_size=1)
    assert uneven["total"] == max(3 * (30 - m) * 51 + m * 3 * 51 for m in (8, 8, 7, 7))
    args = bench.common.base_parser("").parse_args([])
    args.tflops, args.bandwidth = 400.0, 300.0
    estimates = {(e["scenes"], e["ulysses"], e["cfg"]): e for e in bench.estimate(args)["estimates"]}
    for scenes in (3, 6):
        assert estimates[(scenes, 1, 1)]["speedup"] == 1.0
        for layout in ((8, 1), (4, 2)):
            assert 7.0 < estimates[(scenes, *layout)]["speedup"] < 8.0


def test_results_already_there_are_kept_unless_output_names_them(tmp_path, monkeypatch, capsys):
    """A benchmark run without --output never replaces a recorded (tracked) result; --output replaces on purpose."""
    import argparse

    common = _load("common")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    args = argparse.Namespace(no_save=False, output=None, quick=False, device="cpu")
    recorded = tmp_path / "bench_cpu.json"
    recorded.write_text('{"recorded": true}\n')
    written = common.save_json({"new": 1}, "bench", args)
    assert json.loads(recorded.read_text()) == {"recorded": True}
    assert written != recorded and json.loads(written.read_text())["new"] == 1
    assert common.save_json({"new": 3}, "bench", args) == written  # saved again in the run: the same new file
    assert "kept (pass --output" in capsys.readouterr().out
    args.output = str(recorded)
    assert common.save_json({"new": 2}, "bench", args) == recorded and json.loads(recorded.read_text())["new"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
