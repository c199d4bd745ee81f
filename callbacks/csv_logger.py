"""RunCSVLogger: the run's scalars as ``metrics.csv`` in the run folder, beside TensorBoard's.

Lightning's CSVLogger expects a folder of its own: it warns when the folder is not empty and
deletes a ``metrics.csv`` it finds there. A run folder is shared (TensorBoard events, the
configuration, checkpoints) and is written again by a resumed fit and by ``titans test``, so this
logger appends to the rows already there instead, and leaves an ``hparams.yaml`` it did not
write (the run's) as it is. Load them with ``pandas.read_csv``: one row per
logging call, ``step`` and ``epoch`` as in TensorBoard, empty cells for what a row did not log.
"""
from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from torch import Tensor

HPARAMS_FILE = "hparams.yaml"


class MetricsFile:
    """``metrics.csv`` of one folder: rows are kept until :meth:`save`, then appended; a column
    not in the file yet rewrites it once with the wider header (earlier rows left blank there)."""

    NAME = "metrics.csv"

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, self.NAME)
        self.metrics: list[dict[str, Any]] = []  # the rows not saved yet
        self.hparams: dict[str, Any] = {}
        self.hparams_path = os.path.join(log_dir, HPARAMS_FILE)
        self.owns_hparams = not os.path.isfile(self.hparams_path)  # else the run's, kept
        os.makedirs(log_dir, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float | Tensor], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, Tensor) else v for k, v in metrics.items()}
        row["step"] = len(self.metrics) if step is None else step
        self.metrics.append(row)

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Write ``hparams.yaml``, where the folder has none yet or this logger made it: a
        ``titans test`` of a run's checkpoint (say with another ``eval_protocol``) leaves the
        run's own file as it is, as TensorBoard's logger does."""
        if not self.owns_hparams:
            return
        self.hparams.update(params)
        save_hparams_to_yaml(self.hparams_path, self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        rows, header = self.metrics, self.saved_header()
        new = sorted({k for row in rows for k in row} - set(header))
        if new:  # a wider header: rewrite, keeping every saved row
            rows = self.saved_rows() + rows
            header = sorted(header + new)
        mode = "w" if new or not os.path.isfile(self.path) else "a"
        with open(self.path, mode, newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)
        self.metrics = []

    def saved_header(self) -> list[str]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as file:
            return next(csv.reader(file), [])

    def saved_rows(self) -> list[dict[str, str]]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as file:
            return list(csv.DictReader(file))


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments, same folder ``save_dir/name/version_N``) that
    shares its folder: it appends to the ``metrics.csv`` there and does not warn that the folder
    holds other files. With the ``titans`` CLI it writes into the TensorBoard logger's run folder
    (the CLI gives every logger of the list the folder of the last one)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricsFile:
        if self._experiment is None:
            self._experiment = MetricsFile(self.log_dir)
        return self._experiment
