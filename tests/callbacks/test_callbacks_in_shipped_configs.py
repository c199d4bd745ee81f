"""The shipped configs choose the memory and forecast callbacks; a tiny `titans fit` logs them."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from titans_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CALLBACKS = ["callbacks.surprise_statistics.SurpriseStatistics", "callbacks.gate_rate.GateRate",
             "callbacks.memory_health.MemoryHealth", "callbacks.forecast_figure.ForecastFigure"]


@pytest.mark.parametrize("name", ["sinwave.yaml", "weather.yaml", "sinwave_long.yaml"])
def test_shipped_config_chooses_the_callbacks(name):
    chosen = yaml.safe_load((CONFIGS / name).read_text())["trainer"]["callbacks"]
    assert [c["class_path"] for c in chosen[-4:]] == CALLBACKS
    assert chosen[-1]["init_args"] == {"sequences": [0, 1, 2]}


def test_titans_fit_logs_memory_statistics_and_a_forecast_figure(in_tmp, read_events):
    with pytest.warns(UserWarning, match=r"validation sequences \[2\] were not seen"):
        main(["fit", "--config", str(CONFIGS / "sinwave.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
              "--trainer.limit_test_batches", "2", "--model.dim_feedforward", "16",
              "--data.init_args.n_sequences", "20", "--data.init_args.seq_len", "60",
              "--trainer.logger.init_args.save_dir", str(in_tmp),
              "--trainer.enable_progress_bar", "false"])

    (log_dir,) = in_tmp.glob("sinwave/version_0")
    events = read_events(log_dir)
    scalars = events.Tags()["scalars"]
    for layer in (0, 1):
        for split in ("train", "val", "test"):
            for tag in (f"memory/layer{layer}/surprise/{split}/mean",
                        f"memory/layer{layer}/gate_rate/{split}"):
                assert tag in scalars
                assert all(math.isfinite(e.value) for e in events.Scalars(tag))
    assert len(events.Images("forecast/val")) == 1
