"""Two processes (gloo on CPU, launched with torchrun) train the same model as one process with the same global batch.

Also runs ``examples/train_mask2dit_lora.py`` end to end, as users launch it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diffusers_mask2dit.training import train
from test_training_fixtures import assert_tensor_dicts_close, lora_tensors, tiny_config, write_sft_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "train_mask2dit_lora.py")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    model = save_tiny_cogvideox(str(tmp_path / "model"))
    data = write_sft_jsonl(str(tmp_path), num_videos=4, shots=2, frames=9)
    # Global batch 2 x 2 accumulation = all 4 samples per step: 2 steps cover 2 epochs.
    common = dict(
        data_file=data, max_train_steps=2, gradient_accumulation_steps=2, cond_prob=0.5, max_grad_norm=0.05,
        learning_rate=1e-2, lr_scheduler="linear", lr_warmup_steps=1, checkpointing_steps=1,
    )
    single = tiny_config(model, str(tmp_path / "single"), train_batch_size=2, **common)
    train(single)

    double = tiny_config(model, str(tmp_path / "double"), train_batch_size=1, **common)
    config_path = tmp_path / "double.json"
    config_path.write_text(json.dumps(double.to_dict()))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), EXAMPLE, "--config", str(config_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "2 batches per process per epoch" in completed.stderr  # 4 samples / (1 per process x 2 processes)

    checkpoint = tmp_path / "double" / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl", "training_progress.json"} <= set(os.listdir(checkpoint))
    assert_tensor_dicts_close(lora_tensors(str(checkpoint)), lora_tensors(double.output_dir))

    single_weights = lora_tensors(single.output_dir)
    double_weights = lora_tensors(double.output_dir)
    assert_tensor_dicts_close(single_weights, double_weights, atol=2e-6, rtol=1e-4)
    assert any(float(v.abs().max()) > 0 for k, v in double_weights.items() if "lora_B" in k)  # it trained


def test_example_script_rejects_a_bad_boolean(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mask2dit_lora", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as raised:
        example.main(["--gradient_checkpointing", "maybe"])
    assert raised.value.code == 2 and "gradient_checkpointing" in capsys.readouterr().err
    assert example.build_parser().parse_args([]).__dict__["_config_defaults"] == {"finetune": "lora"}
