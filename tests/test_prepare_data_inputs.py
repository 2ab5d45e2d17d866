"""``mask2dit prepare-data`` inputs: bad videos, one-shot videos, chapters, caption sources, bad options."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("scenedetect")
pytest.importorskip("cv2")

from diffusers_mask2dit.cli import main as cli_main  # noqa: E402
from diffusers_mask2dit.shapes import films, world  # noqa: E402
from test_prepare_data import read_jsonl  # noqa: E402

FILM_ARGS = ["--num-frames", "9", "--height", "48", "--width", "48", "--threshold", "4", "--min-detect-frames", "8",
             "--no-progress"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two films (one of a single shot), an undecodable file and an empty file."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "videos"
    films.write_films(str(folder), 1, 4, unrelated_fraction=0.0, seed=5, progress=False)
    single = films.sample_film(world.scene_rng(9, 0), 1, 0.0)[0]
    world.write_lossless_mp4(world.render_scene(single["scene"], single["frames"]), str(folder / "single.mp4"))
    (folder / "broken.mp4").write_bytes(os.urandom(2048))
    (folder / "empty.mp4").write_bytes(b"")
    os.remove(folder / "truth.jsonl")
    return {"root": root, "folder": str(folder)}


def run(argv, capsys):
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_videos_are_skipped_with_a_counted_warning_and_the_rest_is_kept(videos, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, stdout, stderr = run(["prepare-data", "--videos", videos["folder"], "--out", out, *FILM_ARGS], capsys)
    assert code == 0, stderr
    report = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    assert report["videos"]["read"] == 2 and sum(report["videos"]["skipped"].values()) == 2
    skipped_names = sorted(os.path.basename(n) for names in report["videos"]["skipped_names"].values() for n in names)
    assert skipped_names == ["broken.mp4", "empty.mp4"]
    assert "broken.mp4" in stderr and "empty.mp4" in stderr and "Traceback" not in stderr
    assert report["videos"]["fewer_shots_than_num_scenes"] == 1  # single.mp4: one shot, no group
    assert report["shots"]["with_clip"] == 5 and report["groups"]["total"] == 2
    # No captioner: captions empty, the report and the command say so.
    assert report["captions"]["empty"] == 5 and report["notes"] and "no caption" in stdout
    # The rerun keeps the finished videos and still skips the bad ones.
    code, _, stderr = run(["prepare-data", "--videos", videos["folder"], "--out", out, *FILM_ARGS], capsys)
    report = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    assert code == 0 and report["videos"]["resumed"] == 2 and "broken.mp4" in stderr


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--encoder", "/no/such/clip-folder"], "--encoder"),
        (["--captioner", "/no/such/captioner"], "--captioner"),
        (["--captioner", "cmd:echo without-placeholder"], "{clip}"),
        (["--num-frames", "10"], "--num-frames"),
        (["--min-similarity", "2"], "--min-similarity"),
        (["--detector", "magic"], "--detector"),
        (["--chapters", "/no/such/chapters.json"], "--chapters"),
    ],
)
def test_bad_options_are_one_line_errors(videos, tmp_path, capsys, extra, expected):
    code, _, stderr = run(["prepare-data", "--videos", videos["folder"], "--out", str(tmp_path / "out"), *extra], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("mask2dit prepare-data: error:") and expected in stderr
    assert not os.path.exists(tmp_path / "out")  # nothing written before the options are checked


def test_missing_videos_folder_is_a_one_line_error(tmp_path, capsys):
    code, _, stderr = run(["prepare-data", "--videos", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--videos" in stderr and stderr.count("\n") == 1


def test_chapters_replace_detection_and_unknown_ids_are_counted(tmp_path, capsys):
    folder = tmp_path / "videos"
    truth_path = films.write_films(str(folder), 1, 4, unrelated_fraction=0.0, seed=7, progress=False)
    truth = next(iter(films.read_truth(str(folder)).values()))
    # Chapters at every other cut: two chapters of two shots each (8 fps, so frame / 8 s).
    starts = [truth["shots"][0]["start_frame"], truth["shots"][2]["start_frame"]]
    chapters = {"film_00000": {"duration": truth["shots"][-1]["end_frame"] / world.FPS,
                               "chapters": [{"time": s / world.FPS, "label": f"part {i}"} for i, s in enumerate(starts)]},
                "not_a_video": {"chapters": [{"time": 0, "label": "x"}]}}
    chapter_file = tmp_path / "chapters.json"
    chapter_file.write_text(json.dumps(chapters))
    os.remove(truth_path)
    out = str(tmp_path / "out")
    code, _, stderr = run(["prepare-data", "--videos", str(folder), "--out", out, "--chapters", str(chapter_file),
                           "--title-prefix", "--captioner", "cmd:echo a shot {clip}", "--num-scenes", "2",
                           *FILM_ARGS], capsys)
    assert code == 0, stderr
    assert "1 video(s) not among --videos" in stderr and "not_a_video" in stderr
    shots = read_jsonl(os.path.join(out, "shots.jsonl"))
    assert [(s["start_frame"], s["end_frame"]) for s in shots] == [(starts[0], starts[1]), (starts[1], truth["shots"][-1]["end_frame"])]
    assert all(s["shots_from"] == "chapters" for s in shots)
    assert shots[1]["caption"].startswith("part 1. a shot ")
    report = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    assert report["chapters_without_video"] == ["not_a_video"]


def test_caption_file_and_command_captioner(tmp_path, capsys):
    folder = tmp_path / "videos"
    films.write_films(str(folder), 1, 3, unrelated_fraction=0.0, seed=11, progress=False)
    os.remove(folder / "truth.jsonl")
    first = str(tmp_path / "first")
    assert run(["prepare-data", "--videos", str(folder), "--out", first, *FILM_ARGS], capsys)[0] == 0
    shots = read_jsonl(os.path.join(first, "shots.jsonl"))
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({**s, "caption": f"caption {i}"}) + "\n" for i, s in enumerate(shots)))
    second = str(tmp_path / "second")
    assert run(["prepare-data", "--videos", str(folder), "--out", second, "--captions", str(captions), *FILM_ARGS], capsys)[0] == 0
    assert [s["caption"] for s in read_jsonl(os.path.join(second, "shots.jsonl"))] == ["caption 0", "caption 1", "caption 2"]
    third = str(tmp_path / "third")
    code, _, stderr = run(["prepare-data", "--videos", str(folder), "--out", third, "--captioner", "cmd:echo shot {clip}",
                           *FILM_ARGS], capsys)
    assert code == 0, stderr
    for shot in read_jsonl(os.path.join(third, "shots.jsonl")):
        assert shot["caption"] == f"shot {os.path.join(third, shot['clip'])}"


def test_a_clip_folder_is_an_encoder(tmp_path, capsys):
    from diffusers_mask2dit.evaluation.encoders import save_tiny_clip

    folder = tmp_path / "videos"
    films.write_films(str(folder), 1, 4, unrelated_fraction=0.5, seed=13, progress=False)
    os.remove(folder / "truth.jsonl")
    clip = save_tiny_clip(str(tmp_path / "clip"))
    out = str(tmp_path / "out")
    code, _, stderr = run(["prepare-data", "--videos", str(folder), "--out", out, "--encoder", clip, "--min-similarity", "-1",
                           *FILM_ARGS], capsys)
    assert code == 0, stderr
    groups = read_jsonl(os.path.join(out, "sft.jsonl"))
    assert len(groups) == 2 and all(-1.0 <= g["relevance"] <= 1.0 for g in groups)
    report = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    assert sum(report["similarity_histogram"]["counts"]) == 2


def test_grouping_and_clip_frames():
    from diffusers_mask2dit.data.grouping import cosine_matrix, group_relevance, group_starts
    from diffusers_mask2dit.data.shots import clip_indices

    assert group_starts(7, 3, "sliding") == [0, 1, 2, 3, 4]
    assert group_starts(7, 3, "disjoint") == [0, 3]
    assert group_starts(2, 3, "sliding") == []
    similarity = cosine_matrix(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert group_relevance(similarity, 0, 3) == pytest.approx(1 / 3)
    assert clip_indices(10, 27, 9, 3).tolist() == list(range(10, 27, 2))  # 17 frames: stride 2 covers the shot
    assert clip_indices(0, 100, 9, 3).tolist() == list(range(37, 62, 3))  # long shot: stride 3, 25-frame window centred
    assert clip_indices(0, 8, 9, 3) is None  # shorter than a clip


def _tiny_captioner(folder):
    """A tiny random BLIP captioning model with its processor (a BERT tokenizer over a few world words), offline."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "moves", "left", "green", "background"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(words) + "\n")
    tokenizer = BertTokenizer(os.path.join(folder, "vocab.txt"))
    tokenizer.bos_token = "[CLS]"  # where BLIP's text decoder starts
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), max_position_embeddings=32, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                         eos_token_id=3, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return str(folder), words


def test_a_captioning_model_folder_is_a_captioner(tmp_path, capsys):
    """`--captioner <folder>`: a transformers captioning model (here a tiny random BLIP) captions every shot."""
    model, words = _tiny_captioner(tmp_path / "blip")
    folder = tmp_path / "videos"
    films.write_films(str(folder), 1, 3, unrelated_fraction=0.0, seed=11, progress=False)
    os.remove(folder / "truth.jsonl")
    out = str(tmp_path / "out")
    code, _, stderr = run(["prepare-data", "--videos", str(folder), "--out", out, "--captioner", model, *FILM_ARGS], capsys)
    assert code == 0, stderr
    captions = [shot["caption"] for shot in read_jsonl(os.path.join(out, "shots.jsonl"))]
    assert len(captions) == 3 and all(captions), captions
    assert all(word in words for caption in captions for word in caption.split())  # the model's own tokens
