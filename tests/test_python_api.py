"""The Python API (``titans_lightning.forecast``) and its example, ``examples/python_api.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules import SinwaveDataModule, WeatherDataModule
from datamodules.weather_csv import COLUMNS, FEATURES, TARGET
from titans_lightning import TitansForecaster
from titans_lightning.cli import TitansCLI
from titans_lightning.forecast import (Normalisation, denormalise, forecast, normalise_columns,
                                       predict, target_normalisation)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "python_api.py"
C, T = 4, 24  # the tiny model's context window; steps of the waves forecast here
RAW_MEAN = np.array([6.0, 10.0, 1100.0, 58.0, 65.0, 630.0])  # roughly Turbine_Data's, COLUMNS
RAW_STD = np.array([2.5, 4.7, 520.0, 6.0, 9.7, 600.0])


def write_turbine_csv(path: Path, n_rows: int = 5200, seed: int = 0) -> Path:
    """A Turbine_Data-shaped CSV in raw units: an unnamed timestamp column (10-minute steps) and
    the columns the datamodule keeps. 50 rows lack ActivePower, so the kept rows' times have
    gaps; the test split is one window of 500 rows."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n_rows, len(COLUMNS))) * RAW_STD + RAW_MEAN,
                         columns=list(COLUMNS))
    frame.loc[rng.choice(n_rows, 50, replace=False), TARGET] = np.nan
    frame.insert(0, "", pd.date_range("2018-01-01", periods=n_rows, freq="10min", tz="UTC"))
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def turbine_csv(tmp_path_factory) -> Path:
    return write_turbine_csv(tmp_path_factory.mktemp("kaggle") / "Turbine_Data.csv")


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, turbine_csv) -> tuple[Path, str]:
    """``python examples/python_api.py --fast`` with the weather part: (its --out, stdout)."""
    out = tmp_path_factory.mktemp("example") / "runs"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--fast", "--out", str(out), "--weather-csv",
         str(turbine_csv)], capture_output=True, text=True, timeout=600, cwd=out.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, done.stdout


@pytest.fixture
def tiny_model() -> TitansForecaster:
    torch.manual_seed(0)
    return TitansForecaster(context_window=C, dim_feedforward=32)


def waves(n: int = 3) -> np.ndarray:
    steps = np.arange(T)
    return np.stack([np.sin(steps / (2.0 + j) + j) for j in range(n)])[..., None]  # (n, T, 1)


def replay(model: TitansForecaster, inputs: np.ndarray) -> np.ndarray:
    """The model run directly on one batch from its current memory (which then learns from
    it): preds (N, T), made at t."""
    model.eval()
    with torch.no_grad():
        preds, _ = model.model(torch.as_tensor(inputs, dtype=torch.float32))
    return preds[..., 0].numpy()


def test_the_example_runs_and_writes_each_models_predictions(example_run):
    out, stdout = example_run
    sinwave = pd.read_csv(out / "sinwave" / "version_0" / "predictions_python.csv")
    assert list(sinwave.columns) == ["sequence", "position", "prediction", "target", "valid"]
    assert len(sinwave) == 2 * 39  # the tiny data's 2 test sequences of 40 steps
    weather = pd.read_csv(out / "weather" / "version_0" / "predictions_python.csv")
    assert list(weather.columns) == ["sequence", "position", "prediction", "target", "valid",
                                     "timestamp"]
    assert len(weather) == 499
    times = pd.to_datetime(weather["timestamp"], utc=True)
    assert times.is_monotonic_increasing and str(times.min()).startswith("2018-")
    # denormalised: in the CSV's units, not z-scores
    assert abs(weather["target"].mean() - RAW_MEAN[-1]) < 3 * RAW_STD[-1] / np.sqrt(499)
    assert weather["target"].std() > 100
    assert "sinwave: test MSE" in stdout and "weather: test MSE" in stdout
    assert stdout.count("predictions: ") == 2


def test_predict_agrees_with_titans_predict_and_titans_test(example_run, tiny_sinwave, in_tmp):
    out, _ = example_run
    run = out / "sinwave" / "version_0"
    ckpt = str(next((run / "checkpoints").glob("epoch=*.ckpt")))  # the best one
    cli = TitansCLI(["predict", *tiny_sinwave, "--ckpt_path", ckpt])
    assert Path(cli.trainer.log_dir) == run
    from_python = pd.read_csv(run / "predictions_python.csv")
    pd.testing.assert_frame_equal(from_python, pd.read_csv(run / "predictions.csv"))
    # the valid rows are what the test scores
    TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt])
    scored = from_python[from_python["valid"]]
    mse = ((scored["prediction"] - scored["target"]) ** 2).mean()
    assert mse == pytest.approx(json.loads((run / "test.json").read_text())["test_mse"],
                                rel=1e-5)


def test_forecast_puts_the_forecast_made_at_p_minus_1_at_position_p(tiny_model):
    data = waves()
    frame = forecast(tiny_model, data)
    made_at = replay(tiny_model, data)  # the memory was put back: the same start
    sequence, position = frame["sequence"].to_numpy(), frame["position"].to_numpy()
    assert len(frame) == 3 * (T - 1) and position.min() == 1 and position.max() == T - 1
    assert frame["valid"].tolist() == (position >= C).tolist()
    np.testing.assert_allclose(frame["target"], data[sequence, position, 0], rtol=1e-6)
    valid = frame["valid"].to_numpy()
    assert frame["prediction"][~valid].isna().all()
    np.testing.assert_allclose(frame["prediction"][valid], made_at[sequence, position - 1][valid],
                               rtol=1e-5, atol=1e-6)


def test_a_dataframe_carries_its_labels_and_timestamps(tiny_model):
    data = waves()
    labels = ["north", "south", "east"]
    times = pd.date_range("2024-01-01", periods=T, freq="h", tz="UTC")
    rows = pd.DataFrame({"sequence": np.repeat(labels, T), "timestamp": list(times) * 3,
                         "x": data[..., 0].reshape(-1)})
    frame = forecast(tiny_model, rows, next_step=True)
    from_array = forecast(tiny_model, data)
    made_at = replay(tiny_model, data)
    inside = frame[frame["position"] < T].reset_index(drop=True)
    pd.testing.assert_frame_equal(inside.drop(columns=["sequence", "timestamp"]),
                                  from_array.drop(columns="sequence"))
    assert inside["sequence"].tolist() == [labels[n] for n in from_array["sequence"]]
    assert (inside["timestamp"] == times[inside["position"].to_numpy()]).all()
    # one more row per sequence: the forecast made at the last step, of the step after the data
    after = frame[frame["position"] == T]
    assert after["sequence"].tolist() == labels
    np.testing.assert_allclose(after["prediction"], made_at[:, T - 1], rtol=1e-5, atol=1e-6)
    assert after["target"].isna().all() and after["timestamp"].isna().all()


def test_the_memory_is_put_back_unless_kept(tiny_model):
    data = waves()
    memory = tiny_model.model.memories[0]
    before = memory.fast_weights.clone()
    first = forecast(tiny_model, data)
    assert torch.equal(memory.fast_weights, before)
    pd.testing.assert_frame_equal(forecast(tiny_model, data), first)
    updates = int(memory.num_updates)
    kept = forecast(tiny_model, data, keep_memory=True)
    pd.testing.assert_frame_equal(kept, first)  # from the same start
    groups = int(np.ceil((T - C + 1) / C))  # one update per group of C windows
    assert int(memory.num_updates) == updates + groups
    assert not torch.equal(memory.fast_weights, before)
    again = forecast(tiny_model, data)  # from the memory that learned these waves
    assert not np.allclose(again["prediction"].dropna(), first["prediction"].dropna())


def test_weather_predictions_have_the_csvs_times_and_units_back(turbine_csv):
    data = WeatherDataModule(csv_path=str(turbine_csv), context_window=16)
    torch.manual_seed(0)
    model = TitansForecaster(input_dim=data.input_dim, context_window=16, dim_feedforward=32)
    frame = predict(model, data)
    assert str(frame["timestamp"].dt.tz) == "UTC"
    raw = pd.read_csv(turbine_csv).rename(columns={"Unnamed: 0": "timestamp"})
    raw["timestamp"] = pd.to_datetime(raw["timestamp"], utc=True, format="ISO8601")
    kept = raw.dropna(subset=[TARGET])
    normalisation = target_normalisation(data)
    assert normalisation.mean == pytest.approx(kept[TARGET].mean(), rel=1e-12)
    assert normalisation.std == pytest.approx(kept[TARGET].std(ddof=1), rel=1e-12)
    # each target, back in the CSV's units, is the CSV's ActivePower at the row's timestamp
    back = denormalise(frame, normalisation)
    at = back.merge(kept, on="timestamp", how="left", validate="one_to_one")
    assert len(at) == len(frame) == 499 and at[TARGET].notna().all()
    np.testing.assert_allclose(at["target"], at[TARGET], rtol=1e-5, atol=1e-3)  # float32
    # and back again
    for column in ("prediction", "target"):
        np.testing.assert_allclose(normalisation.normalise(back[column]), frame[column],
                                   rtol=1e-5, atol=1e-5)
    # raw readings, normalised as the datamodule did it, are the inputs the model read
    times = pd.DatetimeIndex(data.timestamps("test")[0]).tz_localize("UTC")  # (500,): steps 0..
    assert (times[1:] == frame["timestamp"]).all()
    readings = normalise_columns(kept.set_index("timestamp").loc[times], data.normalisation)
    np.testing.assert_allclose(readings[list(FEATURES)].to_numpy(),
                               data.datasets["test"].inputs[0].numpy(), rtol=1e-5, atol=1e-5)


def test_titans_predict_on_the_csv_gives_each_row_its_targets_time(turbine_csv, in_tmp):
    with pytest.warns(UserWarning, match="scores an untrained model"):
        cli = TitansCLI(["predict", "--config", str(REPO / "configs" / "weather.yaml"),
                         "--data.init_args.data_dir", "null",
                         "--data.init_args.csv_path", str(turbine_csv),
                         "--model.dim_feedforward", "8", "--trainer.limit_predict_batches", "1",
                         "--trainer.enable_progress_bar", "false"])
    path = Path(cli.trainer.log_dir) / "predictions.csv"
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["sequence", "position", "prediction", "target", "valid",
                                   "timestamp"]
    assert len(frame) == 499  # the test split: one window of 500 steps
    assert path.read_text().splitlines()[1].endswith("+00:00")  # UTC, ISO 8601
    # the row of position p has the time of step p, the step whose value it predicts
    times = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
    steps = pd.DatetimeIndex(cli.datamodule.timestamps("test")[0]).tz_localize("UTC")
    assert (times == steps[frame["position"].to_numpy()]).all()
    raw = pd.read_csv(turbine_csv).rename(columns={"Unnamed: 0": "timestamp"})
    raw["timestamp"] = pd.to_datetime(raw["timestamp"], utc=True, format="ISO8601")
    power = target_normalisation(cli.datamodule)
    at = pd.DataFrame({"timestamp": times, "target": frame["target"]}).merge(
        raw, on="timestamp", how="left", validate="one_to_one")
    np.testing.assert_allclose(power.denormalise(at["target"]), at[TARGET], rtol=1e-5, atol=1e-3)


def test_only_the_csv_path_knows_its_normalisation_and_times(tmp_path):
    assert target_normalisation(SinwaveDataModule()) is None  # the waves are not normalised
    prepared = WeatherDataModule(data_dir=str(tmp_path))
    assert target_normalisation(prepared) is None and prepared.timestamps("test") is None
    z = Normalisation(mean=630.0, std=600.0)
    assert z.denormalise(z.normalise(1234.5)) == pytest.approx(1234.5)
    assert z.normalise(1230.0) == pytest.approx(1.0)


@pytest.mark.parametrize("data, message", [
    (np.zeros((2, T, 3)), r"3 channel\(s\), for a model that reads 1 input"),
    (np.zeros((2, C, 1)), r"at least context_window \+ 1 = 5"),
    (np.where(np.arange(T)[None, :, None] == 7, np.nan, np.zeros((2, T, 1))), "NaN or infinite"),
    (pd.DataFrame({"sequence": [0] * T + [1] * (T - 1), "x": 0.0}), r"\[23, 24\] rows"),
    (np.zeros((2, 2, T, 1)), r"give \(N, T, d\), \(T, d\) or \(T,\)"),
])
def test_bad_data_is_refused_before_predicting(tiny_model, data, message):
    with pytest.raises(ValueError, match=message):
        forecast(tiny_model, data)
