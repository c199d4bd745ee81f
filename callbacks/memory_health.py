"""MemoryHealth: the size of the memory's gradients, updates and fast weights, per epoch."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .memory_statistics import MemoryStatisticsCallback, finite


class MemoryHealth(MemoryStatisticsCallback):
    """Per memory layer, split and epoch: mean and max of the surprise's gradient norm, the
    update's norm and the fast weights' norm after the update (finite values only).

    Tags: ``memory/layer{i}/{grad_norm,update_norm,weight_norm}/{split}`` (mean) and
    ``.../{split}/max``.
    """

    STATS = ("grad_norm", "update_norm", "weight_norm")

    def log_layer(self, writer: Any, prefix: str, split: str, values: dict[str, Tensor],
                  step: int) -> None:
        for name in self.STATS:
            kept = finite(values[name])  # (N,)
            if kept.numel():
                writer.add_scalar(f"{prefix}/{name}/{split}", kept.mean().item(), step)
                writer.add_scalar(f"{prefix}/{name}/{split}/max", kept.max().item(), step)
