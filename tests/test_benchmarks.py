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


@pytest.fixture(autouse=True)
def _restore_global_settings():
    # the scripts set threads and quiet the loggers for their tables: give the other tests theirs back
    from diffusers.utils import logging as diffusers_logging

    threads = torch.get_num_threads()
    package_logger = logging.getLogger("diffusers_mask2dit")
    level, verbosity = package_logger.level, diffusers_logging.get_verbosity()
    yield
    torch.set_num_threads(threads)
    package_logger.setLevel(level)
    diffusers_logging.set_verbosity(verbosity)


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
    assert set(result["max_abs_diff_vs_dense"]) >= {"ours[sdpa]", "ours[dense]", "authors"}
    for mode in ("forward", "forward_backward"):
        ratios = result["modes"][mode]["ratios"]
        for key in ("ours_over_unmasked", "dense_over_ours", "authors_over_ours", "mem_ours_over_dense", "mem_ours_over_authors"):
            assert ratios[key] > 0, key
        for name, method in result["modes"][mode]["methods"].items():
            assert method["median_s"] > 0 and method["peak_extra_bytes"] > 0, name


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
