"""Two CPU processes (gloo, forked) keep one memory: the same as one process on the global batch.

Every run is tiny (window 4, 32 / 4 / 4 sine waves of 30 steps, 4 training steps) and in double
precision, so that "the same as one process" can be checked to ~1e-10. The single-process run
takes batches of 2 * B with the sampler the ranks use (at ``num_replicas=1``: the same
permutation), so step by step it sees exactly the sequences the two ranks see together.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.multiprocessing import start_processes
from torch.utils.data import DataLoader, Subset

from datamodules import SinwaveDataModule
from titans_lightning.distributed import (all_reduce_mean, broadcast_memory, reduce_hook,
                                          warn_if_split_is_divided)
from titans_lightning.memory import NeuralMemory
from titans_lightning.module import TitansForecaster
from titans_lightning.sampling import RankMajorSampler, world_size

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed and the fork start method")

B = 4  # sequences per rank and training batch
DATA = {"n_sequences": 40, "seq_len": 30, "context_window": 4}  # 32 / 4 / 4 sequences
CLOSE = {"rtol": 1e-9, "atol": 1e-12}  # one process against two: summation order only


class SameOrderSinwave(SinwaveDataModule):
    """On one process, trains on the permutation the ranks share (their sampler at one rank)."""

    def train_dataloader(self) -> DataLoader:
        if world_size() > 1:
            return super().train_dataloader()
        dataset = self.datasets["train"]
        sampler = RankMajorSampler(dataset, self.batch_size, num_replicas=1, rank=0)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def state(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in pl_module.state_dict().items()
            if not name.startswith("metrics.")}


def reduce_installed(pl_module: L.LightningModule) -> bool:
    hooks = [memory.reduce is not None for memory in pl_module.model.memories]
    assert len(set(hooks)) == 1  # all layers alike
    return hooks[0]


class Recorder(L.Callback):
    """Per rank: the module's state at the stage boundaries, whether the reduce hook was on in
    each batch, and val/mse. Callback hooks run before the module's, so ``val_end`` is what
    the rank computed itself, before the module broadcasts rank 0's memory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.record: dict[str, Any] = {"train_reduce": [], "val_reduce": []}

    def on_train_start(self, trainer, pl_module):
        wrapper = trainer.strategy.model
        self.record["buffers_synced_every_forward"] = getattr(
            wrapper, "forward_sync_buffers", getattr(wrapper, "broadcast_buffers", None))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.record["train_reduce"].append(reduce_installed(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.record["train_end"] = state(pl_module)
        self.record["train_loss"] = trainer.callback_metrics["train/loss"].item()

    def on_validation_start(self, trainer, pl_module):
        self.record["val_start"] = state(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, *args):
        self.record["val_reduce"].append(reduce_installed(pl_module))

    def on_validation_end(self, trainer, pl_module):
        self.record["val_end"] = state(pl_module)
        self.record["val_mse"] = trainer.callback_metrics["val/mse"].item()

    def teardown(self, trainer, pl_module, stage):
        torch.save(self.record, self.directory / f"rank{trainer.global_rank}.pt")


@dataclass
class Run:
    directory: Path
    ranks: list[dict[str, Any]]


def run(directory: Path, devices: int, batch_size: int, stage: str = "fit",
        strategy: str = "titans_default", memory_scope: str = "shared",
        ckpt_path: Path | None = None, float32: bool = False) -> Run:
    """One tiny fit (one epoch, no validation, ``last.ckpt`` saved) or validate; in double
    precision without dropout, or (``float32``) as the benchmarks run: float32, dropout 0.1, the
    CPU kernels where they are built."""
    L.seed_everything(0, verbose=False)
    model = TitansForecaster(strategy=strategy, memory_scope=memory_scope,
                             dropout=0.1 if float32 else 0.0,
                             context_window=DATA["context_window"], dim_feedforward=16)
    model = model if float32 else model.double()
    data = SameOrderSinwave(batch_size=batch_size, **DATA)
    parallel = {"devices": 2, "strategy": "ddp_fork"} if devices == 2 else {"devices": 1}
    callbacks = [Recorder(directory)]
    if stage == "fit":
        callbacks.append(ModelCheckpoint(dirpath=directory, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu", precision="32-true" if float32 else "64-true", max_epochs=1,
        limit_val_batches=0 if stage == "fit" else None, inference_mode=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, logger=False,
        enable_checkpointing=stage == "fit",
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **parallel)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(LeafSpec|many workers|callbacks used to).*")
        if stage == "fit":
            trainer.fit(model, data)
        else:
            trainer.validate(model, data, ckpt_path=ckpt_path, verbose=False)
    return Run(directory, [torch.load(directory / f"rank{r}.pt") for r in range(devices)])


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """``fits(strategy, memory_scope, devices) -> Run``: each tiny fit runs once per module."""
    done: dict[tuple, Run] = {}

    def get(strategy: str, memory_scope: str, devices: int) -> Run:
        key = (strategy, memory_scope, devices)
        if key not in done:
            directory = tmp_path_factory.mktemp(f"{strategy}_{memory_scope}_{devices}")
            done[key] = run(directory, devices, B * 2 // devices, strategy=strategy,
                            memory_scope=memory_scope)
        return done[key]

    return get


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **close: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if close:
            torch.testing.assert_close(a[name], b[name], **close, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


# -- the pieces -----------------------------------------------------------------------------------
def test_rank_major_sampler_gives_the_ranks_the_global_batches_of_one_process():
    dataset = list(range(13))  # 2 ranks x 3: two full global batches and a short, padded one
    one = list(RankMajorSampler(dataset, 6, num_replicas=1, rank=0, seed=5))
    ranks = [list(RankMajorSampler(dataset, 3, num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    assert sorted(one) == list(range(13))
    assert len(ranks[0]) == len(ranks[1]) == 7
    for step in range(2):
        rank_batches = ranks[0][3 * step:3 * step + 3] + ranks[1][3 * step:3 * step + 3]
        assert rank_batches == one[6 * step:6 * step + 6]
    assert ranks[0][6:] + ranks[1][6:] == [one[12], one[0]]  # padded with the first index
    reshuffled = RankMajorSampler(dataset, 6, num_replicas=1, rank=0, seed=5)
    reshuffled.set_epoch(1)
    assert list(reshuffled) != one


def broadcast_from_rank0(rank: int, port: int, directory: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different starting weights and projections on each rank
    memory = NeuralMemory(strategy="adam_gated")
    memory.start_sequences(3 - rank)  # and a different number of per-sequence slots
    memory.update(torch.randn(3 - rank, 5, 16))
    broadcast_memory(memory)
    torch.save(memory.state_dict(), directory / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_broadcast_gives_every_rank_rank0s_memory_whatever_its_shape(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    start_processes(broadcast_from_rank0, args=(port, tmp_path), nprocs=2, start_method="fork")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["fast_weights"].shape[0] == 3 and int(rank0["num_updates"]) == 1
    assert_same(rank0, rank1)


def test_a_strategy_can_bring_its_own_cross_rank_reduction(tmp_path):
    rule = tmp_path / "reducing_rule.py"
    rule.write_text((REPO / "examples" / "custom_memory.py").read_text() + (
        "\n\ndef reduce_across_ranks(memory, surprise, grads, rows):\n"
        "    return surprise + memory.dim, grads\n"))
    surprise, grads = reduce_hook(NeuralMemory(strategy=str(rule)))(
        torch.zeros(1), torch.zeros(1, 3), 5)
    assert surprise.item() == 16.0
    assert reduce_hook(NeuralMemory()) is all_reduce_mean


def test_an_evaluation_split_divided_among_ranks_is_warned_about():
    dataset = list(range(8))
    divided = DataLoader(dataset, sampler=RankMajorSampler(dataset, 2, num_replicas=2, rank=0))
    with pytest.warns(RuntimeWarning, match="validation split is divided among the ranks"):
        warn_if_split_is_divided([divided], "validation")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_split_is_divided(DataLoader(dataset), "test")


# -- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["titans_default", "adam_gated", "meta_nlms"])
def test_shared_memory_is_one_memory_on_two_ranks(fits, strategy):
    """adam_gated's gate reads the surprise; meta_nlms backpropagates through the updates."""
    rank0, rank1 = fits(strategy, "shared", 2).ranks
    (single,) = fits(strategy, "shared", 1).ranks

    assert rank0["buffers_synced_every_forward"] is False
    assert rank0["train_reduce"] == rank1["train_reduce"] == [True] * 4
    assert_same(rank0["train_end"], rank1["train_end"])  # bit for bit
    assert_same(rank0["train_end"], single["train_end"], **CLOSE)
    # train/loss is the global batch's loss (every rank's sequences), not rank 0's share of it
    assert rank0["train_loss"] == rank1["train_loss"]
    assert rank0["train_loss"] == pytest.approx(single["train_loss"], rel=1e-9)
    memory = {n: t for n, t in single["train_end"].items() if n.startswith("model.layers.0.memory")}
    assert int(memory["model.layers.0.memory.num_updates"]) == 4 * 7  # batches x groups
    if strategy == "adam_gated":  # the gate closed sometimes, at the same updates everywhere
        steps = memory["model.layers.0.memory.strategy_state.step"]
        assert 0 < steps.item() < memory["model.layers.0.memory.strategy_state.seen"].item()


def test_per_sequence_memory_needs_no_reduce(fits):
    """Every slot learns from its own sequence: the ranks share nothing but the outer model and
    the starting memory, and their slots side by side are the slots of one process."""
    rank0, rank1 = fits("titans_default", "per_sequence", 2).ranks
    (single,) = fits("titans_default", "per_sequence", 1).ranks

    assert not any(rank0["train_reduce"] + rank1["train_reduce"])
    slotted = []
    for name, value in single["train_end"].items():
        a, b = rank0["train_end"][name], rank1["train_end"][name]
        if a.shape != value.shape:  # one slot per sequence of the last batch
            slotted.append(name)
            torch.testing.assert_close(torch.cat([a, b]), value, **CLOSE, msg=name)
        else:
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, value, **CLOSE, msg=name)
    assert sorted(slotted) == [f"model.layers.{i}.memory.{n}" for i in (0, 1)
                               for n in ("fast_weights", "strategy_state.momentum")]


# -- checkpoints and validation -------------------------------------------------------------------
@pytest.fixture(scope="module")
def validations(fits, tmp_path_factory):
    """The checkpoint of the two-rank shared fit, validated on two ranks and on one process
    (2 batches of 2 sequences: the memory carries over from the first to the second)."""
    checkpoint = fits("titans_default", "shared", 2).directory / "last.ckpt"
    return {devices: run(tmp_path_factory.mktemp(f"validate_{devices}"), devices, 2,
                         stage="validate", ckpt_path=checkpoint).ranks
            for devices in (2, 1)}


def test_checkpoint_of_two_ranks_restores_their_memory_anywhere(fits, validations):
    trained = fits("titans_default", "shared", 2).ranks[0]["train_end"]
    for rank in validations[2] + validations[1]:
        assert_same(rank["val_start"], trained)


def test_validation_on_two_ranks_scores_like_one_process(validations):
    rank0, rank1 = validations[2]
    (single,) = validations[1]

    assert not any(rank0["val_reduce"] + rank1["val_reduce"] + single["val_reduce"])
    assert len(rank0["val_reduce"]) == len(single["val_reduce"]) == 2  # the whole split each
    assert rank0["val_mse"] == rank1["val_mse"]
    assert rank0["val_mse"] == pytest.approx(single["val_mse"], rel=1e-9)
    assert_same(rank0["val_end"], rank1["val_end"])  # computed alike, not broadcast
    assert_same(rank0["val_end"], single["val_end"], **CLOSE)
    assert not torch.equal(rank0["val_end"]["model.layers.0.memory.fast_weights"],
                           rank0["val_start"]["model.layers.0.memory.fast_weights"])


def save_and_restore_rng(rank: int, port: int, directory: Path) -> None:
    from titans_lightning.module import (own_rng_states, restore_rng_states,
                                         rng_states_of_every_rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # each rank's stream is its own (each GPU's, say)
    checkpoint = {"rng_states_per_rank": rng_states_of_every_rank(2)}
    expected = torch.rand(5)  # what this rank draws next
    torch.rand(100)  # the run goes on, then is resumed from the checkpoint
    restore_rng_states(own_rng_states(checkpoint, rank, 2))
    torch.save({"expected": expected, "resumed": torch.rand(5)}, directory / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_each_rank_resumes_its_own_random_stream(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    start_processes(save_and_restore_rng, args=(port, tmp_path), nprocs=2, start_method="fork")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0["expected"], rank1["expected"])
    for rank in (rank0, rank1):
        assert torch.equal(rank["resumed"], rank["expected"])


class UnevenSinwave(SameOrderSinwave):
    """Rank 1 gets one training batch fewer, as a datamodule without the rank sampler might."""

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        if dist.get_rank() == 0:
            return loader
        kept = list(loader.sampler)[:-self.batch_size]
        return DataLoader(Subset(loader.dataset, kept), batch_size=self.batch_size)


def two_rank_fit(**trainer_args) -> tuple[TitansForecaster, L.Trainer]:
    """A tiny model and a two-process (forked, gloo) Trainer without logs or checkpoints."""
    L.seed_everything(0, verbose=False)
    model = TitansForecaster(context_window=DATA["context_window"], dim_feedforward=16)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, inference_mode=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **trainer_args)
    return model, trainer


def test_ranks_that_would_run_different_batches_fail_instead_of_hanging(tmp_path):
    model, trainer = two_rank_fit(limit_val_batches=0)
    with warnings.catch_warnings(), pytest.raises(Exception, match="ranks disagree") as info:
        warnings.filterwarnings("ignore", message=".*(LeafSpec|many workers).*")
        trainer.fit(model, UnevenSinwave(batch_size=2, **DATA))
    assert "batches: rank 0 8, rank 1 7" in str(info.value)


def test_overfit_batches_is_refused_on_several_ranks(tmp_path):
    model, trainer = two_rank_fit(overfit_batches=2)
    with warnings.catch_warnings(), pytest.raises(Exception, match="overfit_batches replaces"):
        warnings.filterwarnings("ignore", message=".*(LeafSpec|many workers|overfit).*")
        trainer.fit(model, SameOrderSinwave(batch_size=2, **DATA))


class ShorterOnRankOne(SameOrderSinwave):
    """Rank 1's sequences are one step shorter."""

    def setup(self, stage=None):
        super().setup(stage)
        if dist.is_initialized() and dist.get_rank() == 1:
            for split, dataset in self.datasets.items():
                dataset.inputs, dataset.targets = dataset.inputs[:, :-1], dataset.targets[:, :-1]


def test_ranks_with_different_sequence_lengths_fail_naming_it(tmp_path):
    model, trainer = two_rank_fit(limit_val_batches=0)
    with warnings.catch_warnings(), pytest.raises(Exception, match="ranks disagree") as info:
        warnings.filterwarnings("ignore", message=".*(LeafSpec|many workers).*")
        trainer.fit(model, ShorterOnRankOne(batch_size=2, **DATA))
    assert "seq_len: rank 0 30, rank 1 29" in str(info.value)


def test_float32_with_dropout_and_the_kernels_keeps_one_memory_on_two_ranks(tmp_path):
    """As the benchmarks run: float32, dropout on (each rank its own masks), the CPU kernels.
    The memory and the outer weights stay bit-identical on the two ranks."""
    from titans_lightning import kernels

    ranks = run(tmp_path, 2, B, float32=True).ranks
    assert ranks[0]["train_reduce"] == [True] * 4
    assert_same(ranks[0]["train_end"], ranks[1]["train_end"])
    weights = ranks[0]["train_end"]["model.layers.0.memory.fast_weights"]
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    assert kernels.available() or os.environ.get("TITANS_LIGHTNING_KERNELS") == "0" \
        or not os.environ.get("CI"), "the kernels are part of this check in CI"
