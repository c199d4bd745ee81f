"""The Python API end to end: train with ``L.Trainer``, load the best checkpoint, forecast.

    python examples/python_api.py                # sinwave with the benchmark's model, 2 epochs
    python examples/python_api.py --fast         # a tiny model on tiny data: seconds
    python examples/python_api.py --weather-csv path/to/Turbine_Data.csv   # the weather model too

Each model is trained into ``--out`` as ``titans fit`` would, in Lightning's own run folder
(``<out>/<name>/version_N/``: the TensorBoard events and ``checkpoints/``), and its test split's
predictions are written beside them as ``predictions_python.csv``: the rows ``titans predict``
writes to ``predictions.csv``, with a ``timestamp`` for weather. Predictions are in the units
the model was trained in; the weather data is z-normalised, and the example turns its
predictions back into the CSV's units.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules import SinwaveDataModule, WeatherDataModule
from datamodules.weather_csv import COLUMNS, read_turbine_csv, select_rows
from titans_lightning import TitansForecaster
from titans_lightning.forecast import (denormalise, forecast, normalise_columns, predict,
                                       target_normalisation)

PREDICTIONS_FILE = "predictions_python.csv"


def train(name: str, data: L.LightningDataModule, args: argparse.Namespace) -> str:
    """Fit as ``titans fit`` does, then test the best epoch; return its checkpoint's path."""
    model = TitansForecaster(input_dim=data.input_dim, output_dim=data.output_dim,
                             context_window=data.context_window,
                             dim_feedforward=32 if args.fast else 2048)
    checkpoint = ModelCheckpoint(monitor="val/mse", mode="min", save_last=True)
    trainer = L.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=2 if args.fast else None,
        inference_mode=False,  # the memory learns during validation and test: it needs autograd
        num_sanity_val_steps=0,  # which would feed it validation data before training
        logger=TensorBoardLogger(args.out, name=name), callbacks=[checkpoint],
        enable_progress_bar=not args.fast, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    scores = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)[0]
    print(f"{name}: test MSE {scores['test/mse']:.6f} (the best epoch's checkpoint)")
    return checkpoint.best_model_path


def sinwave(args: argparse.Namespace) -> Path:
    window = 4 if args.fast else 16
    sizes = {"n_sequences": 20, "seq_len": 40} if args.fast else {}
    data = SinwaveDataModule(context_window=window, **sizes)
    best = train("sinwave", data, args)

    # The checkpoint holds the model and its memory as they were at the best epoch.
    model = TitansForecaster.load_from_checkpoint(best)
    # The test split, one row per sequence and target position; the valid rows are those the
    # test MSE scores (the sine waves are not normalised: these are the waves' own units).
    predictions = predict(model, data)
    scored = predictions[predictions["valid"]]
    mse = float(((scored["prediction"] - scored["target"]) ** 2).mean())
    print(f"sinwave: {len(predictions)} rows, MSE of the valid rows {mse:.6f}")
    path = Path(best).parent.parent / PREDICTIONS_FILE
    predictions.to_csv(path, index=False)

    # A wave of your own, as a DataFrame; next_step adds the forecast of the step after it.
    steps = np.arange(3 * window)
    wave = pd.DataFrame({"timestamp": pd.date_range("2024-01-01", periods=len(steps), freq="h"),
                         "x": np.sin(steps / 2.0)})
    print(forecast(model, wave, next_step=True).tail(3).to_string(index=False))
    return path


def weather(args: argparse.Namespace) -> Path:
    data = WeatherDataModule(csv_path=args.weather_csv, context_window=16)
    best = train("weather", data, args)
    model = TitansForecaster.load_from_checkpoint(best)

    # z-normalised, with the time of every target; the datamodule kept the CSV's statistics.
    normalisation = target_normalisation(data)
    predictions = denormalise(predict(model, data), normalisation)  # the CSV's units
    path = Path(best).parent.parent / PREDICTIONS_FILE
    predictions.to_csv(path, index=False)
    print(f"weather: {len(predictions)} rows from {predictions['timestamp'].min()} to "
          f"{predictions['timestamp'].max()}; ActivePower mean {normalisation.mean:.3f}, "
          f"std {normalisation.std:.3f}")

    # The latest readings of the CSV, in its units: normalised as the datamodule normalised
    # them, forecast, and the forecast of the next ActivePower turned back into the CSV's units.
    readings = read_turbine_csv(args.weather_csv)
    readings = readings.loc[select_rows(readings, args.weather_csv).index]  # rows the data keeps
    readings["timestamp"] = pd.to_datetime(readings["timestamp"], utc=True, format="ISO8601")
    recent = normalise_columns(readings[["timestamp", *COLUMNS]].tail(100), data.normalisation)
    forecasts = denormalise(forecast(model, recent, next_step=True), normalisation)
    print(forecasts.tail(3).to_string(index=False))
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description="Train with L.Trainer, load the best checkpoint, forecast.")
    parser.add_argument("--fast", action="store_true",
                        help="a tiny model, tiny sinwave data, one epoch of two batches")
    parser.add_argument("--epochs", type=int, default=2, help="epochs (without --fast)")
    parser.add_argument("--out", default="logs/examples", help="where the runs go")
    parser.add_argument("--weather-csv", help="Kaggle's Turbine_Data.csv: train on weather too")
    args = parser.parse_args(argv)
    L.seed_everything(0, verbose=False)
    written = [sinwave(args)]
    if args.weather_csv:
        written.append(weather(args))
    for path in written:
        print(f"predictions: {path}")
    return written


if __name__ == "__main__":
    main()
