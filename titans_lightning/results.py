"""What a run leaves in its log directory besides checkpoints and TensorBoard events.

``result.json`` (written after ``titans fit``): one record per run, easy to collect into a table::

    status      ``ok``, or ``nonfinite`` when a score (val_mse, test_mse, test_mae) is NaN or
                infinite; such a score is written as null
    config      the full parsed configuration (dict)
    commit      ``git rev-parse HEAD`` of the package's checkout when the run started, with
                ``-dirty`` when its code differed from that commit, ``-unknown`` when git could
                not tell (see ``git_commit``), or null
    seed        the seed the run was started with
    wall_s      seconds from the start of fit to the end of the test; for a resumed fit, with the
                earlier attempts' time up to the checkpoint it resumed from
    best_epoch  epoch of the tested checkpoint (the best validation MSE), or null
    val_mse     best validation MSE, or null when checkpoints did not monitor ``val/mse``
    test_mse, test_mae   scores of that checkpoint on the test split
    strategy, memory_scope, device
    strategy_source  for a strategy file or module of the user's: ``{"file", "sha256", "source"}``
                (the rule as it ran; the checkpoints keep it too), null for a built-in
    memory_updates   ``{"fit": {"updates", "skipped_slots"}, "test": {...}}``: memory updates
                (all layers) of the fit (training and validation) and of the test, and how
                many of their slots were skipped as non-finite (every rank's, per sequence)
    curve       the fit's learning curve, one entry per validation (every attempt's, for a
                resumed fit): ``{"epoch", "train_loss", "val_mse"}``, where train_loss is the
                mean loss of the epoch's training batches up to that validation (as
                ``train/loss``: the whole epoch, with the default ``val_check_interval``) and
                val_mse the score the checkpoints monitored; a value that was not finite is
                null; an empty list where no validation ran

The file is strict JSON: a non-finite score is null; any other non-finite number (an option
such as ``clip: .inf``) is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``.

``predictions.csv`` (written by ``titans predict``): one row per sequence and target position,
columns ``sequence, position, prediction, target, valid``. ``position`` p is the time step of the
target; its prediction was made from the inputs up to p-1, and ``valid`` says whether that step
had a full context window (an invalid row has no prediction). Where the datamodule knows when
its steps were recorded (``timestamps(split)``: a ``WeatherDataModule`` read from its CSV), a
``timestamp`` column follows: the time of step p, the target's (UTC, ISO 8601, as
``2019-12-20 14:50:00+00:00``). Data without times (the sine waves, prepared ``.npy`` arrays)
has no such column.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .files import atomic_file, write_text_atomic

RESULT_FILE = "result.json"
TEST_FILE = "test.json"  # written by ``titans test``: its scores, checkpoint, config, commit
PREDICTIONS_FILE = "predictions.csv"
PREDICTION_COLUMNS = ("sequence", "position", "prediction", "target", "valid")
PREDICT_SPLIT = "test"  # the split the shipped datamodules' predict_dataloader serves


# What a record's commit vouches for: the code a run imports and the configs it reads. Notes
# and tables (README, benchmarks/*.md, result files) may differ without making a run's code
# differ; a new file here (a strategy not yet added to git) does.
CODE_PATHS = ("titans_lightning", "datamodules", "callbacks", "configs", "benchmarks/*.py",
              "pyproject.toml")


def git_commit(folder: Path | None = None, code: tuple[str, ...] = CODE_PATHS) -> str | None:
    """The commit of the checkout this package (or ``folder``) is in, with ``-dirty`` appended
    when the ``code`` paths (relative to the checkout's top; a ``*`` matches across folders
    too) differ from it, tracked or not, so that a record never names a commit whose code it
    did not run, and ``-unknown`` when git could not tell. None outside a git checkout, or
    where the folder is not part of the checkout around it (a package installed into a
    virtual environment that lies in some other repository). Take it when a run starts: a
    checkout may move on while a long run is under way."""
    folder = folder or Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items()  # a user's pathspec settings would change
           if not (k.startswith("GIT_") and k.endswith("_PATHSPECS"))}  # what counts as code
    env["GIT_OPTIONAL_LOCKS"] = "0"  # and never hold the index lock of the user's own git

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                              timeout=10, check=True, env=env).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        if not commit or not git("ls-files", "--", "."):  # nothing of the folder is tracked
            return None
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        changed = git("status", "--porcelain", "--", *(f":(top){p}" for p in code))
    except (OSError, subprocess.SubprocessError):
        return f"{commit}-unknown"  # the commit is known, whether its code ran is not
    return f"{commit}-dirty" if changed else commit


def device_name(trainer: L.Trainer) -> str:
    """The device the run used, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3) x2``."""
    device = trainer.strategy.root_device
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    if trainer.world_size > 1:
        name += f" x{trainer.world_size}"
    return name


SCORES = ("val_mse", "test_mse", "test_mae")


def write_result(log_dir: str | Path, result: dict[str, Any], name: str = RESULT_FILE) -> Path:
    """Write ``result.json`` (or ``name``: strict JSON, with its ``status``) into ``log_dir``."""
    bad = [k for k in SCORES if isinstance(result.get(k), float) and not math.isfinite(result[k])]
    record = {k: None if k in bad else strict_json(v) for k, v in result.items()}
    record = {"status": "nonfinite" if bad else "ok", **record}
    path = Path(log_dir) / name
    write_text_atomic(path, json.dumps(record, indent=2, default=str, allow_nan=False) + "\n")
    return path


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float written as a string (``"inf"``, ``"nan"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, then renames it into
    place, so a crash or a full disk mid-write never leaves a truncated checkpoint: the last good
    one survives. (Lightning's own writer stages the file in the system's temporary folder, and
    copies it when that is another filesystem.) Remote paths are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path, "wb") as file:
            torch.save(checkpoint, file)


def prediction_rows(output: dict[str, Tensor]) -> pd.DataFrame:
    """One predict batch as rows: target positions 1..T-1 of every sequence."""
    preds = output["preds"].detach().float().cpu().numpy()[..., 0]  # (B, T)
    targets = output["targets"].detach().float().cpu().numpy()[..., 0]  # (B, T)
    valid = output["valid"].cpu().numpy()[:-1]  # (T-1,), for the step each forecast was made at
    index = output["index"].cpu().numpy()  # (B,)
    B, T = preds.shape
    forecast = np.where(valid, preds[:, :-1], np.nan)  # (B, T-1)
    return pd.DataFrame({
        "sequence": np.repeat(index, T - 1),
        "position": np.tile(np.arange(1, T), B),
        "prediction": forecast.reshape(-1),
        "target": targets[:, 1:].reshape(-1),
        "valid": np.tile(valid, B),
    })


def predict_timestamps(datamodule: Any) -> np.ndarray | None:
    """When each step of the predict split was recorded, ``(N, T)`` UTC ``datetime64``, where
    the datamodule's ``timestamps(split)`` knows; None otherwise (no datamodule, no times)."""
    timestamps_of = getattr(datamodule, "timestamps", None)
    return timestamps_of(PREDICT_SPLIT) if callable(timestamps_of) else None


def time_at(timestamps: np.ndarray, frame: pd.DataFrame) -> pd.Series:
    """``timestamps[sequence, position]`` per row (``(N, T)``); missing past step T-1."""
    sequence = frame["sequence"].to_numpy(dtype=np.int64)  # also for a frame without rows
    position = frame["position"].to_numpy(dtype=np.int64)
    inside = position < timestamps.shape[1]
    times = pd.Series(timestamps[sequence, np.minimum(position, timestamps.shape[1] - 1)])
    return times.where(inside)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (see the module docstring) into the trainer's log directory.

    The ``titans predict`` command adds one when the config has none.

    Args:
        output_dir: where to write; default the trainer's ``log_dir``.
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.frames: list[pd.DataFrame] = []
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.frames = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self.frames.append(prediction_rows(prediction))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = Path(self.output_dir or trainer.log_dir or ".")
        if not trainer.is_global_zero:  # every rank predicts the whole split: rank 0 writes it
            self.frames = []
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / PREDICTIONS_FILE
        frames = self.frames or [pd.DataFrame(columns=list(PREDICTION_COLUMNS))]
        frame = pd.concat(frames, ignore_index=True)
        times = predict_timestamps(trainer.datamodule)
        if times is not None:  # the target's time; numpy's datetimes have no time zone
            frame["timestamp"] = time_at(np.asarray(times), frame).dt.tz_localize("UTC")
        frame.to_csv(self.path, index=False)
        self.frames = []
