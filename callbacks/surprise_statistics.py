"""SurpriseStatistics: how surprised each memory layer was, per epoch (and optionally per step)."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from .memory_statistics import MemoryStatisticsCallback, finite


def summarize(values: Tensor) -> dict[str, float]:
    """Mean, (population) standard deviation, min and max of finite float values (N,), N >= 1."""
    return {"mean": values.mean().item(), "std": values.std(correction=0).item(),
            "min": values.min().item(), "max": values.max().item()}


def batch_mean_and_max(surprise: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max of the finite entries of one batch's (U, S) surprise, on the device (no host
    synchronisation; NaN and -inf when none is finite)."""
    kept = torch.isfinite(surprise)
    mean = torch.where(kept, surprise, 0.0).sum() / kept.sum()
    return mean, torch.where(kept, surprise, -torch.inf).amax()


class SurpriseStatistics(MemoryStatisticsCallback):
    """Per memory layer, split and epoch: mean, std, min and max of the surprise of every update
    and slot, and their histogram. Non-finite values (skipped updates) are left out and counted.

    Tags: ``memory/layer{i}/surprise/{split}/{mean,std,min,max,nonfinite}`` (scalars; nonfinite
    only when some were) and ``memory/layer{i}/surprise/{split}`` (histogram, TensorBoard only).

    Args:
        on_step: also log the mean and max surprise of every training batch as step-level
            metrics, ``memory/layer{i}/surprise/train_step/{mean,max}``, which Lightning writes
            every ``trainer.log_every_n_steps`` steps, at the step of its own step-level metrics
            (rank 0's batch; no host synchronisation per batch).
    """

    STATS = ("surprise",)
    MEDIA = "surprise histograms"

    def __init__(self, on_step: bool = False):
        super().__init__()
        self.on_step = on_step

    def scalars(self, prefix: str, split: str, values: dict[str, Tensor]) -> dict[str, float]:
        surprise = values["surprise"]  # (N,)
        kept = finite(surprise)
        tag = f"{prefix}/surprise/{split}"
        metrics = {}
        if kept.numel() < surprise.numel():
            metrics[f"{tag}/nonfinite"] = float(surprise.numel() - kept.numel())
        if kept.numel():
            metrics.update({f"{tag}/{name}": value for name, value in summarize(kept).items()})
        return metrics

    def media(self, writer: Any, prefix: str, split: str, values: dict[str, Tensor],
              step: int) -> None:
        kept = finite(values["surprise"])
        if kept.numel():
            writer.add_histogram(f"{prefix}/surprise/{split}", kept, step)

    def collect(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule,
                batch: Any) -> None:
        super().collect(split, trainer, pl_module, batch)
        if not (self.on_step and split == "train"):
            return
        metrics = {}
        for layer, stats in enumerate(pl_module.memory_stats):
            if stats:
                mean, high = batch_mean_and_max(stats["surprise"].detach())
                prefix = f"memory/layer{layer}/surprise/train_step"
                metrics.update({f"{prefix}/mean": mean, f"{prefix}/max": high})
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
