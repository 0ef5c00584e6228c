"""train.config: every flag written once (a `Config` field), the presets, --help, and the
one-line error of a bad flag. Nothing here imports jax or torch."""

from __future__ import annotations

import dataclasses

import pytest

from tests.cli_errors import assert_one_line_error
from train import config as config_lib
from train import eval as eval_tool


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps --help to the terminal, hyphens too


def help_text() -> str:
    return " ".join(config_lib.build_parser().format_help().split())


def test_no_flags_give_the_default_config():
    assert config_lib.parse_config([]) == config_lib.Config()


def test_every_config_field_is_a_flag_with_its_help():
    text = help_text()
    for field in dataclasses.fields(config_lib.Config):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert " ".join(field.metadata["help"].split()) in text, field.name


def test_help_shows_each_flags_default():
    text = help_text()
    for field in dataclasses.fields(config_lib.Config):
        assert f"(default: {field.default})" in text, field.name


def test_booleans_are_flag_pairs():
    assert config_lib.parse_config(["--no-progress", "--nesterov"]) == config_lib.Config(progress=False, nesterov=True)


@pytest.mark.parametrize("preset", sorted(config_lib.PRESETS))
def test_presets_set_config_fields_only(preset):
    assert set(config_lib.PRESETS[preset]) <= set(config_lib.FIELDS)


def test_a_preset_changes_the_defaults_and_a_flag_given_wins():
    config = config_lib.parse_config(["--preset", "v2-paper", "--lr", "0.1"])
    assert config == config_lib.Config(**{**config_lib.PRESETS["v2-paper"], "preset": "v2-paper", "lr": 0.1})


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "-1"], "expected a number > 0, got -1"),
        (["--arch", "v3"], "invalid choice: 'v3'"),
        (["--num-processes", "2"], "--num-processes and --process-id go together"),
        (["--head", "512,0"], "expected the hidden layers' units, comma-separated positive integers"),
        (["--head-activation", "gelu"], "applies to the hidden layers --head adds: give --head too"),
        (["--head-dropout", "0.2"], "--head-dropout applies to the layers after the first: give --head"),
    ],
    ids=["type", "choices", "static-check", "head-units", "head-activation-without-head", "head-dropout-without-head"],
)
def test_a_bad_flag_is_one_error_line_and_exit_2(capsys, flags, fragment):
    with pytest.raises(SystemExit) as exit_:
        config_lib.parse_config(flags)
    assert exit_.value.code == 2
    assert_one_line_error(capsys.readouterr().err, fragment, "(see --help)")


def test_head_reads_the_hidden_layers_units_first_to_last():
    assert config_lib.parse_config(["--head", "512,256"]).head == (512, 256)
    assert config_lib.parse_config(["--head", "none"]).head == ()


def test_eval_shares_train_mains_flags_where_they_mean_the_same():
    eval_help = " ".join(eval_tool.build_parser().format_help().split())
    for name in ("dataset", "data_dir", "resolution"):
        assert " ".join(config_lib.FIELDS[name].metadata["help"].split()) in eval_help, name


def test_eval_help_describes_the_tool_in_whole_sentences():
    description = eval_tool.build_parser().description
    assert "in either framework" in description and description.endswith("."), description
