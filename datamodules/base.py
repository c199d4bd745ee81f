"""The shared datamodule: three checked splits served as batches of whole sequences.

A subclass names its channels and says how to obtain the raw splits (:meth:`load_splits`); this
class checks them (:func:`~datamodules.splits.check_splits`), keeps them only if every check
passes, and builds the dataloaders. Batches are dicts from default collate:
``inputs (B, L, d_in)``, ``targets (B, L, 1)``, ``index (B,)``.
"""

from __future__ import annotations

import os
from typing import ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from datamodules.dataset import SequenceDataset
from datamodules.splits import SPLITS, SplitArray, check_splits
from titans_lightning.sampling import RankMajorSampler, world_size


def default_input_columns(n_channels: int) -> tuple[int, ...]:
    """All channels but the last (the target); a single channel is both input and target."""
    return tuple(range(n_channels - 1)) if n_channels > 1 else (0,)


class SequenceDataModule(L.LightningDataModule):
    """Base for the sequence datamodules; subclasses set ``channels`` and ``load_splits``.

    Args:
        batch_size: sequences per batch.
        num_workers: dataloader worker processes (0 loads in the main process).
        context_window: steps the model reads before predicting the next one; every sequence
            must be at least ``context_window + 1`` long.
        shuffle_eval: shuffle validation and test batches too. Only for fidelity checks against
            the reference, which did this: with a persistent memory the score then depends on
            the order (``--model.eval_protocol reference`` goes with it).
    """

    channels: ClassVar[tuple[str, ...]] = ()
    input_columns: ClassVar[tuple[int, ...]] = ()
    target_column: ClassVar[int] = -1

    def __init__(self, batch_size: int = 4, num_workers: int = 0, context_window: int = 16,
                 shuffle_eval: bool = False) -> None:
        super().__init__()
        self.shuffle_eval = shuffle_eval
        _check_positive(batch_size=batch_size, context_window=context_window)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.context_window = context_window
        self.datasets: dict[str, SequenceDataset] = {}

    @property
    def input_dim(self) -> int:
        """Channels the model reads per step."""
        return len(self.input_columns)

    @property
    def output_dim(self) -> int:
        """Channels the model predicts per step (the single target)."""
        return 1

    def load_splits(self) -> dict[str, SplitArray]:
        """Return the raw train / valid / test arrays ``(N, L, d)``; checked by the caller."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load and check all three splits once; nothing is kept if any check fails."""
        if self.datasets:
            return
        # All splits are loaded whatever the stage: their shapes are checked against each other.
        arrays = check_splits(self.load_splits(), len(self.channels), self.context_window)
        target = self.target_column % len(self.channels)
        self.datasets = {
            split: SequenceDataset(arrays[split], self.input_columns, target) for split in SPLITS
        }

    # On several processes (torch.distributed running) the training loader splits each global
    # batch of world_size * batch_size sequences among the ranks itself, and the evaluation
    # loaders give every rank the whole split in the same order: Lightning must not add its own
    # distributed sampler (use_distributed_sampler=False, the titans CLI's default).
    def train_dataloader(self) -> DataLoader:
        if world_size() > 1:
            sampler = RankMajorSampler(self._require("train"), self.batch_size, seed=_seed())
            return self._loader("train", sampler=sampler)
        # No explicit generator: shuffling follows torch's global RNG, which seed_everything sets.
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=self.shuffle_eval)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_eval)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _require(self, split: str) -> SequenceDataset:
        if not self.datasets:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for dataloaders")
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool = False,
                sampler: Sampler[int] | None = None) -> DataLoader:
        generator = None
        if shuffle and world_size() > 1:  # the same order on every rank, whatever its RNG did
            generator = torch.Generator().manual_seed(_seed())
        return DataLoader(
            self._require(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def _seed() -> int:
    """The run's seed (set by seed_everything), so that every rank shuffles alike."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
