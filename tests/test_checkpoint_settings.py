"""A checkpoint is scored with the settings it was trained with, or the command fails naming
every mismatch; a strategy file may move (same contents), and its source goes with the run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from titans_lightning.cli import TitansCLI

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_memory.py"


def fit_one_epoch(args: list[str], *extra: str) -> str:
    cli = TitansCLI(["fit", *args, "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "2", *extra])
    return cli.trainer.checkpoint_callback.last_model_path


@pytest.mark.parametrize("subcommand", ["test", "predict", "fit"])
def test_other_model_settings_than_the_checkpoints_are_refused_by_name(
        tiny_sinwave, in_tmp, subcommand):
    ckpt = fit_one_epoch(tiny_sinwave)
    with pytest.raises(ValueError) as info:
        TitansCLI([subcommand, *tiny_sinwave, "--ckpt_path", ckpt,
                   "--model.memory_scope", "per_sequence", "--model.strategy", "meta_nlms",
                   "--model.context_window", "5"])
    message = str(info.value)
    assert "model.memory_scope: checkpoint 'shared', this command 'per_sequence'" in message
    assert "model.strategy: checkpoint 'titans_default', this command 'meta_nlms'" in message
    assert "model.context_window: checkpoint 4, this command 5" in message


def test_scoring_may_change_the_evaluation_protocol_but_a_resume_may_not(tiny_sinwave, in_tmp):
    ckpt = fit_one_epoch(tiny_sinwave)
    cli = TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt,
                     "--model.eval_protocol", "reference"])
    assert cli.model.hparams.eval_protocol == "reference"  # the command line, not the checkpoint
    with pytest.raises(ValueError, match="model.eval_protocol: checkpoint 'default'"):
        TitansCLI(["fit", *tiny_sinwave, "--ckpt_path", ckpt,
                   "--model.eval_protocol", "reference"])


def test_a_checkpoint_of_other_data_is_refused(tiny_sinwave, in_tmp, config_args):
    ckpt = fit_one_epoch(tiny_sinwave)
    weather = [*config_args("weather.yaml"), "--model.dim_feedforward", "32",
               "--model.context_window", "4"]
    with pytest.raises(ValueError, match="model.input_dim: checkpoint 1, this data 5"):
        TitansCLI(["test", *weather, "--ckpt_path", ckpt])


def test_a_moved_strategy_file_with_the_same_contents_is_accepted(tiny_sinwave, in_tmp):
    rule = in_tmp / "rules" / "mine.py"
    rule.parent.mkdir()
    shutil.copy(EXAMPLE, rule)
    ckpt = fit_one_epoch(tiny_sinwave, "--model.strategy", str(rule))
    result = json.loads((Path(ckpt).parents[1] / "result.json").read_text())
    assert result["strategy_source"]["source"] == EXAMPLE.read_text()
    moved = in_tmp / "elsewhere.py"
    rule.rename(moved)

    with pytest.raises(ValueError, match="model.strategy: checkpoint '.*mine.py', this command "
                                         "'titans_default'"):
        TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt])  # the config's strategy
    cli = TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt, "--model.strategy", str(moved)])
    assert cli.model.hparams.strategy == str(moved)

    moved.write_text(moved.read_text() + "\n# edited\n")
    with pytest.raises(ValueError, match="other contents than the checkpoint's rule"):
        TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt, "--model.strategy", str(moved)])


def test_a_strategy_file_edited_in_place_is_refused(tiny_sinwave, in_tmp):
    rule = in_tmp / "mine.py"
    shutil.copy(EXAMPLE, rule)
    ckpt = fit_one_epoch(tiny_sinwave, "--model.strategy", str(rule))
    rule.write_text(rule.read_text() + "\n# edited\n")  # same path, another rule
    with pytest.raises(ValueError, match="other contents than the checkpoint's rule"):
        TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt, "--model.strategy", str(rule)])


@pytest.mark.parametrize("subcommand", ["fit", "test", "validate", "predict"])
def test_compiling_or_not_may_differ_from_the_checkpoint_for_every_command(subcommand):
    from titans_lightning.cli import checkpoint_mismatches
    saved = {"compile": "none", "memory_scope": "shared"}
    assert checkpoint_mismatches(saved, {"compile": "encoder", "memory_scope": "shared"},
                                 subcommand, None) == []
    assert checkpoint_mismatches(saved, {"compile": "encoder", "memory_scope": "per_sequence"},
                                 subcommand, None) == [
        "model.memory_scope: checkpoint 'shared', this command 'per_sequence'"]
