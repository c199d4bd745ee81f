"""Runs that cannot give a trustworthy result say so: non-zero exits, refusals, warnings, and no
half-made run folders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans_lightning.cli import TitansCLI, main

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_exits_non_zero_without_a_result(tiny_sinwave, in_tmp):
    callback = json.dumps({"class_path": "tests.kill_switch.KillAt",
                           "init_args": {"step": 3, "signal_name": "SIGTERM"}})
    run = subprocess.run(
        [sys.executable, "-m", "titans_lightning.cli", "fit", *tiny_sinwave,
         "--trainer.max_epochs", "3", f"--trainer.callbacks+={callback}"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert run.returncode == 143, run.stderr[-2000:]
    assert "stopped by SIGTERM" in run.stderr
    assert not list(in_tmp.glob("logs/*/version_*/result.json"))


def test_a_second_fit_into_an_explicit_version_folder_is_refused(tiny_sinwave, in_tmp):
    args = ["fit", *tiny_sinwave, "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
            "1", "--trainer.logger.init_args.version", "mine"]
    TitansCLI(args)
    result = in_tmp / "logs" / "sinwave" / "mine" / "result.json"
    first = result.read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        TitansCLI(args)
    assert result.read_text() == first


def test_fast_dev_run_finishes(tiny_sinwave, in_tmp, capsys):
    TitansCLI(["fit", *tiny_sinwave, "--trainer.fast_dev_run", "true"])
    assert "fast_dev_run, so no result.json" in capsys.readouterr().out


def test_scoring_without_a_checkpoint_warns(tiny_sinwave, in_tmp):
    with pytest.warns(UserWarning, match="without --ckpt_path scores an untrained model"):
        TitansCLI(["test", *tiny_sinwave, "--trainer.limit_test_batches", "1"])


def test_a_failed_setup_leaves_no_empty_run_folder(tiny_sinwave, in_tmp):
    with pytest.raises(Exception):
        main(["fit", "--config", str(REPO / "configs" / "weather.yaml"),
              "--data.init_args.data_dir", str(in_tmp / "nowhere"),
              "--trainer.enable_progress_bar", "false"])
    assert not list(in_tmp.glob("logs/*/version_*"))


def disk_full_in_torch_save(monkeypatch):
    """Writing last.ckpt stops halfway (Lightning's writer serialises to memory first: its
    files are then written whole, so this fault needs the writer that streams to the file)."""
    real_save = torch.save

    def save(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        if "last.ckpt" in str(getattr(file, "name", "")):
            file.truncate(1000)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def disk_full_in_the_move(monkeypatch):
    """A file staged on another filesystem is copied into last.ckpt: the copy stops halfway."""
    real_move = shutil.move

    def move(source, target, *args, **kwargs):
        if not str(target).endswith("last.ckpt"):
            return real_move(source, target, *args, **kwargs)
        Path(target).write_bytes(Path(source).read_bytes()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "move", move)


@pytest.mark.parametrize("fault", [disk_full_in_torch_save, disk_full_in_the_move])
def test_a_checkpoint_write_that_fails_midway_keeps_a_whole_last_checkpoint(
        tiny_sinwave, in_tmp, monkeypatch, fault):
    """Whichever way a checkpoint writer fails in the middle of last.ckpt, the file is whole
    afterwards: the one before (the fault fired) or the new one (this writer never takes the
    faulty path, as with the move: it renames beside the target)."""
    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1"])
    last = Path(cli.trainer.checkpoint_callback.last_model_path).resolve()
    good = last.read_bytes()
    with monkeypatch.context() as patch:
        fault(patch)
        try:
            TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2", "--ckpt_path",
                       str(last)])
            failed = False
        except OSError as error:
            assert "No space left" in str(error)
            failed = True
    if fault is disk_full_in_torch_save:
        assert failed  # the package's writer streams to the file, so the fault fires
    epoch = torch.load(last, weights_only=True)["epoch"]  # whole, whichever it is
    if failed:
        assert last.read_bytes() == good and epoch == 0
    else:
        assert epoch == 1
    assert not list(last.parent.glob(".*.partial"))


def test_a_bad_setting_is_reported_first_not_after_the_traceback(tiny_sinwave, in_tmp):
    run = subprocess.run(
        [sys.executable, "-m", "titans_lightning.cli", "fit", *tiny_sinwave,
         "--model.nhead", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1
    first = next(line for line in run.stderr.splitlines() if line.startswith("titans: "))
    assert first == ("titans: error: --model.nhead=3 is not allowed: it must be a divisor of "
                     "--model.hidden_dim=16: [1, 2, 4, 8, 16]")
    assert run.stderr.index(first) < run.stderr.index("Traceback")
