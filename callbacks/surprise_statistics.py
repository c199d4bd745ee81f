"""SurpriseStatistics: how surprised each memory layer was, per epoch (and optionally per step)."""
from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from .memory_statistics import MemoryStatisticsCallback, finite


def summarize(values: Tensor) -> dict[str, float]:
    """Mean, (population) standard deviation, min and max of finite float values (N,), N >= 1."""
    return {"mean": values.mean().item(), "std": values.std(correction=0).item(),
            "min": values.min().item(), "max": values.max().item()}


class SurpriseStatistics(MemoryStatisticsCallback):
    """Per memory layer, split and epoch: mean, std, min and max of the surprise of every update
    and slot, and their histogram. Non-finite values (skipped updates) are left out and counted.

    Tags: ``memory/layer{i}/surprise/{split}/{mean,std,min,max,nonfinite}`` (scalars; nonfinite
    only when some were) and ``memory/layer{i}/surprise/{split}`` (histogram).

    Args:
        every_n_steps: also log the mean and max surprise of the training batch every this many
            global steps (``memory/layer{i}/surprise/train_step/{mean,max}``; rank 0's batch;
            one host synchronisation each time). 0 turns this off.
    """

    STATS = ("surprise",)

    def __init__(self, every_n_steps: int = 0):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_step_logged = -1

    def log_layer(self, writer: Any, prefix: str, split: str, values: dict[str, Tensor],
                  step: int) -> None:
        surprise = values["surprise"]  # (N,)
        kept = finite(surprise)
        tag = f"{prefix}/surprise/{split}"
        if kept.numel() < surprise.numel():
            writer.add_scalar(f"{tag}/nonfinite", surprise.numel() - kept.numel(), step)
        if kept.numel() == 0:
            return
        for name, value in summarize(kept).items():
            writer.add_scalar(f"{tag}/{name}", value, step)
        writer.add_histogram(tag, kept, step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        due = self.every_n_steps and step % self.every_n_steps == 0
        if not (self.enabled and due and trainer.is_global_zero and step != self._last_step_logged):
            return
        self._last_step_logged = step  # gradient accumulation ends several batches on one step
        writer = self.writer(trainer)
        for layer, stats in enumerate(pl_module.memory_stats):
            kept = finite(stats["surprise"]) if stats else None
            if kept is not None and kept.numel():
                prefix = f"memory/layer{layer}/surprise/train_step"
                writer.add_scalar(f"{prefix}/mean", kept.mean().item(), step)
                writer.add_scalar(f"{prefix}/max", kept.max().item(), step)
