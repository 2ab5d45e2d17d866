"""`mask2dit generate / extend / demo` and the example scripts, on tiny random models (offline)."""

import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_mask2dit import cli
from diffusers_mask2dit.tiny import save_tiny_cogvideox
from diffusers_mask2dit.video_io import read_video

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY_ARGS = ["--steps", "2", "--height", "64", "--width", "64", "--frames", "9", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny") / "model")


def assert_outputs(folder, prompts, frames_per_scene=9, size=64):
    """The files `mask2dit evaluate` reads: video.mp4, scene_XX.mp4, contact_sheet.png, prompts.txt."""
    names = sorted(os.listdir(folder))
    scene_names = [f"scene_{i:02d}.mp4" for i in range(len(prompts))]
    assert names == sorted(["video.mp4", "contact_sheet.png", "prompts.txt"] + scene_names)
    with open(os.path.join(folder, "prompts.txt"), encoding="utf-8") as handle:
        assert handle.read().splitlines() == prompts
    for name in scene_names:
        assert read_video(os.path.join(folder, name)).shape == (frames_per_scene, size, size, 3)
    assert read_video(os.path.join(folder, "video.mp4")).shape[0] == frames_per_scene * len(prompts)
    assert Image.open(os.path.join(folder, "contact_sheet.png")).size[1] == (96 + 2 * 2) * len(prompts)  # one row per scene, 2-px margins


def test_commands_are_registered():
    parser = cli.build_parser()
    for command in ("generate", "extend", "demo"):
        args = parser.parse_args([command, "--out", "x"] + (["--from", "y"] if command == "extend" else []))
        assert callable(args.func)


def test_demo_runs_multiscene_and_extension_offline(tmp_path, capsys):
    assert cli.main(["demo", "--random-weights", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM" in printed and "not quality" in printed and "extended" in printed
    from diffusers_mask2dit.generation_cli import DEMO_PROMPTS

    assert_outputs(tmp_path / "demo", DEMO_PROMPTS)


def test_generate_then_extend(model, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a dog runs through the grass\n\n")
    out = tmp_path / "out"
    status = cli.main(["generate", "--model", model, "--prompt", "a cat walks on the beach", "--prompts-file",
                       str(prompts_file), "--out", str(out), "--seed", "3", "--guidance", "1.0"] + TINY_ARGS)
    assert status == 0
    assert_outputs(out, ["a cat walks on the beach", "a dog runs through the grass"])

    extended = tmp_path / "extended"
    status = cli.main(["extend", "--model", model, "--from", str(out), "--prompt", "a bird flies over the sea",
                       "--out", str(extended), "--context-scenes", "2", "--steps", "2", "--device", "cpu"])
    assert status == 0
    assert_outputs(extended, ["a cat walks on the beach", "a dog runs through the grass", "a bird flies over the sea"])
    # earlier scenes are carried over as they were
    before, after = read_video(str(out / "scene_01.mp4")), read_video(str(extended / "scene_01.mp4"))
    assert np.abs(before.astype(int) - after.astype(int)).mean() < 3


def test_generate_uses_extension_beyond_the_window(model, tmp_path):
    prompts = [f"scene number {i}" for i in range(3)]
    args = ["generate", "--model", model, "--out", str(tmp_path), "--scenes-per-window", "2"]
    assert cli.main(args + sum([["--prompt", p] for p in prompts], []) + TINY_ARGS) == 0
    assert_outputs(tmp_path, prompts)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "a cat", "--frames", "12"], "`num_frames` must be"),
        ([], "No prompts"),
        (["--prompt", "a cat", "--mask", "v4"], "scene_mask"),
        (["--prompt", "a cat", "--height", "72"], "`height` must be a positive multiple of 16"),
    ],
)
def test_generate_bad_input_exits_2_with_a_message(model, tmp_path, capsys, extra, message):
    assert cli.main(["generate", "--model", model, "--out", str(tmp_path), "--steps", "1", "--device", "cpu"] + extra) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "video.mp4")


def test_extend_needs_a_generate_folder(model, tmp_path, capsys):
    assert cli.main(["extend", "--model", model, "--from", str(tmp_path / "missing"), "--prompt", "x",
                     "--out", str(tmp_path / "o")]) == 2
    assert "`--from`" in capsys.readouterr().err


@pytest.mark.parametrize("script, scenes", [("generate_multiscene.py", 3), ("extend_scenes.py", 5)])
def test_example_scripts_run_on_a_local_model(model, tmp_path, monkeypatch, script, scenes):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [script, "--model", model, "--out", str(out)] + TINY_ARGS)
    runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")
    with open(out / "prompts.txt", encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) == scenes
    assert read_video(str(out / "video.mp4")).shape == (9 * scenes, 64, 64, 3)
