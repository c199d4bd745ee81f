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
values differ, and summarised by :meth:`MemoryStatisticsCallback.scalars`.

The scalars go through Lightning's logging (``pl_module.log_dict``), so every logger of the run
gets them (TensorBoard, CSV, W&B, MLflow) and a callback can monitor them; they are logged at the
module's epoch step, beside ``train/loss`` and ``val/mse``. Media (histograms) go to the
TensorBoard writer, on rank 0 only.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from .tensorboard import TensorBoardCallback, epoch_step

SPLITS = ("train", "val", "test")


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


def differs_across_ranks(split: str, pl_module: L.LightningModule) -> bool:
    """Whether the ranks hold different memory values for ``split``, to be gathered.

    Per-sequence training splits each global batch's slots across ranks. The shared memory's
    training update is all-reduced, so every rank records the same values, and validation and
    test run the whole split on every rank: rank 0's alone are the split's.
    """
    scope = getattr(pl_module.hparams, "memory_scope", "shared")
    return split == "train" and scope == "per_sequence" and pl_module.trainer.world_size > 1


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


class MemoryCallback(TensorBoardCallback):
    """Base of the callbacks that read the memory's report after every batch of train, val and
    test: :meth:`start`, :meth:`collect` and :meth:`write` per split (not in the sanity check)."""

    def start(self, split: str) -> None:
        """A new epoch of ``split`` begins."""

    def collect(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule,
                batch: Any) -> None:
        """Keep what is needed of ``pl_module.memory_stats`` after one batch."""

    def write(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch; called on every rank."""

    # -- Lightning hooks -----------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start("train")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start("val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start("test")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.collect("train", trainer, pl_module, batch)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self.collect("val", trainer, pl_module, batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.collect("test", trainer, pl_module, batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.write("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write("test", trainer, pl_module)


class MemoryStatisticsCallback(MemoryCallback):
    """Base: collects ``STATS`` for the train, val and test epochs; logs them at each epoch's end.

    A subclass sets ``STATS`` and implements :meth:`scalars` (and :meth:`media` for what only
    TensorBoard shows). Tags start with ``memory/layer{i}``.
    """

    STATS: tuple[str, ...] = ()
    SPLITS = SPLITS

    def __init__(self) -> None:
        super().__init__()
        self.values = {split: EpochValues(self.STATS) for split in self.SPLITS}

    def scalars(self, prefix: str, split: str, values: dict[str, Tensor]) -> dict[str, float]:
        """One layer's epoch as ``{tag: value}``; ``values`` maps each of ``STATS`` to its (N,)
        values (on the CPU)."""
        raise NotImplementedError

    def media(self, writer: Any, prefix: str, split: str, values: dict[str, Tensor],
              step: int) -> None:
        """Draw one layer's epoch in TensorBoard (rank 0 only)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.world_size > 1:
            # Lightning advises sync_dist for epoch-level values under DDP; these are the same on
            # every rank already (gathered, or computed from the same data), so none is needed.
            warnings.filterwarnings(
                "ignore", message=r"It is recommended to use `self\.log\('memory/layer")

    def start(self, split: str) -> None:
        self.values[split].clear()

    def collect(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule,
                batch: Any) -> None:
        self.values[split].add(getattr(pl_module, "memory_stats", []))

    def write(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = self.values[split].gather(pl_module, len(pl_module.model.memories),
                                           across_ranks=differs_across_ranks(split, pl_module))
        layers = [{name: v.cpu() for name, v in values.items()} for values in layers]
        metrics: dict[str, float] = {}
        for layer, values in enumerate(layers):  # every rank: the same keys and values
            if values[self.STATS[0]].numel():
                metrics.update(self.scalars(f"memory/layer{layer}", split, values))
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1)
        if not (trainer.is_global_zero and self.tensorboard):
            return
        writer, step = self.writer(trainer), epoch_step(trainer, pl_module)
        for layer, values in enumerate(layers):
            if values[self.STATS[0]].numel():
                self.media(writer, f"memory/layer{layer}", split, values, step)
