"""The base of the callbacks that draw in TensorBoard: find the writer once, warn once if absent,
and the step their media are logged at."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's first TensorBoardLogger, or None."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def epoch_step(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """The step this epoch's scalars are logged at (the module's ``epoch_step``, which it logs
    as ``step``), so that figures and histograms sit beside them; the global step otherwise."""
    own = getattr(pl_module, "epoch_step", None)
    return int(own()) if callable(own) else trainer.global_step


class TensorBoardCallback(L.Callback):
    """A callback whose media (figures, histograms) go to ``trainer.logger.experiment`` (a
    ``SummaryWriter``); its scalars, if any, go through Lightning's logging to every logger.

    ``MEDIA`` names what it draws. Without a TensorBoardLogger it warns once that those are not
    logged, and ``self.tensorboard`` is False.
    """

    MEDIA = ""

    def __init__(self) -> None:
        super().__init__()
        self.tensorboard = False
        self._warned: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.tensorboard = tensorboard_logger(trainer) is not None
        if not self.tensorboard and self.MEDIA:
            self.warn_once(f"{type(self).__name__} draws {self.MEDIA} in TensorBoard, but the "
                           "trainer has no TensorBoardLogger: they are not logged")

    def writer(self, trainer: L.Trainer) -> Any:
        """The SummaryWriter (a no-op stand-in on ranks other than 0)."""
        return tensorboard_logger(trainer).experiment

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)
