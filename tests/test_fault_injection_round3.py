"""Faults of the third reliability round (issue 27), each injected for real where the machine allows it (signals,
truncated and poisoned files, a full tmpfs), asserting the message and what is on disk afterwards.

The training runs share `test_fault_injection`'s tiny model, cache and uninterrupted reference run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_mask2dit.cli import main as cli_main
from diffusers_mask2dit.training import NonFiniteLossError, train
from diffusers_mask2dit.training.checkpoints import list_checkpoints, resolve_resume_checkpoint, write_manifest
from test_fault_injection import (  # noqa: F401  (fixtures: world, fresh_accelerator_state)
    MANIFEST_NAME,
    REPO,
    STRAIGHT,
    _assert_same_as_straight,
    _config,
    _copy_checkpoints,
    _flip_last_byte,
    fresh_accelerator_state,
    world,
)

LORA_FILE = "pytorch_lora_weights.safetensors"


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))


def _one_line_error(capsys, prefix="mask2dit train: "):
    printed = capsys.readouterr().err
    message = printed.strip().splitlines()[-1]  # a progress bar may come before the one-line error
    assert message.startswith(prefix) and "Traceback" not in printed, printed[-2000:]
    return message


# ------------------------------------------------------------------------------------------------
# 1. A non-finite gradient norm names the last checkpoint whose weights pass a probe step
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def infinite_gradients_from(monkeypatch):
    """Checkpoints (by folder name) whose weights give an infinite gradient norm with a finite loss: the
    gradients after `backward` become inf while the weights last loaded come from one of them."""
    from accelerate import Accelerator

    diverged, loaded = set(), []
    original_load, original_backward = Accelerator.load_state, Accelerator.backward

    def load_state(self, input_dir=None, **kwargs):
        loaded.append(os.path.basename(str(input_dir)))
        return original_load(self, input_dir, **kwargs)

    def backward(self, loss, **kwargs):
        original_backward(self, loss, **kwargs)
        if loaded and loaded[-1] in diverged:
            next(p for p in self._models[0].parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    monkeypatch.setattr(Accelerator, "load_state", load_state)
    monkeypatch.setattr(Accelerator, "backward", backward)
    return diverged


def test_infinite_gradient_norm_after_resume_names_the_checkpoint_that_passes_a_probe(world, tmp_path, capsys, infinite_gradients_from):
    out = _copy_checkpoints(world, tmp_path / "out", steps=(1, 2))
    infinite_gradients_from.add("checkpoint-2")  # its weights diverged: resuming at a tiny learning rate does not help
    config = _config(world, out, resume_from_checkpoint="latest", learning_rate=3e-7)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    assert cli_main(["train", "--config", str(tmp_path / "run.json")]) == 1
    message = _one_line_error(capsys)
    assert "The gradient norm became inf at step 3" in message and "the weights diverged" in message, message
    assert f"{out / 'checkpoint-2'} holds those weights and was renamed to {out / 'checkpoint-2'}.diverged" in message
    assert f"The last good checkpoint is {out / 'checkpoint-1'}." in message, message
    assert (out / "checkpoint-2.diverged").is_dir() and [step for step, _ in list_checkpoints(str(out))] == [1]
    assert not (out / LORA_FILE).exists()

    # `latest` now resumes from checkpoint-1 and, at the reference learning rate, redoes the reference run exactly.
    infinite_gradients_from.clear()
    config.resume_from_checkpoint, config.learning_rate = "latest", STRAIGHT["learning_rate"]
    assert train(config).global_step == 3
    _assert_same_as_straight(world, out)


def test_when_no_checkpoint_passes_the_probe_the_message_says_so(world, tmp_path, infinite_gradients_from):
    out = _copy_checkpoints(world, tmp_path / "out", steps=(1, 2))
    infinite_gradients_from.update({"checkpoint-1", "checkpoint-2"})
    with pytest.raises(NonFiniteLossError) as raised:
        train(_config(world, out, resume_from_checkpoint="latest"))
    message = str(raised.value)
    assert f"{out / 'checkpoint-1'} also fails a probe step and was renamed to {out / 'checkpoint-1'}.diverged" in message
    assert f"No checkpoint in {out} has finite weights and a finite probe step." in message, message
    assert "The last good checkpoint" not in message
    assert list_checkpoints(str(out)) == [] and sorted(p.name for p in out.iterdir()) == ["checkpoint-1.diverged", "checkpoint-2.diverged"]


# ------------------------------------------------------------------------------------------------
# 2. A checkpoint without its manifest is not trusted over an older one that verifies
# ------------------------------------------------------------------------------------------------


def test_manifest_deleted_and_weights_changed_falls_back_to_the_verified_checkpoint(world, tmp_path, caplog):
    out = _copy_checkpoints(world, tmp_path / "out")
    (out / "checkpoint-3" / MANIFEST_NAME).unlink()
    _flip_last_byte(out / "checkpoint-3" / LORA_FILE)
    config = _config(world, out, resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint(config) == str(out / "checkpoint-2")
    warning = next(r.getMessage() for r in caplog.records if "Not resuming from" in r.getMessage())
    assert str(out / "checkpoint-3") in warning and MANIFEST_NAME in warning and "set `resume_from_checkpoint` to it" in warning
    assert train(config).global_step == 3
    _assert_same_as_straight(world, out)  # step 3 trained again from checkpoint-2, not loaded from the changed file
    assert (out / "checkpoint-3.abandoned" / LORA_FILE).is_file()  # kept aside, not deleted

    # A run saved before manifests existed (none has one) still resumes, from its newest checkpoint, with a warning.
    legacy = _copy_checkpoints(world, tmp_path / "legacy", steps=(1, 2))
    for folder in legacy.iterdir():
        (folder / MANIFEST_NAME).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint(_config(world, legacy, resume_from_checkpoint="latest")) == str(legacy / "checkpoint-2")
    assert "no checkpoint in" in caplog.text and "unverified" in caplog.text


# ------------------------------------------------------------------------------------------------
# 3. `mask2dit train` with bad configs: one line, exit status 2
# ------------------------------------------------------------------------------------------------

CONFIG_FILES = {
    "yaml tab": ("run.yaml", "mixed_precision: no\n\tlora_rank: 4\n", ["run.yaml", "line 2, column 1", "tabs"]),
    "yaml syntax": ("run.yaml", "lora_rank: [4\nseed: 1\n", ["run.yaml", "not valid YAML", "line 2, column 5"]),
    "json syntax": ("run.json", '{"lora_rank": 4,\n "seed": }\n', ["run.json", "not valid JSON", "line 2, column 10"]),
    "toml syntax": ("run.toml", "lora_rank = 4\nseed = \n", ["run.toml", "not valid TOML", "line 2, column 8"]),
    "json NaN": ("run.json", '{"max_grad_norm": NaN}', ["`max_grad_norm` must be a finite number"]),
    "yaml NaN": ("run.yaml", "lora_alpha: .nan\n", ["`lora_alpha` must be a finite number"]),
    "timeout overflow": ("run.json", '{"collective_timeout": 1e20}', ["`collective_timeout` must be at most 2592000"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_bad_config_files_are_one_line_naming_file_line_and_column(tmp_path, capsys, case):
    name, text, expected = CONFIG_FILES[case]
    (tmp_path / name).write_text(text)
    assert cli_main(["train", "--config", str(tmp_path / name)]) == 2
    message = _one_line_error(capsys)
    assert message.count("\n") == 0 and all(part in message for part in expected), message


@pytest.mark.parametrize("name, text", [("run.json", '{"mixed_precision": "no"}'), ("run.yaml", 'mixed_precision: "no"\n'),
                                        ("run.toml", 'mixed_precision = "no"\n')])
def test_a_byte_order_mark_is_accepted(tmp_path, name, text):
    from diffusers_mask2dit.training.config import load_config_file

    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Windows editors write
    assert load_config_file(str(tmp_path / name)) == {"mixed_precision": "no"}


@pytest.mark.parametrize("option", ["max_grad_norm", "lora_alpha", "learning_rate", "cond_prob", "adam_epsilon"])
def test_nan_for_a_float_option_is_refused_by_name(world, tmp_path, capsys, option):
    from diffusers_mask2dit.training.config import TrainingConfig

    assert cli_main(["train", "--pretrained_model_name_or_path", world["model"], f"--{option}", "nan"]) == 2
    assert f"`{option}` must be a finite number, got 'nan'" in _one_line_error(capsys)
    with pytest.raises(ValueError, match=f"`{option}` must be a finite number, got nan"):
        TrainingConfig(**{option: float("nan")})  # the dataclass refuses it too, not only the parser


def _train_flags(world, out):
    return ["--pretrained_model_name_or_path", world["model"], "--output_dir", str(out), "--cache_dir", world["cache"],
            "--num_scenes", "2", "--frames_per_scene", "9", "--height", "64", "--width", "64", "--report_to", "none",
            "--mixed_precision", "no", "--lora_rank", "4", "--lora_alpha", "8", "--max_train_steps", "3"]


@pytest.mark.parametrize("case, flags, expected", [
    ("other LoRA rank", ["--lora_rank", "8"], "was trained with LoRA rank 4 but this run has `lora_rank: 8`"),
    ("full from LoRA", ["--finetune", "full"], "holds LoRA adapters (finetune: lora) but this run has `finetune: full`"),
])
def test_resume_that_does_not_fit_the_checkpoint_names_both(world, tmp_path, capsys, case, flags, expected):
    out = _copy_checkpoints(world, tmp_path / "out", steps=(1,))
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert cli_main(["train", *_train_flags(world, out), "--resume_from_checkpoint", "latest", *flags]) == 2
    message = _one_line_error(capsys)
    assert str(out / "checkpoint-1") in message and expected in message, message
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing renamed or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on a CPU only")
def test_fp16_on_a_cpu_is_refused_by_name(world, tmp_path, capsys):
    flags = _train_flags(world, tmp_path / "out")
    flags[flags.index("--mixed_precision") + 1] = "fp16"
    assert cli_main(["train", *flags]) == 2
    message = _one_line_error(capsys)
    assert "`mixed_precision` fp16 needs a GPU" in message and "bf16 or no" in message, message


# ------------------------------------------------------------------------------------------------
# 4. Out of disk space while saving
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mount point (root only) whose size the test sets with `resize(bytes)`; None where mounting is refused."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True).returncode == 0
    if not mounted:
        yield None
        return

    def resize(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True, capture_output=True)
        return mount_point

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_out_of_disk_space_while_saving_is_one_line_and_resumable(world, tmp_path, capsys, monkeypatch, small_tmpfs):
    checkpoint_bytes = _folder_bytes(Path(world["straight"]) / "checkpoint-1")
    if small_tmpfs is not None:  # a real full file system: room for checkpoint-1, not for checkpoint-2 beside it
        out = small_tmpfs(int(checkpoint_bytes * 1.6) // 4096 * 4096 + 4096) / "out"
    else:  # not root / no mount: the file system error is faked at the same place
        from diffusers_mask2dit.training import checkpoints

        out = tmp_path / "out"
        original = checkpoints.TrainingProgress.save

        def save(self, folder):
            if self.global_step == 2:
                raise OSError(28, "No space left on device")
            return original(self, folder)

        monkeypatch.setattr(checkpoints.TrainingProgress, "save", save)
    config = _config(world, out)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    assert cli_main(["train", "--config", str(tmp_path / "run.json")]) == 1
    message = _one_line_error(capsys)
    assert f"No space left on device in {out} while saving checkpoint-2" in message, message
    assert "resume with `resume_from_checkpoint: latest`" in message
    assert [step for step, _ in list_checkpoints(str(out))] == [1]
    assert sorted(p.name for p in out.iterdir() if p.name != "logs") == ["checkpoint-1"]  # the partial save is gone

    if small_tmpfs is not None:
        small_tmpfs(64 << 20)
    monkeypatch.undo()
    config.resume_from_checkpoint = "latest"
    assert train(config).global_step == 3
    _assert_same_as_straight(world, out)


# ------------------------------------------------------------------------------------------------
# 5. Checkpoint folders passed over while resuming are named
# ------------------------------------------------------------------------------------------------


def test_checkpoint_folders_skipped_on_resume_are_each_named(world, tmp_path, caplog):
    out = _copy_checkpoints(world, tmp_path / "out", steps=(1, 2, 3))
    (out / "checkpoint-3" / "training_progress.json").unlink()
    (out / "checkpoint-4").mkdir()  # emptied
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint(_config(world, out, resume_from_checkpoint="latest")) == str(out / "checkpoint-2")
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping")]
    assert len(skipped) == 2, skipped
    assert f"{out / 'checkpoint-3'}: no training_progress.json" in skipped[0]
    assert f"{out / 'checkpoint-4'}: an empty folder" in skipped[1]
    assert (out / "checkpoint-3" / LORA_FILE).is_file() and (out / "checkpoint-4").is_dir()  # left as they were


# ------------------------------------------------------------------------------------------------
# 6. NaN in the data names the cache file and the sample
# ------------------------------------------------------------------------------------------------


def test_nan_in_a_cache_file_names_the_file_and_the_sample(world, tmp_path):
    from diffusers_mask2dit.training.precompute import INDEX_NAME, LATENT_FOLDER

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    index = json.loads((cache / INDEX_NAME).read_text())
    poisoned = cache / LATENT_FOLDER / index["records"][2][1]["files"]["9"]  # scene 2 of the third video
    tensors = load_file(str(poisoned))
    tensors["latent_mean"].view(-1)[5] = float("nan")
    save_file(tensors, str(poisoned))
    config = _config(world, tmp_path / "out", cache_dir=str(cache), max_train_steps=4)
    with pytest.raises(NonFiniteLossError) as raised:
        train(config)
    message = str(raised.value)
    assert f"sample 2 scene 2 ({poisoned}): latent_mean" in message and "damaged data" in message, message
    assert "Remove or re-create those samples" in message
    steps = [step for step, _ in list_checkpoints(config.output_dir)]  # the data, not the weights: all are kept
    good = f"The last good checkpoint is {os.path.join(config.output_dir, f'checkpoint-{steps[-1]}')}." if steps else "No checkpoint was written yet."
    assert good in message, message
    assert not (Path(config.output_dir) / LORA_FILE).exists()


# ------------------------------------------------------------------------------------------------
# 8. A pickle payload in a checkpoint whose manifest matches
# ------------------------------------------------------------------------------------------------


def test_pickle_payload_in_the_optimizer_state_is_refused_in_one_line(world, tmp_path, capsys):
    out = _copy_checkpoints(world, tmp_path / "out", steps=(1, 2))
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"state": {}, "param_groups": [], "payload": Payload()}, out / "checkpoint-2" / "optimizer.bin")
    write_manifest(str(out / "checkpoint-2"), 2)  # the manifest vouches for the poisoned file
    assert cli_main(["train", *_train_flags(world, out), "--resume_from_checkpoint", "latest"]) == 2
    message = _one_line_error(capsys)
    assert f"Refused to unpickle {out / 'checkpoint-2' / 'optimizer.bin'}" in message and "Nothing in it was run" in message
    assert "weights_only" not in message and "`posix.mkdir`" in message, message
    assert not marker.exists()
    assert [step for step, _ in list_checkpoints(str(out))] == [1, 2] and not (out / LORA_FILE).exists()


# ------------------------------------------------------------------------------------------------
# 7. `convert-official` killed: the next run removes its own staging folder, nothing else
# ------------------------------------------------------------------------------------------------

KILLED_CONVERSION = textwrap.dedent(
    """
    import os, signal, sys
    from diffusers_mask2dit.hub import convert

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    convert._verify_conversion = killed  # every file is written into the staging folder, then the process dies
    convert.convert_official(sys.argv[1], sys.argv[2], verify="files")
    """
)


def test_a_rerun_of_a_killed_conversion_removes_only_its_own_staging_folder(tmp_path):
    from diffusers_mask2dit.hub.convert import REPORT_NAME, STAGING_MARKER, STAGING_PREFIX, convert_official
    from diffusers_mask2dit.hub.testing import save_fake_official_layout

    release = save_fake_official_layout(tmp_path / "release")
    parent = tmp_path / "models"
    parent.mkdir()
    out = parent / "converted"
    (tmp_path / "kill.py").write_text(KILLED_CONVERSION)
    completed = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(release), str(out)], env=_env(),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == -9, completed.stderr[-2000:]
    (stale,) = [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert (stale / STAGING_MARKER).is_file() and not out.exists()

    # Folders that are not a dead conversion of `out` on this host: a user's, another output's, a live run's.
    others = [parent / ".tmp-converted-deadbeef", parent / f"{STAGING_PREFIX}converted-extra-1-0123abcd",
              parent / f"{STAGING_PREFIX}converted-{os.getpid()}-0123abcd", parent / f"{STAGING_PREFIX}converted-1-0123abcd"]
    for folder in others:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    (others[2] / STAGING_MARKER).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))  # alive
    (others[3] / STAGING_MARKER).write_text(json.dumps({"host": f"elsewhere-{uuid.uuid4().hex}", "pid": 1}))

    convert_official(release, out, verify="files")
    assert (out / REPORT_NAME).is_file() and not stale.exists()
    assert all((folder / "keep.txt").read_text() == "mine" for folder in others)
    assert sorted(p.name for p in parent.iterdir()) == sorted(["converted"] + [f.name for f in others])


# ------------------------------------------------------------------------------------------------
# 10. Shapes retrain: a step's "done" marker is written last, atomically
# ------------------------------------------------------------------------------------------------

KILLED_STEP = textwrap.dedent(
    """
    import os, signal, sys
    from diffusers_mask2dit.shapes.retrain import Run

    def write_dataset():
        os.makedirs(os.path.join(sys.argv[1], "data"), exist_ok=True)
        with open(os.path.join(sys.argv[1], "data", "sft.json"), "w") as handle:
            handle.write('[{"scenes": [{"video": "v0_s0.mp4", "capt')  # half of the file, then a kill
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    run = Run(sys.argv[1])
    run.step("data", run.path("data", "sft.json"), write_dataset)
    """
)


def test_a_retrain_step_killed_while_writing_its_output_runs_again(tmp_path):
    from diffusers_mask2dit.shapes.retrain import Run

    (tmp_path / "kill.py").write_text(KILLED_STEP)
    completed = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "run")], env=_env(),
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == -9, completed.stderr[-2000:]
    sft = tmp_path / "run" / "data" / "sft.json"
    assert sft.is_file() and not (tmp_path / "run" / "steps").exists()

    ran = []

    def write_dataset():
        ran.append("data")
        sft.write_text(json.dumps([{"scenes": []}]))

    run = Run(str(tmp_path / "run"))
    run.step("data", str(sft), write_dataset)
    assert ran == ["data"] and json.loads(sft.read_text()) == [{"scenes": []}]  # the truncated file was not accepted
    assert json.loads(Path(run.marker("data")).read_text())["output"] == os.path.join("data", "sft.json")
    Run(str(tmp_path / "run")).step("data", str(sft), write_dataset)
    assert ran == ["data"]  # done now: not run again

    # A run folder from before markers: a step whose seconds are in timings.json (written after it returned) is done.
    legacy = tmp_path / "legacy"
    (legacy / "data").mkdir(parents=True)
    (legacy / "data" / "sft.json").write_text("[]")
    (legacy / "timings.json").write_text(json.dumps({"data": 1.0}))
    Run(str(legacy)).step("data", str(legacy / "data" / "sft.json"), write_dataset)
    assert ran == ["data"]


# ------------------------------------------------------------------------------------------------
# 9. Parallel inference keeps every finished scene when a later window fails (helpers; the CLI wires them)
# ------------------------------------------------------------------------------------------------


def test_scenes_are_on_disk_as_they_finish_and_a_stopped_run_names_them(tmp_path, capsys):
    from safetensors.torch import load_file as load_tensors

    from diffusers_mask2dit import Mask2DiTPipeline
    from diffusers_mask2dit.finished_scenes import FinishedSceneWriter, new_scenes_per_window, report_stopped_run
    from diffusers_mask2dit.parallel import CollectiveTimeoutError
    from diffusers_mask2dit.tiny import build_tiny_components
    from diffusers_mask2dit.video_io import read_video

    pipe = Mask2DiTPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat walks", "a dog runs", "a bird flies"]
    frames = [pipe.latent_frames(9)] * len(prompts)
    options = dict(scenes_per_window=2, num_inference_steps=2, output_type="latent")

    writer = FinishedSceneWriter(str(tmp_path / "whole"), frames, new_scenes_per_window(3, 2))
    latents = pipe.generate_long(prompts, generator=torch.Generator().manual_seed(0), callback_on_step_end=writer, **options).frames
    for index in range(3):  # every scene as the pipeline returns it, bit for bit
        saved = load_tensors(str(tmp_path / "whole" / f"scene_{index:02d}.latents.safetensors"))["latents"]
        torch.testing.assert_close(saved, latents[0, 3 * index : 3 * index + 3], atol=0, rtol=0)
        assert read_video(str(tmp_path / "whole" / f"scene_{index:02d}.mp4")).shape[0] == 9

    # A process of the run hangs in the second window: the first window's two scenes are already on disk.
    stopped = FinishedSceneWriter(str(tmp_path / "stopped"), frames, new_scenes_per_window(3, 2))

    def hang_in_second_window(pipe, step, timestep, callback_kwargs):
        stopped(pipe, step, timestep, callback_kwargs)
        if stopped._window == 1 and step == 0:  # the first window is done and written
            raise CollectiveTimeoutError("Rank 0 stopped in the all-to-all of the attention over 2 processes (injected).")
        return {}

    with pytest.raises(CollectiveTimeoutError) as raised:
        pipe.generate_long(prompts, generator=torch.Generator().manual_seed(0), callback_on_step_end=hang_in_second_window, **options)
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == sorted(
        [f"scene_{i:02d}.mp4" for i in range(2)] + [f"scene_{i:02d}.latents.safetensors" for i in range(2)])  # no temp file
    for index in range(2):
        saved = load_tensors(str(tmp_path / "stopped" / f"scene_{index:02d}.latents.safetensors"))["latents"]
        torch.testing.assert_close(saved, latents[0, 3 * index : 3 * index + 3], atol=0, rtol=0)
    assert report_stopped_run("generate", raised.value, stopped) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("mask2dit generate: error: Rank 0 stopped") and "Traceback" not in message
    assert "2 finished scene(s) are on disk" in message and str(tmp_path / "stopped" / "scene_01.mp4") in message


def _launch_demo_with_a_hung_rank(tmp_path, demo, collective_timeout):
    """``mask2dit demo`` on 2 gloo processes (as torchrun starts them) whose rank 1 stops answering (SIGSTOP) after
    the first window (`faulty_rank.py`). Returns rank 0's ``(exit code, stderr, seconds from the hang to its end)``."""
    from test_parallel import RUN_TIMEOUT, _free_port

    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    arguments = [*demo, "--ulysses-degree", "2", "--collective-timeout", str(collective_timeout)]
    stamp = tmp_path / "rank1_stopped_at"
    commands = [[sys.executable, "-m", "diffusers_mask2dit.cli", *arguments],
                [sys.executable, str(REPO / "tests" / "faulty_rank.py"), "hang", str(stamp), "--", *arguments]]
    ranks = [subprocess.Popen(command, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for rank, command in enumerate(commands)]
    try:
        _, stderr = ranks[0].communicate(timeout=RUN_TIMEOUT)
        ended = time.time()
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    return ranks[0].returncode, stderr, ended - float(stamp.read_text())


FAULTY_DEMO = ["demo", "--random-weights", "--prompt", "a cat walks", "--prompt", "a dog runs", "--prompt", "a bird flies",
               "--scenes-per-window", "2", "--steps", "1", "--frames", "9"]  # windows: scenes 1-2, then scene 3


@pytest.fixture(scope="module")
def clean_demo(tmp_path_factory):
    """`FAULTY_DEMO` on one process, without faults: the scenes a stopped parallel run must have kept."""
    clean = tmp_path_factory.mktemp("clean")
    assert cli_main([*FAULTY_DEMO, "--out", str(clean)]) == 0
    assert not list(clean.glob("scene_*.latents.safetensors"))  # a one-process run writes no per-scene latents
    return clean


def _assert_one_line_naming_the_first_window(stderr, out, *reasons):
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith(tuple(f"mask2dit demo: error: {start}" for start in reasons)), errors[0]
    assert errors[0].endswith(f"2 finished scene(s) are on disk: {out / 'scene_00.mp4'}, {out / 'scene_01.mp4'}.")


def _assert_first_window_on_disk(out, clean):
    """The first window's 2 scenes and nothing else (no temporary file, no whole video), equal to the clean run's
    (fp32 parallel vs one process: 1e-5, as tests/test_parallel.py)."""
    from safetensors.torch import load_file as load_tensors

    from diffusers_mask2dit.video_io import read_video

    assert sorted(p.name for p in out.iterdir()) == [
        "scene_00.latents.safetensors", "scene_00.mp4", "scene_01.latents.safetensors", "scene_01.mp4"]
    reference = load_tensors(str(clean / "latents.safetensors"))["latents"][0]
    frames = reference.shape[0] // 3
    for index in range(2):
        scene = load_tensors(str(out / f"scene_{index:02d}.latents.safetensors"))["latents"]
        torch.testing.assert_close(scene, reference[index * frames : (index + 1) * frames], atol=1e-5, rtol=0)
        assert read_video(str(out / f"scene_{index:02d}.mp4")).shape == read_video(str(clean / f"scene_{index:02d}.mp4")).shape


def test_a_hung_rank_ends_a_parallel_cli_run_in_bounded_time_and_keeps_the_finished_scenes(tmp_path, clean_demo):
    out, timeout = tmp_path / "stopped", 5
    code, stderr, seconds = _launch_demo_with_a_hung_rank(tmp_path, [*FAULTY_DEMO, "--out", str(out)], timeout)
    # Bounded: the collective timeout after the hang, plus writing the first window's scenes and stopping.
    assert code == 1 and seconds < timeout + 20, (code, seconds, stderr[-3000:])
    _assert_one_line_naming_the_first_window(stderr, out, "Rank 0 stopped in the ")
    assert "did not answer within the collective timeout" in stderr
    _assert_first_window_on_disk(out, clean_demo)


def test_a_rank_killed_under_torchrun_leaves_the_finished_scenes_and_one_line(tmp_path, clean_demo):
    """torchrun stops the other processes (SIGTERM) when one dies: rank 0 finishes the scene files it is writing,
    then ends with one line naming them (or, had it reached its next collective first, with the dead peer's)."""
    from test_parallel import RUN_TIMEOUT, _free_port

    out, logs = tmp_path / "stopped", tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3",
               str(REPO / "tests" / "faulty_rank.py"), "kill", str(tmp_path / "stamp"), "--", *FAULTY_DEMO,
               "--ulysses-degree", "2", "--collective-timeout", "60", "--out", str(out)]
    completed = subprocess.run(command, env=dict(_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                               timeout=RUN_TIMEOUT)
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert time.time() - float((tmp_path / "stamp").read_text()) < 30  # torchrun noticed at once
    rank0 = next(path for path in logs.rglob("stderr.log") if path.parent.name == "0").read_text()
    _assert_one_line_naming_the_first_window(rank0, out, "Stopped by SIGTERM: torchrun stops every process", "Rank 0 stopped")
    _assert_first_window_on_disk(out, clean_demo)


@pytest.mark.parametrize("command, style", [("demo", "5b"), ("demo", "1.5"), ("extend", "5b")])
def test_parallel_cli_runs_write_each_scene_where_the_output_folder_puts_it(command, style, tmp_path, monkeypatch):
    """The writer the CLI passes under the parallel options (forced here on one process) writes each new scene
    under its index in ``--out`` (``extend``: after the copied scenes), with the latents that the completed run's
    ``latents.safetensors`` holds, bit for bit (CogVideoX 1.5: without its filler frames); then the completed run
    removes those per-scene files."""
    from safetensors.torch import load_file as load_tensors

    import diffusers_mask2dit.finished_scenes as finished_scenes
    import diffusers_mask2dit.generate.scenes as scenes

    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    monkeypatch.setattr(scenes, "wants_parallel", lambda args: True)
    removed = []
    monkeypatch.setattr(finished_scenes, "remove_scene_latents", lambda folder: removed.append(folder))
    sampling = ["--steps", "1", "--frames", "9", "--scenes-per-window", "2"]
    prompts = ["--prompt", "a cat walks", "--prompt", "a dog runs"]
    if command == "demo":  # 3 scenes: a window of 2, then one by scene extension (generate_long)
        arguments, new = ["demo", "--random-weights", "--style", style, *sampling, *prompts, "--prompt", "a bird flies"], [0, 1, 2]
    else:  # 2 new scenes after the 2 of a folder written by `generate`
        first = tmp_path / "first"
        model = ["--model", save_tiny_cogvideox(str(tmp_path / "model"))]
        assert cli_main(["generate", *model, *sampling, *prompts, "--out", str(first)]) == 0
        arguments, new = ["extend", "--from", str(first), "--prompt", "a bird flies", "--prompt", "a fish swims"], [2, 3]
        removed.clear()
    out = tmp_path / "out"
    assert cli_main([*arguments, "--out", str(out)]) == 0
    assert removed == [str(out)]
    whole = load_tensors(str(out / "latents.safetensors"))["latents"][0]
    frames = whole.shape[0] // (new[-1] + 1)
    assert sorted(p.name for p in out.glob("scene_*.latents.safetensors")) == [f"scene_{i:02d}.latents.safetensors" for i in new]
    for index in new:
        scene = load_tensors(str(out / f"scene_{index:02d}.latents.safetensors"))["latents"]
        torch.testing.assert_close(scene, whole[index * frames : (index + 1) * frames], atol=0, rtol=0)
