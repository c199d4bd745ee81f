"""A tiny sinwave fit with chosen callbacks, and TensorBoard event files read back."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import (CustomScalars, ForecastFigure, GateRate, MemoryHealth, MemoryProfile,
                       RunCSVLogger, SurpriseStatistics)
from datamodules import SinwaveDataModule
from titans_lightning.module import TitansForecaster


class StatsRecorder(L.Callback):
    """Keeps a copy of what the memory reported after every batch: ``batches[split]`` is a list
    (one per batch) of ``[{stat: (U, S)}]`` (one dict per layer)."""

    def __init__(self) -> None:
        self.batches: dict[str, list[list[dict[str, torch.Tensor]]]] = {
            "train": [], "val": [], "test": []}
        self.indices: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}

    def record(self, split: str, pl_module: L.LightningModule, batch: dict) -> None:
        self.batches[split].append([{k: v.detach().clone() for k, v in stats.items()}
                                    for stats in pl_module.memory_stats])
        self.indices[split].append(batch["index"].clone())  # (B,)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args: Any) -> None:
        self.record("train", pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args: Any) -> None:
        self.record("val", pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, *args: Any) -> None:
        self.record("test", pl_module, batch)

    def values(self, split: str, layer: int, stat: str) -> torch.Tensor:
        """All values of one statistic over the recorded batches, (N,) float64."""
        return torch.cat([b[layer][stat].reshape(-1) for b in self.batches[split]]).double()

    def per_update(self, split: str, layer: int, stat: str) -> torch.Tensor:
        """One statistic over the recorded batches by update, (U, N) float64 (equal U)."""
        return torch.cat([b[layer][stat] for b in self.batches[split]], dim=1).double()


def fit_tiny(log_dir: Path, callbacks: list[L.Callback], max_epochs: int = 1,
             test: bool = False, memory_scope: str = "shared", **trainer_args: Any) -> L.Trainer:
    """Fit (and optionally test) the tiny model on tiny sine waves: at most 2 batches per split."""
    L.seed_everything(0, verbose=False)
    model = TitansForecaster(context_window=4, dim_feedforward=16, memory_scope=memory_scope)
    data = SinwaveDataModule(n_sequences=20, seq_len=40, context_window=4)
    options = dict(inference_mode=False, num_sanity_val_steps=0, max_epochs=max_epochs,
                   limit_train_batches=2, limit_val_batches=2, limit_test_batches=2,
                   logger=TensorBoardLogger(str(log_dir), name="tiny"),
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=callbacks)
    trainer = L.Trainer(**{**options, **trainer_args})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(LeafSpec|logging interval).*")
        trainer.fit(model, data)
        if test:
            trainer.test(model, data, verbose=False)
    return trainer


def load_events(log_dir: str | Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir),
                              size_guidance={"scalars": 0, "histograms": 0, "images": 0,
                                             "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="session")
def tiny_fit():
    """``tiny_fit(log_dir, callbacks, max_epochs=1, test=False, memory_scope="shared",
    **trainer_args) -> Trainer``."""
    return fit_tiny


@pytest.fixture(scope="session")
def read_events():
    """``read_events(log_dir) -> EventAccumulator`` with every scalar, histogram and image."""
    return load_events


@pytest.fixture(scope="session")
def stats_recorder():
    """``stats_recorder() -> StatsRecorder``, a callback copying ``memory_stats`` per batch."""
    return StatsRecorder


@pytest.fixture(scope="session")
def logged_run(tmp_path_factory):
    """A tiny fit of 2 epochs (2 batches each) with every callback of the shipped configs and
    both loggers in one folder, then the test of its best checkpoint (by the highest val/mse,
    so that it is not the last epoch where it can be) and, with a fresh Trainer logging to
    ``version_1``, the same test again. Returns ``(trainer, best checkpoint dict, run folder)``."""
    directory = tmp_path_factory.mktemp("logged_run")
    checkpoint = ModelCheckpoint(dirpath=str(directory / "checkpoints"), monitor="val/mse",
                                 mode="max", save_top_k=1)
    callbacks = [checkpoint, SurpriseStatistics(), GateRate(), MemoryHealth(), MemoryProfile(),
                 CustomScalars(), ForecastFigure(sequences=[0])]
    loggers = [TensorBoardLogger(str(directory), name="tiny", version=0),
               RunCSVLogger(str(directory), name="tiny", version=0)]
    trainer = fit_tiny(directory, callbacks, max_epochs=2, logger=loggers,
                       enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(LeafSpec|callbacks used to create).*")
        trainer.test(trainer.lightning_module, trainer.datamodule, ckpt_path="best",
                     verbose=False)
        fresh = L.Trainer(inference_mode=False, limit_test_batches=2, enable_progress_bar=False,
                          enable_model_summary=False,
                          logger=TensorBoardLogger(str(directory), name="tiny", version=1))
        fresh.test(TitansForecaster(context_window=4, dim_feedforward=16), trainer.datamodule,
                   ckpt_path=checkpoint.best_model_path, verbose=False)
    best = torch.load(checkpoint.best_model_path, weights_only=False, map_location="cpu")
    return trainer, best, Path(trainer.log_dir)
