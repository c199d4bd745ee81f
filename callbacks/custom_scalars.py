"""CustomScalars: a TensorBoard custom-scalars layout that puts comparable tags on shared charts.

TensorBoard's Scalars tab draws one chart per tag. The layout written here (the Custom Scalars
tab) draws, per split, every memory layer's mean surprise, gate rate and update norm on one chart,
and the within-sequence profiles as bands; every run in the log folder adds its own lines, so
strategies are compared side by side. TensorBoard merges the layouts of all runs.
"""
from __future__ import annotations

from typing import Any

import lightning as L

from .memory_profile import STATS, MemoryProfile, scalar_tag
from .memory_statistics import SPLITS
from .tensorboard import TensorBoardCallback


def layout(n_layers: int, profiles: bool) -> dict[str, dict[str, list[Any]]]:
    """``{category: {chart: ["Multiline", [tag regex]] or ["Margin", [value, lower, upper]]}}``
    (the form of ``SummaryWriter.add_custom_scalars``)."""
    charts = {
        "forecast": {"train/loss, val/mse and test/mse": [
            "Multiline", [r"^(train/loss|val/mse|test/mse)$"]]},
        "memory surprise": {f"mean surprise, {split}": [
            "Multiline", [rf"^memory/layer\d+/surprise/{split}/mean$"]] for split in SPLITS},
        "memory gate rate": {f"gate rate, {split}": [
            "Multiline", [rf"^memory/layer\d+/gate_rate/{split}$"]] for split in SPLITS},
        "memory update norm": {f"mean update norm, {split}": [
            "Multiline", [rf"^memory/layer\d+/update_norm/{split}$"]] for split in SPLITS},
    }
    if profiles:  # margin charts name their three tags exactly
        charts["memory over the sequence (step = update u)"] = {
            f"layer {layer} {stat}, {split}": [
                "Margin", [scalar_tag(layer, stat, split, s) for s in ("mean", "p10", "p90")]]
            for layer in range(n_layers) for split in SPLITS for stat in STATS}
    return charts


class CustomScalars(TensorBoardCallback):
    """Writes the custom-scalars layout (:func:`layout`) once per run, for the model's memory
    layers; the profile charts only when a :class:`MemoryProfile` callback runs too."""

    MEDIA = "a custom-scalars layout"

    def __init__(self) -> None:
        super().__init__()
        self._written_to: Any = None  # the writer that has the layout

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not (self.tensorboard and trainer.is_global_zero):
            return
        writer = self.writer(trainer)
        if writer is self._written_to:  # fit, then test, with one writer
            return
        profiles = any(isinstance(c, MemoryProfile) for c in trainer.callbacks)
        writer.add_custom_scalars(layout(len(pl_module.model.memories), profiles))
        self._written_to = writer
