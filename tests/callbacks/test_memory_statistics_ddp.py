"""Under DDP (two CPU processes) the memory statistics are written once, by rank 0, each update
counted once: per slot of every rank with per-sequence memory, once for the shared memory (whose
update every rank applies after the all-reduce)."""
from __future__ import annotations

import math
import multiprocessing
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist

from callbacks import GateRate, MemoryProfile, SurpriseStatistics
from callbacks.memory_profile import scalar_tag

# Forked, not spawned, processes: they start in well under a second instead of re-importing all.
pytestmark = pytest.mark.skipif(
    not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed and the fork start method")


class RankRecorder(L.Callback):
    """Saves, per rank, the surprise and gate rate its memory reported in each split."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.values: dict[str, dict[str, list[torch.Tensor]]] = {}

    def record(self, split, pl_module):
        for layer, stats in enumerate(pl_module.memory_stats):
            for name in ("surprise", "gate_rate"):
                key = f"{split}/{layer}/{name}"
                self.values.setdefault(key, []).append(stats[name].reshape(-1).clone())
            self.values.setdefault(f"{split}/{layer}/profile", []).append(
                stats["surprise"].clone())  # (U, S)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.record("train", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, *args):
        self.record("val", pl_module)

    def on_fit_end(self, trainer, pl_module):
        values = {key: torch.cat(parts, dim=1 if key.endswith("profile") else 0)
                  for key, parts in self.values.items()}
        torch.save(values, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("scope", ["shared", "per_sequence"])
def test_every_update_is_counted_once(tmp_path, tiny_fit, read_events, scope):
    """Per-sequence training splits the batch's slots across ranks (gathered); the shared
    memory's training updates and every validation update are the same on every rank (rank 0's
    are written, not doubled)."""
    callbacks = [SurpriseStatistics(), GateRate(), MemoryProfile(), RankRecorder(tmp_path)]
    trainer = tiny_fit(tmp_path, callbacks, accelerator="cpu", devices=2, strategy="ddp_fork",
                       use_distributed_sampler=False, memory_scope=scope)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    (log_dir,) = (tmp_path / "tiny").glob("version_*")  # one writer: rank 0's
    events = read_events(log_dir)
    for key in ranks[0]:
        split, layer, name = key.split("/")
        if split == "train" and scope == "per_sequence":
            both = torch.cat([rank[key] for rank in ranks], dim=-1).double()
            assert both.numel() == 2 * ranks[0][key].numel()
        else:
            assert torch.equal(ranks[0][key], ranks[1][key])
            both = ranks[0][key].double()
        if name == "surprise":
            tag = f"memory/layer{layer}/surprise/{split}"
            (histogram,) = events.Histograms(tag)
            assert histogram.histogram_value.num == both.numel()
            (mean,) = events.Scalars(f"{tag}/mean")
            (low,), (high,) = events.Scalars(f"{tag}/min"), events.Scalars(f"{tag}/max")
            assert mean.value == pytest.approx(both.mean().item(), rel=1e-5)
            assert (low.value, high.value) == pytest.approx((both.min().item(),
                                                             both.max().item()), rel=1e-5)
        elif name == "profile":  # (U, N): the mean over every slot at each update
            events_of_update = events.Scalars(scalar_tag(int(layer), "surprise", split, "mean"))
            assert [e.step for e in events_of_update] == list(range(both.shape[0]))
            assert [e.value for e in events_of_update] == pytest.approx(
                both.mean(1).tolist(), rel=1e-5)
        else:
            (rate,) = events.Scalars(f"memory/layer{layer}/gate_rate/{split}")
            assert math.isclose(rate.value, both.mean().item(), rel_tol=1e-5)
