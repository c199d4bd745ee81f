"""MemoryHealth: the size of the memory's gradients, updates and fast weights, per epoch."""
from __future__ import annotations

from torch import Tensor

from .memory_statistics import MemoryStatisticsCallback, finite


class MemoryHealth(MemoryStatisticsCallback):
    """Per memory layer, split and epoch: mean and max of the surprise's gradient norm, the
    update's norm and the fast weights' norm after the update (finite values only).

    Tags: ``memory/layer{i}/{grad_norm,update_norm,weight_norm}/{split}`` (mean) and
    ``.../{split}/max``.
    """

    STATS = ("grad_norm", "update_norm", "weight_norm")

    def scalars(self, prefix: str, split: str, values: dict[str, Tensor]) -> dict[str, float]:
        metrics = {}
        for name in self.STATS:
            kept = finite(values[name])  # (N,)
            if kept.numel():
                metrics[f"{prefix}/{name}/{split}"] = kept.mean().item()
                metrics[f"{prefix}/{name}/{split}/max"] = kept.max().item()
        return metrics
