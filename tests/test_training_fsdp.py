"""The sharding engines on CPU processes with gloo: FSDP2 (``fully_shard`` through accelerate) and DeepSpeed
ZeRO-2/3, each launched with the environment ``accelerate launch --config_file examples/accelerate_configs/<engine>.yaml``
sets up; and the per-GPU memory estimate of the engines.

Each step uses the whole tiny dataset (global batch 4 = 4 samples), so 1, 2 and 4 processes see the same
samples with the same per-sample noise, and must reach the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers_mask2dit.training import train
from diffusers_mask2dit.training.checkpoints import list_checkpoints, verify_checkpoint
from test_training_distributed import _free_port
from test_training_fixtures import lora_tensors, tiny_config, write_sft_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "examples", "accelerate_configs")
FSDP2_CONFIG = os.path.join(CONFIGS, "fsdp2.yaml")
STEPS = 3
# Global batch 4 in every layout: (processes, train_batch_size, gradient_accumulation_steps).
LAYOUTS = {1: (2, 2), 2: (1, 2), 4: (1, 1)}

RUN_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from diffusers_mask2dit.training import checkpoints, train
    from diffusers_mask2dit.training.config import TrainingConfig

    kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    original = checkpoints.write_manifest

    def write_manifest(folder, step):
        if step == kill_at:  # every process wrote its shards of this checkpoint, the manifest is not written
            os.kill(os.getpid(), signal.SIGKILL)
        return original(folder, step)

    checkpoints.write_manifest = write_manifest
    train(TrainingConfig.from_dict(json.load(open(sys.argv[1]))))
    """
)


def _engine_environment(config_file: str, num_processes: int) -> dict:
    """The engine's variables `accelerate launch --config_file <config_file>` sets (computed by accelerate's own
    code), for CPU processes; the training config's `mixed_precision` ("no") stays in force."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", config_file, "--num_processes", str(num_processes), "run.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        launch = prepare_deepspeed_cmd_env(args)[1]
    else:
        launch = prepare_multi_gpu_env(args)
    engine = ("FSDP_", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_", "ACCELERATE_CONFIG_DS")
    env = dict(os.environ, **{k: v for k, v in launch.items() if k.startswith(engine)})
    src = os.path.join(REPO, "src")
    return dict(env, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]))


def _launch(config, num_processes: int, workdir, kill_at: int = 0, engine: str = FSDP2_CONFIG) -> subprocess.CompletedProcess:
    config_path = workdir / f"{os.path.basename(config.output_dir)}.json"
    config_path.write_text(json.dumps(config.to_dict()))
    script = workdir / "run_fsdp.py"
    script.write_text(RUN_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_addr",
        "127.0.0.1", "--master_port", str(_free_port()), str(script), str(config_path), str(kill_at),
    ]
    return subprocess.run(command, env=_engine_environment(engine, num_processes), capture_output=True, text=True, timeout=400,
                          cwd=str(workdir))


def _config(world, name: str, num_processes: int, **overrides):
    batch, accumulation = LAYOUTS[num_processes]
    values = dict(
        data_file=world["data"], max_train_steps=STEPS, train_batch_size=batch, gradient_accumulation_steps=accumulation,
        cond_prob=0.5, max_grad_norm=0.05, learning_rate=1e-2, lr_scheduler="linear", lr_warmup_steps=1,
        checkpointing_steps=1, finetune="full",
    )
    values.update(overrides)
    return tiny_config(world["model"], str(world["root"] / name), **values)


def _transformer_tensors(output_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "transformer", "diffusion_pytorch_model.safetensors"))


def _assert_launched(completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    root = tmp_path_factory.mktemp("fsdp")
    model = save_tiny_cogvideox(str(root / "model"))
    data = write_sft_jsonl(str(root), num_videos=4, shots=2, frames=9)
    world = {"root": root, "model": model, "data": data}
    world["single"] = _config(world, "single", 1)
    train(world["single"])  # plain single-process run: the reference
    return world


@pytest.fixture(scope="module")
def two_process_run(world):
    config = _config(world, "fsdp-2", 2)
    _assert_launched(_launch(config, 2, world["root"]))
    return config


def _assert_sharded_checkpoint(path: str, num_processes: int) -> None:
    assert verify_checkpoint(path) is None
    manifest = json.load(open(os.path.join(path, "checkpoint_manifest.json"), encoding="utf-8"))["files"]
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):  # DCP: one shard file per process + metadata
        assert {f"{folder}/__{rank}_0.distcp" for rank in range(num_processes)} | {f"{folder}/.metadata"} <= set(manifest)
    assert not any(name.endswith(".safetensors") and "model" in name for name in manifest)  # never a full copy


@pytest.mark.parametrize("num_processes", [2, 4])
def test_fsdp2_full_finetune_matches_one_process(world, two_process_run, num_processes):
    if num_processes == 2:
        config = two_process_run
    else:
        config = _config(world, f"fsdp-{num_processes}", num_processes)
        _assert_launched(_launch(config, num_processes, world["root"]))
    _assert_sharded_checkpoint(os.path.join(config.output_dir, f"checkpoint-{STEPS}"), num_processes)

    reference, sharded = _transformer_tensors(world["single"].output_dir), _transformer_tensors(config.output_dir)
    assert sorted(reference) == sorted(sharded)
    base = _transformer_tensors_of_base(world)
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], atol=2e-6, rtol=1e-4, msg=key)
    assert max(float((reference[k] - base[k]).abs().max()) for k in base) > 1e-3  # it trained


def _transformer_tensors_of_base(world) -> dict:
    from diffusers_mask2dit import Mask2DiTTransformer3DModel

    base = Mask2DiTTransformer3DModel.from_pretrained(world["model"], subfolder="transformer")
    return {k: v.float() for k, v in base.state_dict().items()}


def test_fsdp2_killed_mid_save_resumes_exactly(world, two_process_run):
    config = _config(world, "fsdp-2-killed", 2)
    killed = _launch(config, 2, world["root"], kill_at=2)
    assert killed.returncode != 0
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [1]
    assert os.path.isdir(os.path.join(config.output_dir, ".tmp-checkpoint-2"))  # the interrupted save, never listed

    config.resume_from_checkpoint = "latest"
    _assert_launched(_launch(config, 2, world["root"]))
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [1, 2, 3]
    _assert_sharded_checkpoint(os.path.join(config.output_dir, "checkpoint-3"), 2)
    straight, resumed = _transformer_tensors(two_process_run.output_dir), _transformer_tensors(config.output_dir)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_lora_under_fsdp2_matches_one_process_and_loads_in_the_pipeline(world):
    from diffusers_mask2dit import Mask2DiTPipeline

    lora = dict(finetune="lora", lora_rank=4, lora_alpha=16.0, max_train_steps=2, checkpointing_steps=0)
    single = _config(world, "lora-single", 1, **lora)
    trained = train(single).transformer
    config = _config(world, "lora-fsdp-2", 2, **lora)
    _assert_launched(_launch(config, 2, world["root"]))
    reference, sharded = lora_tensors(single.output_dir), lora_tensors(config.output_dir)
    assert sorted(reference) == sorted(sharded)
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], atol=2e-6, rtol=1e-4, msg=key)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 6, 4, 8, 8, generator=generator)
    embeds = torch.randn(1, 2 * 226, 32, generator=generator)
    timestep = torch.tensor([[0, 700]])

    def run(transformer):
        with torch.no_grad():
            return transformer.eval()(latents, embeds, timestep, scene_frames=[3, 3]).sample

    pipe = Mask2DiTPipeline.from_pretrained(world["model"])
    base = run(pipe.transformer)
    pipe.load_lora_weights(config.output_dir)
    loaded = run(pipe.transformer)
    torch.testing.assert_close(loaded, run(trained), atol=1e-5, rtol=1e-5)
    assert (loaded - base).abs().max() > 1e-3  # the adapter does something


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (runs on CPU processes too)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, cond_prob", [(2, 0.5), (3, 0.0)])  # ZeRO-3 refuses conditional samples (below)
def test_deepspeed_zero_full_finetune_matches_one_process_and_resumes_exactly(world, stage, cond_prob):
    pytest.importorskip("deepspeed")
    engine = os.path.join(CONFIGS, f"deepspeed_zero{stage}.yaml")
    single = world["single"]
    if cond_prob != single.cond_prob:
        single = _config(world, f"single-cond{cond_prob}", 1, cond_prob=cond_prob)
        train(single)
    config = _config(world, f"zero{stage}-2", 2, cond_prob=cond_prob)
    _assert_launched(_launch(config, 2, world["root"], engine=engine))
    assert verify_checkpoint(os.path.join(config.output_dir, f"checkpoint-{STEPS}")) is None
    reference, sharded = _transformer_tensors(single.output_dir), _transformer_tensors(config.output_dir)
    assert sorted(reference) == sorted(sharded)
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], atol=2e-6, rtol=1e-4, msg=key)

    resumed = _config(world, f"zero{stage}-2-resumed", 2, cond_prob=cond_prob,
                      resume_from_checkpoint=os.path.join(config.output_dir, "checkpoint-1"))
    _assert_launched(_launch(resumed, 2, world["root"], engine=engine))
    resumed_weights = _transformer_tensors(resumed.output_dir)
    for key in sharded:
        assert torch.equal(resumed_weights[key], sharded[key]), key


def test_zero3_with_conditional_samples_is_refused_before_it_hangs():
    from types import SimpleNamespace

    from diffusers_mask2dit.training import TrainingConfig
    from diffusers_mask2dit.training.engines import check_zero3_options

    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(ValueError, match="ZeRO-3 cannot train SFT with `cond_prob` 0.5"):
        check_zero3_options(zero3, TrainingConfig(stage="sft", cond_prob=0.5))
    check_zero3_options(zero3, TrainingConfig(stage="pretrain", cond_prob=0.5))  # pretraining has no conditional samples
    zero2 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    check_zero3_options(zero2, TrainingConfig(stage="sft", cond_prob=0.5))


# ------------------------------------------------------------------------------------------------
# Memory per GPU by engine (benchmarks/bench_training_engines.py)
# ------------------------------------------------------------------------------------------------


def test_engine_memory_estimate_shards_the_state_and_agrees_with_the_measured_step():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_training_engines", os.path.join(REPO, "benchmarks", "bench_training_engines.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    payload = bench.main(["--quick", "--no-save", "--gpus", "1,2,4"])
    per_gpu, P = payload["per_gpu_bytes"], payload["layout"]["P"]
    single = payload["single_gpu_step"]["peak_total_bytes"]
    # Counted fp32 state (weights, gradients, AdamW: 16 bytes per parameter) + measured activations ~ the measured step.
    assert abs(16 * P + payload["activations_bytes"] - single) / single < 0.1
    assert per_gpu["ddp"][1] == single and per_gpu["ddp"][2] == per_gpu["ddp"][4] > single
    for engine in ("zero2", "zero3", "fsdp2"):
        assert per_gpu[engine][1] > per_gpu[engine][2] > per_gpu[engine][4], engine
        assert per_gpu[engine][2] - per_gpu[engine][4] >= 16 * P / 4  # the sharded state halves again


# ------------------------------------------------------------------------------------------------
# Settings refused with an error naming the option
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plugin_options, config_options, expected",
    [
        (dict(fsdp_version=1), dict(finetune="lora"), "`fsdp_version: 2`"),
        (dict(fsdp_version=2, state_dict_type="FULL_STATE_DICT"), {}, "`fsdp_state_dict_type` is FULL_STATE_DICT"),
        (dict(fsdp_version=2, activation_checkpointing=True), dict(gradient_checkpointing=True), "fsdp_activation_checkpointing"),
    ],
)
def test_fsdp_settings_that_would_break_the_run_are_refused(plugin_options, config_options, expected):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from diffusers_mask2dit.training import TrainingConfig
    from diffusers_mask2dit.training.fsdp import check_fsdp_options

    plugin = FullyShardedDataParallelPlugin(**plugin_options)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    config = TrainingConfig(**dict(dict(finetune="full"), **config_options))
    with pytest.raises(ValueError, match=expected.replace("`", ".")):
        check_fsdp_options(accelerator, config)
    check_fsdp_options(accelerator.__class__(distributed_type=DistributedType.MULTI_CPU), config)  # no FSDP: no check


def test_fsdp1_on_cpu_is_refused_naming_fsdp_version(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusers_mask2dit.training.engines import enable_engine_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="`fsdp_version` is 1; FSDP on CPU"):
        enable_engine_on_cpu(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no"))
