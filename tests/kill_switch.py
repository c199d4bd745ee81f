"""A callback that kills its own process with SIGKILL (a crash, a lost machine) or SIGTERM."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class KillAt(L.Callback):
    """``signal_name`` (SIGKILL) at the start of training step ``step``, or when the final test
    starts.

    With ``once`` (a file path), only the first time: the file marks that it happened.
    """

    def __init__(self, step: int | None = None, at_test: bool = False, once: str | None = None,
                 signal_name: str = "SIGKILL"):
        self.step, self.at_test, self.once = step, at_test, once
        self.signal = getattr(signal, signal_name)

    def kill(self) -> None:
        if self.once is not None:
            if Path(self.once).exists():
                return
            Path(self.once).touch()
        os.kill(os.getpid(), self.signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.kill()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.at_test:
            self.kill()
