"""``mask2dit prepare-data`` on Shapes films (known cuts and relevance): exact cuts, exact clips, the relevance
filter, resume, and loading the output in the trainer."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("scenedetect")
pytest.importorskip("cv2")

from diffusers_mask2dit.data import DetectOptions, PrepareOptions, prepare_data  # noqa: E402
from diffusers_mask2dit.shapes import films, world  # noqa: E402
from diffusers_mask2dit.video_io import read_video  # noqa: E402

NUM_FILMS, NUM_SHOTS = 4, 6
SEPARATING_THRESHOLD = 0.6  # between the related (>= 0.667) and unrelated (<= 0.556) groups, see shapes/films.py
ENCODER = "diffusers_mask2dit.shapes.films:encoder"
CAPTIONER = "diffusers_mask2dit.shapes.films:captioner"


def films_options(**overrides) -> PrepareOptions:
    values = dict(num_scenes=3, min_similarity=SEPARATING_THRESHOLD, detect=DetectOptions(threshold=4.0, min_shot_frames=8),
                  num_frames=9, height=48, width=48, encoder=ENCODER, captioner=CAPTIONER, progress=False)
    values.update(overrides)
    return PrepareOptions(**values)


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    videos = str(root / "films")
    films.write_films(videos, NUM_FILMS, NUM_SHOTS, unrelated_fraction=0.4, seed=3, progress=False)
    out = str(root / "out")
    report = prepare_data(videos, out, films_options())
    return {"root": root, "videos": videos, "out": out, "report": report, "truth": films.read_truth(videos)}


def test_every_cut_is_found_at_its_frame(prepared):
    shots = read_jsonl(os.path.join(prepared["out"], "shots.jsonl"))
    for name, truth in prepared["truth"].items():
        mine = [s for s in shots if os.path.basename(s["video"]) == name]
        assert [s["start_frame"] for s in mine[1:]] == truth["cuts"], name
        assert [(s["start_frame"], s["end_frame"]) for s in mine] == [(t["start_frame"], t["end_frame"]) for t in truth["shots"]]
    assert prepared["report"]["shots"]["found"] == NUM_FILMS * NUM_SHOTS


def test_clips_are_the_worlds_exact_renders_with_their_prompts(prepared):
    shots = read_jsonl(os.path.join(prepared["out"], "shots.jsonl"))
    for shot in shots:
        truth = prepared["truth"][os.path.basename(shot["video"])]["shots"][shot["shot"]]
        scene = world.Scene(truth["background"], truth["colour"], truth["shape"], truth["direction"], tuple(truth["start"]))
        assert np.array_equal(read_video(os.path.join(prepared["out"], shot["clip"])), world.render_scene(scene, world.FRAMES))
        assert shot["caption"] == truth["prompt"]


def test_the_filter_keeps_exactly_the_groups_without_an_unrelated_shot(prepared):
    kept = {(os.path.basename(g["source"]), g["first_shot"]) for g in read_jsonl(os.path.join(prepared["out"], "sft.jsonl"))}
    related_count = 0
    for name, truth in prepared["truth"].items():
        starts = list(range(NUM_SHOTS - 2))
        for start, related in zip(starts, films.related_groups(truth, starts, 3)):
            assert ((name, start) in kept) == related, (name, start)
            related_count += related
    groups = prepared["report"]["groups"]
    assert groups["kept"] == related_count and 0 < related_count < groups["total"]  # both populations present
    with open(os.path.join(prepared["out"], "sft.json"), encoding="utf-8") as handle:
        assert len(json.load(handle)) == related_count
    assert os.path.isfile(os.path.join(prepared["out"], "similarity_histogram.png"))
    assert os.path.isfile(os.path.join(prepared["out"], "groups_contact_sheet.png"))


def test_rerun_skips_finished_videos_and_regroups_at_a_new_threshold(prepared, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(prepared["out"], out)
    before = {name: os.path.getmtime(os.path.join(out, "videos", name)) for name in os.listdir(os.path.join(out, "videos"))}
    report = prepare_data(prepared["videos"], out, films_options(min_similarity=0.0))
    assert report["videos"]["resumed"] == NUM_FILMS
    assert before == {name: os.path.getmtime(os.path.join(out, "videos", name)) for name in before}
    assert report["groups"]["kept"] == report["groups"]["total"] == NUM_FILMS * (NUM_SHOTS - 2)
    with pytest.raises(ValueError, match="num_frames"):
        prepare_data(prepared["videos"], out, films_options(num_frames=17))


def test_pretrain_and_sft_files_load_in_the_trainer(prepared):
    from diffusers_mask2dit.training.data import load_training_records

    sft = load_training_records(os.path.join(prepared["out"], "sft.json"), "sft", 3, [9])
    jsonl = load_training_records(os.path.join(prepared["out"], "sft.jsonl"), "sft", 3, [9])
    pretrain = load_training_records(os.path.join(prepared["out"], "pretrain.csv"), "pretrain", 3, [9])
    assert len(sft) == len(jsonl) == prepared["report"]["groups"]["kept"]
    assert [c.caption for c in sft[0]] == [c.caption for c in jsonl[0]]
    assert len(pretrain) == NUM_FILMS * NUM_SHOTS
    assert all(os.path.isfile(clip.video) for record in sft for clip in record)


def test_output_trains_unchanged(prepared, tmp_path):
    """A smoke run of ``mask2dit train`` on the folder as written (tiny model, resized clips)."""
    from accelerate.state import AcceleratorState

    from diffusers_mask2dit.cli import main as cli_main
    from diffusers_mask2dit.tiny import save_tiny_cogvideox

    out = str(tmp_path / "tiny_data")
    prepare_data(prepared["videos"], out, films_options(num_scenes=2, height=64, width=64))
    model = save_tiny_cogvideox(str(tmp_path / "model"))
    config = {"pretrained_model_name_or_path": model, "data_file": os.path.join(out, "sft.json"), "stage": "sft",
              "num_scenes": 2, "frames_per_scene": [9], "height": 64, "width": 64, "mixed_precision": "no",
              "report_to": "none", "checkpointing_steps": 0, "train_batch_size": 1, "max_train_steps": 1,
              "output_dir": str(tmp_path / "train")}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    try:
        assert cli_main(["train", "--config", str(path)]) == 0
    finally:
        AcceleratorState._reset_state()
    assert os.listdir(tmp_path / "train")


@pytest.mark.slow
def test_table3_script_smoke(tmp_path):
    """The Table 3 script end to end on 2 films, 1 SFT step per threshold and 2 held-out samples (the real run is
    hours of CPU and runs in the background, never in CI)."""
    from accelerate.state import AcceleratorState

    from diffusers_mask2dit.shapes import films_table
    from diffusers_mask2dit.shapes.retrain import Recipe

    try:
        text = films_table.films_table(str(tmp_path / "run"), thresholds=(0.0, 0.6), steps=1, num_samples=2, batch_size=2,
                                       num_films=2, in_process=True, recipe=Recipe.smoke())
    finally:
        AcceleratorState._reset_state()
    table = json.load(open(tmp_path / "run" / "table.json", encoding="utf-8"))
    assert sorted(table["rows"]) == ["t0.0", "t0.6"] and table["missing"] == []
    kept = {name: row["groups"]["kept"] for name, row in table["rows"].items()}
    assert kept["t0.0"] == table["rows"]["t0.0"]["groups"]["total"] >= kept["t0.6"]
    assert "| 0.0 |" in text and "| 0.6 |" in text
    assert os.path.islink(tmp_path / "run" / "cache" / "t0.6" / "latents")  # one encoding of the clips for all sets
    for name in ("t0.0", "t0.6"):  # a contact sheet per row: 4 samples x 3 scenes, one labelled line each
        assert Image.open(tmp_path / "run" / "sheets" / f"{name}.png").size[1] > 12 * 96
