"""Per-epoch memory statistics: the accumulation shared by the memory callbacks.

Shape legend
    U  memory updates in one batch     S  memory slots     K  statistics a callback keeps
    N  values of one statistic in one epoch (updates x slots, over all batches; over all ranks
       for per-sequence training, whose ranks hold different slots)
    W  processes (ranks)

After every batch :class:`~titans_lightning.module.TitansForecaster` leaves in
``pl_module.memory_stats`` one ``{stat: (U, S)}`` dict per memory layer. A subclass names the
statistics it needs (``STATS``); they are kept as device tensors for the whole epoch (no host
synchronisation per batch), gathered from every rank once at the epoch's end where the ranks'
values differ, and handed to
:meth:`MemoryStatisticsCallback.log_layer` on rank 0 only.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from .tensorboard import TensorBoardCallback


def gather_columns(pl_module: L.LightningModule, values: Tensor) -> Tensor:
    """(K, n) values of this rank -> (K, N) values of every rank; the input itself on one process.

    Ranks may hold different n, so each pads to the longest before ``all_gather``.
    """
    if pl_module.trainer.world_size == 1:
        return values
    sizes = pl_module.all_gather(torch.tensor(values.shape[1], device=values.device))  # (W,)
    sizes = sizes.tolist()  # one host synchronisation per epoch and layer
    padded = F.pad(values, (0, max(sizes) - values.shape[1]))  # (K, max n)
    gathered = pl_module.all_gather(padded)  # (W, K, max n)
    return torch.cat([part[:, :n] for part, n in zip(gathered, sizes)], dim=1)  # (K, N)


def finite(values: Tensor) -> Tensor:
    """The finite entries of ``values`` (a skipped update may report NaN or inf), as float64."""
    return values[torch.isfinite(values)].double()


class EpochValues:
    """The values of some memory statistics over one epoch, per layer, kept on the device."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.batches: dict[int, list[Tensor]] = {}

    def add(self, memory_stats: Sequence[Mapping[str, Tensor]]) -> None:
        """Keep one batch's ``[{stat: (U, S)}]`` (one dict per layer; empty when no update)."""
        for layer, stats in enumerate(memory_stats):
            if stats:
                kept = torch.stack([stats[name].detach().reshape(-1) for name in self.names])
                self.batches.setdefault(layer, []).append(kept)  # (K, U*S)

    def clear(self) -> None:
        self.batches.clear()

    def gather(self, pl_module: L.LightningModule, n_layers: int,
               across_ranks: bool = True) -> list[dict[str, Tensor]]:
        """The epoch's values, ``[{stat: (N,)}]`` per layer, of every rank (``across_ranks``)
        or of this one; then clears."""
        gathered = []
        for layer in range(n_layers):  # every rank takes part in every layer's gather
            parts = self.batches.get(layer) or [
                torch.empty(len(self.names), 0, device=pl_module.device)]
            values = torch.cat(parts, dim=1)  # (K, n)
            if across_ranks:
                values = gather_columns(pl_module, values)  # (K, N)
            gathered.append(dict(zip(self.names, values)))
        self.clear()
        return gathered


class MemoryStatisticsCallback(TensorBoardCallback):
    """Base: collects ``STATS`` for the train, val and test epochs; logs them at each epoch's end.

    A subclass sets ``STATS`` and implements :meth:`log_layer`. Tags start with
    ``memory/layer{i}``; the step is the trainer's global step, as for Lightning's own
    epoch-level metrics.
    """

    STATS: tuple[str, ...] = ()
    SPLITS = ("train", "val", "test")

    def __init__(self) -> None:
        super().__init__()
        self.values = {split: EpochValues(self.STATS) for split in self.SPLITS}

    def log_layer(self, writer: Any, prefix: str, split: str, values: dict[str, Tensor],
                  step: int) -> None:
        """Write one layer's epoch: ``values`` maps each of ``STATS`` to its (N,) values."""
        raise NotImplementedError

    # -- the epoch -----------------------------------------------------------------------------
    def collect(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not trainer.sanity_checking:
            self.values[split].add(getattr(pl_module, "memory_stats", []))

    def write(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        # Per-sequence training splits each global batch's slots across ranks: gathered. The
        # shared memory's training update is all-reduced, so every rank records the same values,
        # and validation and test run the whole split on every rank: rank 0's alone.
        per_sequence = getattr(pl_module.hparams, "memory_scope", "shared") == "per_sequence"
        layers = self.values[split].gather(pl_module, len(pl_module.model.memories),
                                           across_ranks=split == "train" and per_sequence)
        if not trainer.is_global_zero:
            return
        writer = self.writer(trainer)
        for layer, values in enumerate(layers):
            if values[self.STATS[0]].numel():
                self.log_layer(writer, f"memory/layer{layer}", split,
                               {name: v.cpu() for name, v in values.items()},
                               trainer.global_step)

    # -- Lightning hooks -----------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.values["train"].clear()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.values["val"].clear()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.values["test"].clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.collect("train", trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self.collect("val", trainer, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.collect("test", trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write("test", trainer, pl_module)
