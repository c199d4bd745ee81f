"""A logger like W&B's or MLflow's for the record-folder test: every run logs into the same
``save_dir`` and gets a fresh run id as its version, and it has no run folder of its own."""
from __future__ import annotations

import itertools
from typing import Any

from lightning.pytorch.loggers.logger import Logger

RUN_IDS = itertools.count()


class SharedDirLogger(Logger):
    def __init__(self, save_dir: str, project: str = "project"):
        super().__init__()
        self._save_dir, self._project, self._id = save_dir, project, f"run{next(RUN_IDS)}"

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def name(self) -> str:
        return self._project

    @property
    def version(self) -> str:
        return self._id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass
