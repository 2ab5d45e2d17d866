"""Ulysses context parallelism and CFG parallelism on 2 and 4 gloo processes reproduce one process exactly.

The multi-process runs (`parallel_scenarios.py`) go through diffusers' own ``enable_parallelism`` with the
transformer's ``_cp_plan``: on CPU diffusers' ``_resolve_parallel_config`` would divide by the accelerator count
(0), which the transformer's override replaces by the same mesh built on CPU; everything else is diffusers' and
torch.distributed's code. Each world size is launched once (module-scoped fixtures) and several tests read it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import diffusers_mask2dit
import parallel_scenarios as scenarios
from diffusers_mask2dit.parallel import (
    ShardSegments,
    SequenceShard,
    _local_lengths,
    check_parallel_config,
    enable_parallel_inference,
    init_parallel,
    split_heads,
)
from diffusers_mask2dit.layout import SceneLayout

TOLERANCE = dict(atol=1e-5, rtol=0)
RUN_TIMEOUT = 300  # seconds for a whole multi-process run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, out, *extra: str):
    """``world`` ranks of parallel_scenarios.py; returns ``(return codes, stderr per rank, seconds)``."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(diffusers_mask2dit.__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    script = os.path.abspath(scenarios.__file__)
    logs = [open(out / f"rank{rank}.log", "w+") for rank in range(world)]
    start = time.time()
    processes = [
        subprocess.Popen([sys.executable, script, "--world", str(world), "--out", str(out), *extra],
                         env=dict(env, RANK=str(rank)), stdout=logs[rank], stderr=subprocess.STDOUT)
        for rank in range(world)
    ]
    try:
        codes = [process.wait(timeout=max(1.0, RUN_TIMEOUT - (time.time() - start))) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return codes, texts, time.time() - start


@pytest.fixture(scope="module")
def reference():
    return scenarios.reference_outputs()


def _run(tmp_path_factory, world: int, *extra: str):
    out = tmp_path_factory.mktemp(f"world{world}")
    codes, logs, seconds = launch(world, out, *extra)
    return out, codes, logs, seconds


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    return save_tiny_cogvideox(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def world2(tmp_path_factory, tiny_model):
    return _run(tmp_path_factory, 2, "--example-model", tiny_model)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run(tmp_path_factory, 4, "--kill")


def _results(run):
    from safetensors.torch import load_file

    out, codes, logs, _ = run
    path = out / "results.safetensors"
    assert path.exists(), "\n".join(log[-3000:] for log in logs)
    return load_file(str(path))


@pytest.mark.parametrize("world", [2, 4])
def test_processes_reproduce_one_process(world, request, reference):
    """Every mask variant, per-sample and per-scene (extension) timesteps, text and video lengths that need
    padding (21 and 105 tokens), one scene, RoPE, sincos and 1.5-style models, parameter gradients (summed over
    the processes), and the pipeline's __call__, extend and generate_long with guidance: CFG x Ulysses (2 x 1
    and 2 x 2) and Ulysses alone (2)."""
    results = _results(request.getfixturevalue(f"world{world}"))
    expected_keys = set(reference) | ({"pipe_ulysses/call", "pipe_ulysses/extend", "pipe_ulysses/generate_long"}
                                      if world == 2 else set())
    assert set(results) == expected_keys
    for key, value in results.items():
        torch.testing.assert_close(value, reference[key.replace("pipe_ulysses", "pipe")], **TOLERANCE, msg=key)


def test_mask_is_applied_under_four_processes(world4, reference):
    """v2 differs from full under 4 ranks exactly as it does in one process."""
    results = _results(world4)
    for timestep in ("t", "scene_t"):
        v2, full = f"5b/v2/{timestep}", f"5b/full/{timestep}"
        single_gap = reference[v2] - reference[full]
        assert single_gap.abs().max() > 1e-3
        torch.testing.assert_close(results[v2] - results[full], single_gap, atol=2e-5, rtol=0)


def test_bad_setups_are_refused_by_name(world2):
    out, codes, logs, _ = world2
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    messages = json.loads((out / "messages.json").read_text())
    assert "ring_degree" in messages["ring"] and "ulysses_degree" in messages["ring"]
    assert "`ulysses_degree` (2) x CFG degree (2" in messages["degree"] and "(2)" in messages["degree"]
    assert messages["latents"].startswith("ValueError") and "generator" in messages["latents"]


def test_torchrun_example_matches_one_process_and_only_rank_0_writes(world2, tiny_model, tmp_path):
    from safetensors.torch import load_file

    out, codes, logs, _ = world2
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    reference = scenarios.example_frames(tiny_model, str(tmp_path / "single"), [])
    torch.testing.assert_close(load_file(str(out / "example.safetensors"))["frames"], reference, **TOLERANCE)
    assert sorted(os.listdir(out / "example")) == sorted(os.listdir(tmp_path / "single"))
    assert "Wrote 3 scenes" in logs[0] and "Wrote" not in logs[1]


def test_a_killed_rank_ends_the_run_with_a_clear_error(world4):
    out, codes, logs, seconds = world4
    assert codes[3] == -9, logs[3][-2000:]  # SIGKILL
    killed_at = json.loads((out / "killed_at.json").read_text())["time"]
    for rank in range(3):
        assert codes[rank] != 0, logs[rank][-2000:]
        error = json.loads((out / f"error_rank{rank}.json").read_text())
        assert error["type"] == "CollectiveTimeoutError", error
        assert "died or did not answer" in error["message"] and "collective_timeout" in error["message"]
        assert error["time"] - killed_at < scenarios.COLLECTIVE_TIMEOUT + 10
    assert seconds < RUN_TIMEOUT


# --------------------------------------------------------------------------------------------------
# One process: the pieces
# --------------------------------------------------------------------------------------------------


def test_heads_split_as_evenly_as_possible():
    assert split_heads(48, 8) == [6] * 8
    assert split_heads(30, 4) == [8, 8, 7, 7]
    with pytest.raises(ValueError, match="ulysses_degree"):
        split_heads(2, 4)


@pytest.mark.parametrize("degree", [1, 2, 3, 4, 8])
def test_each_rank_knows_the_scene_of_its_tokens(degree):
    lengths = (30, 45, 30)
    slices = [_local_lengths(lengths, degree, rank) for rank in range(degree)]
    padded = 105 + (-105) % degree
    assert all(sum(counts) == padded // degree for counts in slices)
    # Concatenated over ranks, the slices give back each scene's tokens (the padding counted in the last scene).
    assert [sum(counts[i] for counts in slices) for i in range(3)] == [30, 45, 30 + padded - 105]


def test_shard_segments_of_a_layout():
    layout = SceneLayout((7, 7, 7), (30, 45, 30))
    shard = SequenceShard(layout, degree=4, rank=0, group=None)
    assert (shard.text_padded, shard.video_padded, shard.local_text, shard.local_video) == (24, 108, 6, 27)
    assert shard.segments == ShardSegments((6, 0, 0), (27, 0, 0))
    last = SequenceShard(layout, degree=4, rank=3, group=None)
    assert last.segments == ShardSegments((0, 0, 3 + 3), (0, 0, 27))


def test_config_checks_name_what_is_wrong():
    from diffusers import ContextParallelConfig

    with pytest.raises(ValueError, match="ring_degree"):
        check_parallel_config(ContextParallelConfig(ring_degree=2), num_heads=48)
    with pytest.raises(ValueError, match=r"ulysses_degree.*\(8\).*heads \(6\)"):
        check_parallel_config(ContextParallelConfig(ulysses_degree=8), num_heads=6)
    with pytest.raises(ValueError, match="ContextParallelConfig"):
        check_parallel_config(object(), num_heads=48)


def test_setup_outside_torchrun_is_refused_by_name(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_parallel("cpu")
    with pytest.raises(ValueError, match="torch.distributed is not started"):
        enable_parallel_inference(object(), ulysses_degree=2)


# --------------------------------------------------------------------------------------------------
# The CLI: `mask2dit demo|generate|extend --ulysses-degree N [--cfg-parallel]` under torchrun
# --------------------------------------------------------------------------------------------------

DEMO = ["demo", "--random-weights", "--prompt", "A red fox in the snow.", "--prompt", "The fox at a frozen river.", "--steps", "1"]


def test_cli_under_torchrun_matches_one_process_and_only_rank_0_writes(tmp_path):
    from safetensors.torch import load_file

    from diffusers_mask2dit import cli

    src = os.path.dirname(os.path.dirname(os.path.abspath(diffusers_mask2dit.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "--log-dir", str(tmp_path / "logs"), "--redirects", "3",
        "-m", "diffusers_mask2dit.cli", *DEMO, "--ulysses-degree", "2", "--collective-timeout", "60",
        "--out", str(tmp_path / "parallel"),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    logs = {path.parent.name + path.stem: path.read_text() for path in (tmp_path / "logs").rglob("*.log")}
    assert completed.returncode == 0, completed.stderr[-3000:] + str(logs)[-3000:]
    assert "Wrote 2 scenes" in logs["0stdout"] and logs["1stdout"] == ""  # rank 1 writes nothing
    # Each scene was written as it finished (scene_XX.latents.safetensors); once latents.safetensors holds them all,
    # those files are removed: the folder is the one a one-process run writes.
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == [
        "contact_sheet.png", "latents.safetensors", "prompts.txt", "scene_00.mp4", "scene_01.mp4", "settings.json", "video.mp4"]
    assert "it/s" in logs["0stderr"] and "it/s" not in logs["1stderr"]  # and shows no progress bar

    assert cli.main([*DEMO, "--out", str(tmp_path / "single")]) == 0
    saved = [load_file(str(tmp_path / name / "latents.safetensors"))["latents"] for name in ("parallel", "single")]
    torch.testing.assert_close(saved[0], saved[1], **TOLERANCE)


@pytest.mark.parametrize(
    "options, environment, message",
    [
        (["--ulysses-degree", "2"], {}, "torchrun"),
        (["--ulysses-degree", "0"], {}, "`--ulysses-degree` must be a whole number >= 1"),
        (["--collective-timeout", "0"], {}, "`--collective-timeout` must be a whole number of seconds"),
        (["--ulysses-degree", "3"], {"WORLD_SIZE": "2"}, "`--ulysses-degree` (3) x 1 (`--cfg-parallel`) must equal"),
        (["--cfg-parallel", "--guidance", "1"], {"WORLD_SIZE": "2"}, "`--cfg-parallel` needs classifier-free"),
        (["--cfg-parallel", "--offload", "model"], {"WORLD_SIZE": "2"}, "`--offload model` cannot be combined"),
        (["--cfg-parallel", "--cpu-offload"], {"WORLD_SIZE": "2"}, "`--offload model` cannot be combined"),
    ],
)
def test_cli_parallel_options_are_checked_before_loading(options, environment, message, tmp_path, monkeypatch, capsys):
    from diffusers_mask2dit import cli

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if environment:  # as torchrun sets them (the run stops before starting torch.distributed)
        torchrun = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
        for name, value in {**torchrun, **environment}.items():
            monkeypatch.setenv(name, value)
    assert cli.main([*DEMO, *options, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()
