"""``mask2dit hub push``: dry run without network, and the real path against a mocked ``HfApi``."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from diffusers_mask2dit.cli import main
from diffusers_mask2dit.hub.push import IGNORE_PATTERNS, PushError, plan_push, push_folder

SECRET = "hf_thisIsNotARealTokenButMustNeverBePrinted123"


@pytest.fixture
def folder(tmp_path) -> Path:
    """A minimal built folder (what `hub build` writes for a LoRA), plus a cache file that must not go up."""
    root = tmp_path / "built"
    root.mkdir()
    (root / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# card\n")
    (root / "pipeline.py").write_text('"""Mask²DiT custom pipeline for diffusers."""\n')
    (root / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 3000)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "pipeline.cpython-311.pyc").write_bytes(b"x")
    return root


@pytest.fixture(autouse=True)
def token_in_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_dry_run_lists_files_and_touches_no_network(folder, capsys):
    with mock.patch("huggingface_hub.HfApi", side_effect=AssertionError("no HfApi in a dry run")):
        assert main(["hub", "push", "--folder", str(folder), "--repo", "me/mask2dit-lora", "--dry-run",
                     "--private", "--revision", "v1"]) == 0
    out = capsys.readouterr()
    assert "Private model repo me/mask2dit-lora (branch v1): 3 files" in out.out
    for name in ("README.md", "pipeline.py", "pytorch_lora_weights.safetensors"):
        assert name in out.out
    assert "2.9 KiB" in out.out and "__pycache__" not in out.out
    assert "Dry run: nothing was uploaded." in out.out
    assert SECRET not in out.out + out.err


def test_push_calls_huggingface_hub(folder, capsys):
    api = mock.MagicMock()
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/m/commit/abc")
    with mock.patch("huggingface_hub.HfApi", return_value=api) as constructor:
        assert main(["hub", "push", "--folder", str(folder), "--repo", "me/m", "--revision", "dev", "--private",
                     "--commit-message", "first upload"]) == 0
    constructor.assert_called_once_with()  # the token comes from huggingface_hub's own login, not from us
    api.create_repo.assert_called_once_with("me/m", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with("me/m", branch="dev", repo_type="model", exist_ok=True)
    api.upload_folder.assert_called_once_with(
        folder_path=str(folder.resolve()), repo_id="me/m", repo_type="model", revision="dev",
        commit_message="first upload", ignore_patterns=IGNORE_PATTERNS,
    )
    out = capsys.readouterr()
    assert "Uploaded to me/m: https://huggingface.co/me/m/commit/abc" in out.out
    assert SECRET not in out.out + out.err
    for call in api.mock_calls:
        assert SECRET not in repr(call)


def test_push_to_main_public_creates_no_branch(folder):
    api = mock.MagicMock()
    push_folder(plan_push(folder, "me/m"), api=api)
    api.create_repo.assert_called_once_with("me/m", private=None, exist_ok=True, repo_type="model")
    api.create_branch.assert_not_called()
    assert api.upload_folder.call_args.kwargs["revision"] is None


def test_upload_failure_is_reported_without_the_token(folder, capsys):
    api = mock.MagicMock()
    api.create_repo.side_effect = RuntimeError("401 Client Error: Unauthorized")
    with mock.patch("huggingface_hub.HfApi", return_value=api):
        assert main(["hub", "push", "--folder", str(folder), "--repo", "me/m"]) == 1
    out = capsys.readouterr()
    assert "upload failed: RuntimeError: 401" in out.err and SECRET not in out.out + out.err


def test_push_checks_its_arguments(folder, tmp_path):
    with pytest.raises(PushError, match="owner/name"):
        plan_push(folder, "not-a-repo-id")
    with pytest.raises(PushError, match="not a folder"):
        plan_push(tmp_path / "missing", "me/m")
    (folder / "README.md").unlink()
    with pytest.raises(PushError, match="README.md"):
        plan_push(folder, "me/m")
