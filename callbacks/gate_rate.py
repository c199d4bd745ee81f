"""GateRate: how much of each memory update the strategy's gate let through, per epoch."""
from __future__ import annotations

from torch import Tensor

from .memory_statistics import MemoryStatisticsCallback, finite


class GateRate(MemoryStatisticsCallback):
    """Per memory layer, split and epoch: the mean gate rate (the fraction of the updates applied;
    1 for an ungated strategy, 0 for a skipped update) and the count of skipped updates (slots
    whose surprise, gradient or new weights were not finite).

    Tags: ``memory/layer{i}/gate_rate/{split}`` and ``memory/layer{i}/skipped/{split}``.
    """

    STATS = ("gate_rate", "skipped")

    def scalars(self, prefix: str, split: str, values: dict[str, Tensor]) -> dict[str, float]:
        gate_rate = finite(values["gate_rate"])  # (N,)
        metrics = {f"{prefix}/skipped/{split}": values["skipped"].sum().item()}
        if gate_rate.numel():
            metrics[f"{prefix}/gate_rate/{split}"] = gate_rate.mean().item()
        return metrics
