"""Forecasting from Python: a model (a loaded checkpoint, say) and data in, a DataFrame out.

    model = TitansForecaster.load_from_checkpoint("RUN/checkpoints/last.ckpt")  # RUN: a run folder
    predictions = predict(model, SinwaveDataModule())  # the rows `titans predict` writes
    predictions = forecast(model, data)                # an array or a DataFrame of your own

Both run the module's own ``predict_step`` through a Lightning Trainer and return the long
format of ``predictions.csv`` (:func:`titans_lightning.results.prediction_rows`), one row per
sequence and target position:

    sequence    the sequence's row in its split or array, or its label in a DataFrame
    position    p, the time step of the target (1 .. T-1)
    prediction  the forecast of step p, made at step p-1 from the inputs up to p-1; NaN where
                step p-1 had no full context window (p < C)
    target      the value at step p
    valid       whether step p-1 had a full context window (p >= C): the rows the metrics score
    timestamp   when step p was recorded; only where the data has times (a weather datamodule
                read from its CSV, a DataFrame's ``timestamp`` column)

Units: predictions, targets and the metrics (``val/mse``, ``test/mse``) are in the units the
model was trained in. The weather data is z-normalised per column (mean and sample std of the
kept rows), so its predictions are too: :func:`target_normalisation` gives the target's
statistics where the datamodule knows them (a CSV it prepared) and :func:`denormalise` turns
predictions back into the CSV's units (an MSE scales by ``std**2``). The sine waves are used as
generated (not normalised).

Memory: the neural memory learns while it predicts (test-time learning) and, in the shared
scope, carries what it learned from batch to batch, so a prediction depends on the order and
size of the batches (4, as in the benchmarks). By default both functions put the memory back as
it was afterwards, so every call starts from the same memory (a loaded checkpoint's, as
``titans predict`` does); ``keep_memory=True`` lets it carry on, for data that comes in pieces.

Shape legend
    N  sequences    T  time steps per sequence    d  channels (the inputs, then the target)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.base import default_input_columns
from datamodules.dataset import SequenceDataset

from .module import TitansForecaster, restore_buffers
from .results import PREDICTION_COLUMNS, predict_timestamps, prediction_rows, time_at

NOT_CHANNELS = ("sequence", "timestamp")  # DataFrame columns that are not model channels


@dataclass(frozen=True)
class Normalisation:
    """The z-normalisation ``z = (x - mean) / std`` of one column, both ways."""

    mean: float
    std: float

    def normalise(self, x: Any) -> Any:
        return (x - self.mean) / self.std

    def denormalise(self, z: Any) -> Any:
        return z * self.std + self.mean


def target_normalisation(datamodule: L.LightningDataModule) -> Normalisation | None:
    """How ``datamodule`` normalised its target, where it knows: a ``WeatherDataModule`` read
    from its CSV, once set up. None otherwise: the sine waves are not normalised, and prepared
    ``.npy`` arrays do not keep their statistics."""
    stats = getattr(datamodule, "normalisation", None)
    if not stats:
        return None
    column = datamodule.channels[datamodule.target_column]
    return Normalisation(stats["mean"][column], stats["std"][column])


def denormalise(predictions: pd.DataFrame, normalisation: Normalisation) -> pd.DataFrame:
    """A copy of ``predictions`` with ``prediction`` and ``target`` in the data's own units."""
    out = predictions.copy()
    for column in ("prediction", "target"):
        out[column] = normalisation.denormalise(out[column])
    return out


def normalise_columns(frame: pd.DataFrame, stats: dict[str, dict[str, float]]) -> pd.DataFrame:
    """A copy of ``frame`` with each column that ``stats`` names (``{"mean": {column: m},
    "std": {column: s}}``, as ``WeatherDataModule.normalisation``) z-normalised as the
    datamodule normalised it: raw readings in, what the model reads out."""
    out = frame.copy()
    for column in stats["mean"]:
        if column in out:
            out[column] = Normalisation(stats["mean"][column], stats["std"][column]) \
                .normalise(out[column])
    return out


def prediction_trainer() -> L.Trainer:
    """A quiet one-device Trainer for predicting, with autograd on (the memory learns)."""
    announcements = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = announcements.level
    announcements.setLevel(logging.WARNING)  # not the devices and tips at every call
    try:
        return L.Trainer(devices=1, inference_mode=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    finally:
        announcements.setLevel(level)


def predict(model: TitansForecaster, datamodule: L.LightningDataModule,
            trainer: L.Trainer | None = None, keep_memory: bool = False) -> pd.DataFrame:
    """The datamodule's predict split as :func:`forecast`'s DataFrame: the rows ``titans
    predict`` writes to ``predictions.csv``, and a ``timestamp`` (UTC) where the datamodule's
    ``timestamps(split)`` gives the split's times as ``(N, T)`` UTC ``datetime64`` (a
    ``WeatherDataModule`` read from a CSV)."""
    outputs = run_predict(model, trainer, keep_memory, datamodule=datamodule)
    times = predict_timestamps(datamodule)
    frame = prediction_frame(outputs, timestamps=times)
    if times is not None:  # numpy's datetimes have no time zone
        frame["timestamp"] = frame["timestamp"].dt.tz_localize("UTC")
    return frame


def forecast(model: TitansForecaster, data: Any, batch_size: int = 4,
             columns: Sequence[str] | None = None, next_step: bool = False,
             trainer: L.Trainer | None = None, keep_memory: bool = False) -> pd.DataFrame:
    """Forecast ``data`` with ``model``, as the long DataFrame of the module docstring.

    Args:
        model: the module, e.g. ``TitansForecaster.load_from_checkpoint(path)``.
        data: in the units the model was trained in (see :func:`normalise_columns`), channels
            ordered as the datamodule's: the inputs, then the target (one channel is both, as
            in sinwave; a target not known yet may be NaN). An array or tensor ``(N, T, d)``,
            ``(T, d)`` or ``(T,)``; or a DataFrame whose rows are time steps, with an optional
            ``sequence`` column (one sequence per value, in order of first appearance, all of
            the same length) and an optional ``timestamp`` column, carried to the output.
        batch_size: sequences per batch; in the shared scope the memory learns from each batch.
        columns: the DataFrame's channel columns, in order; default every column but
            ``sequence`` and ``timestamp``.
        next_step: also give, per sequence, the forecast made at the last step T-1 for the
            step after the data (position T, target NaN).
        trainer: the Trainer to predict with; default :func:`prediction_trainer`.
        keep_memory: leave the memory as predicting left it (default: put it back).
    """
    sequences, labels, times = as_sequences(data, columns)  # (N, T, d)
    check_sequences(sequences, model.hparams)
    dataset = SequenceDataset(sequences, default_input_columns(sequences.shape[-1]), -1)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    outputs = run_predict(model, trainer, keep_memory, dataloaders=loader)
    return prediction_frame(outputs, labels=labels, timestamps=times, next_step=next_step)


def run_predict(model: TitansForecaster, trainer: L.Trainer | None, keep_memory: bool,
                **data: Any) -> list[dict[str, Tensor]]:
    """``trainer.predict``'s outputs (``predict_step``'s dicts), and the memory put back unless
    ``keep_memory``."""
    trainer = trainer or prediction_trainer()
    saved = None if keep_memory else {
        name: buffer.detach().clone() for name, buffer in model.model.named_buffers()}
    try:
        return trainer.predict(model, return_predictions=True, **data)
    finally:
        if saved is not None:  # assignment: a per-sequence memory may have changed shape
            restore_buffers(model.model, {name: value.to(model.device)
                                          for name, value in saved.items()})


def prediction_frame(outputs: list[dict[str, Tensor]], labels: Sequence[Any] | None = None,
                     timestamps: np.ndarray | None = None, next_step: bool = False
                     ) -> pd.DataFrame:
    """The long DataFrame of predict outputs: ``prediction_rows`` of each batch; then, where
    given, each row's time (``timestamps (N, T)``, at the target's position) and the
    sequences' labels (``labels[n]`` for the sequence at row n)."""
    frames = [prediction_rows(output) for output in outputs]
    if next_step:
        frames += [next_step_rows(output) for output in outputs]
    if not frames:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    if next_step:
        frame = frame.sort_values(["sequence", "position"], kind="stable", ignore_index=True)
    if timestamps is not None:
        frame["timestamp"] = time_at(np.asarray(timestamps), frame)
    if labels is not None:
        frame["sequence"] = np.asarray(labels)[frame["sequence"].to_numpy()]
    return frame


def next_step_rows(output: dict[str, Tensor]) -> pd.DataFrame:
    """One row per sequence of a batch: the forecast made at step T-1, of step T."""
    preds = output["preds"].detach().float().cpu().numpy()[:, -1, 0]  # (B,)
    valid = bool(output["valid"][-1])
    missing = np.full_like(preds, np.nan)  # (B,)
    return pd.DataFrame({
        "sequence": output["index"].cpu().numpy(),
        "position": output["preds"].shape[1],
        "prediction": preds if valid else missing,
        "target": missing,
        "valid": valid,
    })


def as_sequences(data: Any, columns: Sequence[str] | None
                 ) -> tuple[np.ndarray, list[Any] | None, np.ndarray | None]:
    """``data`` as float32 ``(N, T, d)``, its sequence labels and times ``(N, T)`` (or None)."""
    if isinstance(data, pd.DataFrame):
        return frame_sequences(data, columns)
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    array = np.asarray(data, dtype=np.float32)
    if array.ndim not in (1, 2, 3):
        raise ValueError(f"data of shape {array.shape}: give (N, T, d), (T, d) or (T,)")
    if array.ndim == 1:
        array = array[:, None]  # (T, 1)
    if array.ndim == 2:
        array = array[None]  # (1, T, d)
    return array, None, None


def frame_sequences(frame: pd.DataFrame, columns: Sequence[str] | None
                    ) -> tuple[np.ndarray, list[Any] | None, np.ndarray | None]:
    """A DataFrame's sequences (grouped by its ``sequence`` column, if any), labels and times."""
    channels = list(columns) if columns is not None else [
        c for c in frame.columns if c not in NOT_CHANNELS]
    groups = ([group for _, group in frame.groupby("sequence", sort=False)]
              if "sequence" in frame else [frame])
    lengths = sorted({len(group) for group in groups})
    if len(lengths) > 1:
        raise ValueError(f"the sequences have {lengths} rows: forecast sequences of one length "
                         "at a time (they are batched together)")
    array = np.stack([group[channels].to_numpy(dtype=np.float32) for group in groups])
    labels = list(pd.unique(frame["sequence"])) if "sequence" in frame else None
    times = (np.stack([group["timestamp"].to_numpy() for group in groups])
             if "timestamp" in frame else None)
    return array, labels, times


def check_sequences(sequences: np.ndarray, hparams: Any) -> None:
    """Channels as the model reads them, and at least one forecast with a target per sequence."""
    d, inputs = sequences.shape[-1], hparams.input_dim
    if not (d == inputs + 1 or d == inputs == 1):
        raise ValueError(
            f"data with {d} channel(s), for a model that reads {inputs} input channel(s): give "
            f"the {inputs} input(s) then the target ({inputs + 1} channels; NaN where the target "
            "is unknown)" + ("; or the one channel, which is also the target" if inputs == 1
                             else ""))
    if sequences.shape[1] < hparams.context_window + 1:
        raise ValueError(
            f"sequences of {sequences.shape[1]} steps: the model needs at least context_window "
            f"+ 1 = {hparams.context_window + 1} (a full window, then the step it forecasts)")
    if not np.isfinite(sequences[..., default_input_columns(d)]).all():
        raise ValueError("the input channels hold NaN or infinite values; only the target may "
                         "be missing")


__all__ = ["Normalisation", "denormalise", "forecast", "normalise_columns", "predict",
           "prediction_frame", "prediction_trainer", "target_normalisation"]
