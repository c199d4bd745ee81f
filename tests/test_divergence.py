"""A run whose outer model diverges fails loudly, before saving NaN weights as best or last."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from titans_lightning.cli import TitansCLI
from titans_lightning.results import write_result


def test_a_nan_training_loss_stops_the_run_naming_the_likely_cause(tiny_sinwave, in_tmp):
    with pytest.raises(FloatingPointError) as info:  # theta 50: huge but finite fast weights
        TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2",
                   "--model.strategy_options", '{"theta": 50}'])
    message = str(info.value)
    assert "training loss became NaN or infinite at step" in message
    assert "'theta': 50" in message and "smaller step size" in message
    assert not list(in_tmp.glob("logs/sinwave/version_*/checkpoints/*.ckpt"))
    assert not list(in_tmp.glob("logs/sinwave/version_*/result.json"))


def test_result_files_are_strict_json_with_a_status(tmp_path):
    path = write_result(tmp_path, {"test_mse": float("nan"), "val_mse": 0.5,
                                   "config": {"clip": float("inf")}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert record == {"status": "nonfinite", "test_mse": None, "val_mse": 0.5,
                      "config": {"clip": "inf"}}
    # an infinite option (no clipping, say) is not a failed run
    ok = write_result(tmp_path, {"test_mse": 0.1, "config": {"clip": float("inf")}})
    assert json.loads(ok.read_text())["status"] == "ok"


NAN_RULE = '''
from titans_lightning.strategies.titans_default import (
    init_memory_state, compute_keys_values, compute_surprise, apply_update as default_update)


def apply_update(memory, grads, surprise):
    return {n: w * float("nan") for n, w in default_update(memory, grads, surprise).items()}
'''


def test_a_fit_whose_every_memory_update_was_skipped_says_so(tiny_sinwave, in_tmp, capsys):
    rule = in_tmp / "nan_rule.py"
    rule.write_text(NAN_RULE)
    with pytest.warns(RuntimeWarning, match="EVERY memory update of this fit was skipped"):
        cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1",
                         "--trainer.limit_train_batches", "2", "--model.strategy", str(rule)])
    result = json.loads((Path(cli.trainer.log_dir) / "result.json").read_text())
    fit, test = result["memory_updates"]["fit"], result["memory_updates"]["test"]
    assert fit["updates"] == fit["skipped_slots"] > 0  # two layers, train and validation
    assert test["updates"] == test["skipped_slots"] > 0
    assert f"memory updates in the fit: {fit['updates']}, slots skipped: {fit['updates']}" in \
        capsys.readouterr().out
