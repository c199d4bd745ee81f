"""RunCSVLogger: metrics.csv in a folder that other writers share, kept across runs into it."""
from __future__ import annotations

import warnings

import pandas as pd
import torch

from callbacks import RunCSVLogger


def test_it_appends_to_the_folders_metrics_and_widens_the_header(tmp_path):
    folder = tmp_path / "tiny" / "version_0"
    folder.mkdir(parents=True)
    (folder / "events.out.tfevents.0").write_text("")  # TensorBoard's, there first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's CSVLogger warns that the folder is not empty
        first = RunCSVLogger(str(tmp_path), name="tiny", version=0)
        first.log_metrics({"val/mse": torch.tensor(0.5), "epoch": 0}, step=2)
        first.log_metrics({"train/loss": 0.25, "epoch": 0}, step=2)
        first.finalize("success")
        # a later run into the same folder (a resumed fit, `titans test`), with a new column
        later = RunCSVLogger(str(tmp_path), name="tiny", version=0)
        later.log_metrics({"test/mse": 0.125, "epoch": 0}, step=2)
        later.save()

    table = pd.read_csv(folder / "metrics.csv")
    assert list(table.columns) == ["epoch", "step", "test/mse", "train/loss", "val/mse"]
    assert table["step"].tolist() == [2, 2, 2]
    assert table["val/mse"].tolist()[0] == 0.5 and table["val/mse"].isna().tolist()[1:] == [
        True, True]
    assert table["train/loss"].dropna().tolist() == [0.25]
    assert table["test/mse"].dropna().tolist() == [0.125]
    assert (folder / "events.out.tfevents.0").exists()


def test_rows_without_a_new_column_are_appended(tmp_path):
    logger = RunCSVLogger(str(tmp_path), name="", version="run")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    logger.log_metrics({"a": 2.0}, step=1)
    logger.log_metrics({}, step=2)
    logger.save()
    table = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert table["a"].tolist()[:2] == [1.0, 2.0] and table["step"].tolist() == [0, 1, 2]


def test_hyperparameters_are_written_beside_the_metrics(tmp_path):
    logger = RunCSVLogger(str(tmp_path), name="tiny")
    logger.log_hyperparams({"strategy": "titans_default", "lr": 0.001})
    assert "strategy: titans_default" in (tmp_path / "tiny" / "version_0" /
                                          "hparams.yaml").read_text()


def test_a_later_run_into_the_folder_keeps_its_hyperparameters(tmp_path):
    """`titans test` of a run's checkpoint with eval_protocol reference must not make the run's
    hparams.yaml say that it was trained with it."""
    run = RunCSVLogger(str(tmp_path), name="tiny", version=0)
    run.log_hyperparams({"eval_protocol": "default"})
    run.log_hyperparams({"lr": 0.001})  # the same logger adds to its own file
    saved = (tmp_path / "tiny" / "version_0" / "hparams.yaml").read_text()
    assert "eval_protocol: default" in saved and "lr: 0.001" in saved
    test = RunCSVLogger(str(tmp_path), name="tiny", version=0)
    test.log_hyperparams({"eval_protocol": "reference"})
    assert (tmp_path / "tiny" / "version_0" / "hparams.yaml").read_text() == saved
