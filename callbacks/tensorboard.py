"""The base of the callbacks that write to TensorBoard: find the writer once, warn once if absent."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's first TensorBoardLogger, or None."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class TensorBoardCallback(L.Callback):
    """A callback that logs through ``trainer.logger.experiment`` (a ``SummaryWriter``).

    Without a TensorBoardLogger it warns once and stays disabled (``self.enabled`` is False), so
    subclasses check ``enabled`` before doing any work.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False
        self._warned: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.enabled = tensorboard_logger(trainer) is not None
        if not self.enabled:
            self.warn_once(f"{type(self).__name__} writes to TensorBoard, but the trainer has no "
                           "TensorBoardLogger: it logs nothing")

    def writer(self, trainer: L.Trainer) -> Any:
        """The SummaryWriter (a no-op stand-in on ranks other than 0)."""
        return tensorboard_logger(trainer).experiment

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)
