"""Training options: booleans parsed properly, config files and flags, clear errors for bad values."""

from __future__ import annotations

import json

import pytest

from diffusers_mask2dit.training.config import TrainingConfig, add_config_arguments, config_from_args, parse_bool


def _parse(argv, defaults=None):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, defaults)
    return config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), ("0", False), ("no", False), ("True", True), ("1", True), ("yes", True)])
def test_parse_bool_reads_words_not_truthiness(text, expected):
    assert parse_bool(text, "flag") is expected


def test_parse_bool_rejects_other_values_naming_the_option():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        parse_bool("maybe", "gradient_checkpointing")


def test_boolean_flag_false_is_false():
    # The authors parsed booleans with type=bool, so "False" meant True.
    assert _parse(["--gradient_checkpointing", "False"]).gradient_checkpointing is False
    assert _parse(["--use_8bit_adam", "true"]).use_8bit_adam is True


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("stage: pretrain\nlearning_rate: 2.0e-5\nframes_per_scene: [9, 17]\nnum_scenes: 2\ngradient_checkpointing: 'False'\n")
    config = _parse(["--config", str(yaml_path), "--learning_rate", "3e-5"])
    assert config.stage == "pretrain"
    assert config.learning_rate == 3e-5
    assert config.scene_frames == [9, 17]
    assert config.gradient_checkpointing is False
    assert config.max_train_steps == TrainingConfig().max_train_steps

    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"finetune": "full", "validation_prompts": [["a", "b", "c"], "x | y | z"]}))
    config = _parse(["--config", str(json_path)])
    assert config.finetune == "full" and config.effective_learning_rate == 1e-5
    assert config.validation_prompts == [["a", "b", "c"], ["x", "y", "z"]]

    toml_path = tmp_path / "run.toml"
    toml_path.write_text('finetune = "lora"\nlora_rank = 16\nlora_alpha = 32\n')
    config = _parse(["--config", str(toml_path)])
    assert (config.lora_rank, config.lora_alpha) == (16, 32.0)


def test_unknown_option_in_file_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"learning_rat": 1e-4}))
    with pytest.raises(ValueError, match="learning_rat.*learning_rate"):
        _parse(["--config", str(path)])


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"frames_per_scene": [48]}, "frames_per_scene"),
        ({"frames_per_scene": [9, 9]}, "frames_per_scene"),  # 3 scenes by default
        ({"height": 100}, "height"),
        ({"stage": "finetune"}, "stage"),
        ({"finetune": "qlora"}, "finetune"),
        ({"cond_prob": 1.5}, "cond_prob"),
        ({"mask_variant": "v4"}, "mask"),
        ({"validation_prompts": [["only one scene"]]}, "validation_prompts"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ],
)
def test_bad_values_raise_naming_the_option(overrides, name):
    with pytest.raises(ValueError, match=name):
        TrainingConfig(**overrides)


def test_unequal_scene_lengths_are_allowed():
    config = TrainingConfig(num_scenes=3, frames_per_scene=[49, 25, 9])
    assert config.scene_frames == [49, 25, 9]


def test_pretraining_has_no_conditional_samples():
    assert TrainingConfig(stage="pretrain", cond_prob=0.5).effective_cond_prob == 0.0
    assert TrainingConfig(stage="sft", cond_prob=0.3).effective_cond_prob == 0.3


def test_mask2dit_cli_has_train_and_precompute(tmp_path):
    from diffusers_mask2dit.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--stage", "pretrain", "--lora_target_modules", "to_q", "to_v"])
    assert args.func.__name__ == "run_train"
    assert config_from_args(args).lora_target_modules == ["to_q", "to_v"]
    args = parser.parse_args(["precompute", "--cache_dir", str(tmp_path)])
    assert args.func.__name__ == "run_precompute"


def test_train_flags_are_dashed_with_underscore_aliases():
    from diffusers_mask2dit.cli import build_parser

    parser = build_parser()
    dashed = parser.parse_args(["train", "--cond-prob", "0.3", "--lora-target-modules", "to_q", "--max-train-steps", "5"])
    underscored = parser.parse_args(["train", "--cond_prob", "0.3", "--lora_target_modules", "to_q", "--max_train_steps", "5"])
    assert config_from_args(dashed) == config_from_args(underscored)
    assert config_from_args(dashed).cond_prob == 0.3 and config_from_args(dashed).max_train_steps == 5


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    from diffusers_mask2dit.cli import main

    assert main(["train", "--frames_per_scene", "48"]) == 2
    assert "frames_per_scene" in capsys.readouterr().err
