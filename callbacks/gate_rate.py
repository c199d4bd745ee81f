"""GateRate: how much of each memory update the strategy's gate let through, per epoch."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .memory_statistics import MemoryStatisticsCallback, finite


class GateRate(MemoryStatisticsCallback):
    """Per memory layer, split and epoch: the mean gate rate (the fraction of the updates applied;
    1 for an ungated strategy, 0 for a skipped update) and the count of skipped updates (slots
    whose surprise, gradient or new weights were not finite).

    Tags: ``memory/layer{i}/gate_rate/{split}`` and ``memory/layer{i}/skipped/{split}``.
    """

    STATS = ("gate_rate", "skipped")

    def log_layer(self, writer: Any, prefix: str, split: str, values: dict[str, Tensor],
                  step: int) -> None:
        gate_rate = finite(values["gate_rate"])  # (N,)
        if gate_rate.numel():
            writer.add_scalar(f"{prefix}/gate_rate/{split}", gate_rate.mean().item(), step)
        writer.add_scalar(f"{prefix}/skipped/{split}", values["skipped"].sum().item(), step)
