"""The base config chooses the memory and forecast callbacks and both loggers for every shipped
config; a tiny `titans fit` logs them into one run folder, which `titans test` then adds to."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from titans_lightning.cli import BASE_CONFIG, TitansCLI, main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CALLBACKS = ["callbacks.surprise_statistics.SurpriseStatistics", "callbacks.gate_rate.GateRate",
             "callbacks.memory_health.MemoryHealth", "callbacks.memory_profile.MemoryProfile",
             "callbacks.custom_scalars.CustomScalars",
             "callbacks.forecast_figure.ForecastFigure"]
LOGGERS = ["lightning.pytorch.loggers.TensorBoardLogger", "callbacks.csv_logger.RunCSVLogger"]
RUN = "titans_default-shared-reference-seed0"  # sinwave.yaml's run folder, after version_N-
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--model.dim_feedforward", "16", "--data.init_args.n_sequences", "20",
        "--data.init_args.seq_len", "60", "--trainer.enable_progress_bar", "false"]


def test_the_base_config_chooses_the_callbacks_and_loggers():
    trainer = yaml.safe_load(BASE_CONFIG.read_text())["trainer"]
    chosen = trainer["callbacks"]
    assert [c["class_path"] for c in chosen[-len(CALLBACKS):]] == CALLBACKS
    assert chosen[-1]["init_args"] == {"sequences": [0, 1, 2]}
    loggers = trainer["logger"]
    assert [lg["class_path"] for lg in loggers] == LOGGERS
    folder = {"save_dir": "logs", "name": None}  # the name: the --config file's (the CLI's)
    # TensorBoard's HParams entry is the run's scores, logged after its test: no placeholder
    assert [lg["init_args"] for lg in loggers] == [{**folder, "default_hp_metric": False}, folder]


def test_titans_fit_then_test_log_into_one_run_folder(in_tmp, read_events):
    config = ["--config", str(CONFIGS / "sinwave.yaml"), *TINY,
              "--trainer.logger.init_args.save_dir", str(in_tmp / "runs")]
    with pytest.warns(UserWarning, match=r"validation sequences \[2\] were not seen"):
        main(["fit", *config])
    folder = in_tmp / "runs" / "sinwave" / f"version_0-{RUN}"
    fit_rows = len(pd.read_csv(folder / "metrics.csv"))
    main(["test", *config, "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])

    # --trainer.logger.init_args.save_dir set the last logger's; the TensorBoard one followed
    assert not (in_tmp / "logs").exists()
    assert {p.parent for p in in_tmp.rglob("events.out.tfevents.*")} == {folder}
    assert [p.parent for p in in_tmp.rglob("metrics.csv")] == [folder]

    events = read_events(folder)
    scalars, images = events.Tags()["scalars"], events.Tags()["images"]
    for layer in (0, 1):
        for split in ("train", "val", "test"):
            for tag in (f"memory/layer{layer}/surprise/{split}/mean",
                        f"memory/layer{layer}/gate_rate/{split}"):
                assert tag in scalars
                assert all(math.isfinite(e.value) for e in events.Scalars(tag))
            assert f"memory/layer{layer}/profile/{split}" in images
    assert len(events.Images("forecast/val")) == 1
    assert events.Tensors("custom_scalars__config__")

    table = pd.read_csv(folder / "metrics.csv")  # the fit's rows kept, the test's appended
    assert len(table) > fit_rows
    assert table["val/mse"].notna().sum() == 1 and table["test/mse"].notna().sum() == 2
    assert table["memory/layer1/surprise/val/mean"].notna().sum() == 1
    assert table.dropna(subset=["memory/layer0/profile/surprise/test/mean"])["step"].tolist() \
        == [0, 1, 2] * 2  # 60 steps, window 16: 45 windows in 3 groups; tested twice


def loggers_of(arguments: list[str]) -> list:
    cli = TitansCLI(["--config", str(CONFIGS / "sinwave.yaml"), *TINY, *arguments], run=False)
    return cli.trainer.loggers


def test_both_loggers_take_the_same_free_version(in_tmp):
    earlier = in_tmp / "runs" / "sinwave" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("")
    loggers = loggers_of(["--trainer.logger.init_args.save_dir", str(in_tmp / "runs")])
    assert [lg.log_dir for lg in loggers] == [str(in_tmp / "runs" / "sinwave" /
                                                  f"version_1-{RUN}")] * 2


def test_a_chosen_version_and_name_apply_to_both_loggers(in_tmp):
    loggers = loggers_of(["--trainer.logger.init_args.version", "mine",
                          "--trainer.logger.init_args.name", "waves"])
    assert [lg.log_dir for lg in loggers] == [str(Path("logs") / "waves" / "mine")] * 2
