"""SurpriseStatistics, GateRate and MemoryHealth: what reaches the loggers is what the memory
reported, per layer and split; non-finite values are left out; ranks are gathered. Their scalars
go through Lightning's logging (any logger, monitorable); histograms to TensorBoard only."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.tensorboard import SummaryWriter

from callbacks import GateRate, MemoryHealth, SurpriseStatistics
from callbacks.memory_statistics import EpochValues, gather_columns
from callbacks.surprise_statistics import batch_mean_and_max

SPLITS = ("train", "val", "test")
LAYERS = (0, 1)
RTOL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_fit, read_events, stats_recorder):
    """One tiny fit then test, with the three callbacks and a recorder of the memory's report."""
    recorder = stats_recorder()
    callbacks = [SurpriseStatistics(on_step=True), GateRate(), MemoryHealth(), recorder]
    trainer = tiny_fit(tmp_path_factory.mktemp("stats"), callbacks, test=True,
                       log_every_n_steps=1)
    return SimpleNamespace(trainer=trainer, events=read_events(trainer.log_dir),
                           recorder=recorder)


def only_value(run, tag: str) -> float:
    (event,) = run.events.Scalars(tag)  # one epoch: one value
    assert event.step == run.trainer.global_step
    assert math.isfinite(event.value)
    return event.value


def test_every_layer_and_split_is_logged_once_per_epoch(run):
    scalars = set(run.events.Tags()["scalars"])
    histograms = set(run.events.Tags()["histograms"])
    for layer in LAYERS:
        for split in SPLITS:
            prefix = f"memory/layer{layer}"
            expected = {f"{prefix}/surprise/{split}/{s}" for s in ("mean", "std", "min", "max")}
            expected |= {f"{prefix}/gate_rate/{split}", f"{prefix}/skipped/{split}"}
            expected |= {f"{prefix}/{n}/{split}{m}" for n in MemoryHealth.STATS
                         for m in ("", "/max")}
            assert expected <= scalars
            for tag in expected:
                only_value(run, tag)
            assert f"{prefix}/surprise/{split}" in histograms
    assert not any(tag.endswith("/nonfinite") for tag in scalars)  # nothing was skipped


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layer", LAYERS)
def test_surprise_statistics_match_the_memory_report(run, layer, split):
    surprise = run.recorder.values(split, layer, "surprise")
    # 10 updates per batch, one shared slot; 2 training batches, 1 of validation and of test
    assert surprise.numel() == 10 * len(run.recorder.batches[split]) > 0
    tag = f"memory/layer{layer}/surprise/{split}"
    expected = {"mean": surprise.mean(), "std": surprise.std(correction=0),
                "min": surprise.min(), "max": surprise.max()}
    for name, value in expected.items():
        assert only_value(run, f"{tag}/{name}") == pytest.approx(value.item(), rel=RTOL)
    (histogram,) = run.events.Histograms(tag)
    assert histogram.histogram_value.num == surprise.numel()
    assert histogram.histogram_value.min == pytest.approx(surprise.min().item(), rel=RTOL)
    assert histogram.histogram_value.max == pytest.approx(surprise.max().item(), rel=RTOL)
    assert histogram.histogram_value.sum == pytest.approx(surprise.sum().item(), rel=RTOL)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layer", LAYERS)
def test_gate_rate_and_skipped_count_match_the_memory_report(run, layer, split):
    gate_rate = run.recorder.values(split, layer, "gate_rate")
    skipped = run.recorder.values(split, layer, "skipped")
    prefix = f"memory/layer{layer}"
    assert only_value(run, f"{prefix}/gate_rate/{split}") == pytest.approx(
        gate_rate.mean().item(), rel=RTOL)
    assert only_value(run, f"{prefix}/skipped/{split}") == skipped.sum().item() == 0


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layer", LAYERS)
def test_memory_health_matches_the_memory_report(run, layer, split):
    for name in MemoryHealth.STATS:
        values = run.recorder.values(split, layer, name)
        tag = f"memory/layer{layer}/{name}/{split}"
        assert only_value(run, tag) == pytest.approx(values.mean().item(), rel=RTOL)
        assert only_value(run, f"{tag}/max") == pytest.approx(values.max().item(), rel=RTOL)


def test_the_scalars_reach_the_callback_metrics(run):
    """Logged through Lightning, so ModelCheckpoint or EarlyStopping can monitor them (the
    trainer keeps the latest stage's: the test's)."""
    metrics = run.trainer.callback_metrics
    rate = run.recorder.values("test", 0, "gate_rate").mean().item()
    assert metrics["memory/layer0/gate_rate/test"].item() == pytest.approx(rate, rel=RTOL)
    surprise = run.recorder.values("test", 1, "surprise").max().item()
    assert metrics["memory/layer1/surprise/test/max"].item() == pytest.approx(surprise, rel=RTOL)


@pytest.mark.parametrize("layer", LAYERS)
def test_per_step_surprise_is_the_training_batch_mean_at_lightnings_step(run, layer):
    prefix = f"memory/layer{layer}/surprise/train_step"
    means, highs = run.events.Scalars(f"{prefix}/mean"), run.events.Scalars(f"{prefix}/max")
    assert [e.step for e in means] == [e.step for e in highs] == [0, 1]  # as train/loss_step
    for mean, high, batch in zip(means, highs, run.recorder.batches["train"]):
        surprise = batch[layer]["surprise"].double()
        assert mean.value == pytest.approx(surprise.mean().item(), rel=RTOL)
        assert high.value == pytest.approx(surprise.max().item(), rel=RTOL)


def test_the_batch_surprise_leaves_non_finite_values_out_on_the_device():
    surprise = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    mean, high = batch_mean_and_max(surprise)
    assert (mean.item(), high.item()) == (2.0, 3.0)
    mean, high = batch_mean_and_max(torch.full((2, 1), float("nan")))
    assert math.isnan(mean.item()) and high.item() == -math.inf


# -- the accumulation ------------------------------------------------------------------------
def one_process() -> SimpleNamespace:
    return SimpleNamespace(trainer=SimpleNamespace(world_size=1), device=torch.device("cpu"))


def test_non_finite_values_are_left_out_and_counted(tmp_path, read_events):
    surprise = torch.tensor([[1.0], [float("nan")], [3.0], [float("inf")], [-float("inf")]])
    ones = torch.ones_like(surprise)
    batch = [{"surprise": surprise, "grad_norm": surprise.abs(), "update_norm": ones,
              "weight_norm": ones}]  # one layer, (U=5, S=1)
    writer = SummaryWriter(str(tmp_path))
    scalar = {}
    for callback in (SurpriseStatistics(), MemoryHealth()):
        values = EpochValues(callback.STATS)
        values.add(batch)
        (layer,) = values.gather(one_process(), n_layers=1)
        scalar.update(callback.scalars("memory/layer0", "train", layer))
        callback.media(writer, "memory/layer0", "train", layer, step=7)
    writer.close()

    tag = "memory/layer0/surprise/train"
    assert scalar[f"{tag}/nonfinite"] == 3
    assert scalar[f"{tag}/mean"] == 2.0 and scalar[f"{tag}/std"] == 1.0
    assert (scalar[f"{tag}/min"], scalar[f"{tag}/max"]) == (1.0, 3.0)
    histogram = read_events(tmp_path).Histograms(tag)[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max, histogram.sum) == (2, 1.0, 3.0, 4.0)
    assert scalar["memory/layer0/grad_norm/train"] == 2.0
    assert scalar["memory/layer0/grad_norm/train/max"] == 3.0


def test_an_epoch_keeps_device_tensors_and_starts_empty():
    values = EpochValues(("surprise", "skipped"))
    stats = {"surprise": torch.rand(4, 2), "skipped": torch.zeros(4, 2)}
    values.add([stats, {}])  # the second layer made no update
    values.add([stats, stats])
    first, second = values.gather(one_process(), n_layers=2)
    assert torch.equal(first["surprise"], torch.cat([stats["surprise"].reshape(-1)] * 2))
    assert second["surprise"].numel() == 8
    assert not values.batches  # gathering ends the epoch


class TwoRanks:
    """Stands in for a LightningModule on rank 0 of two, whose other rank holds ``other``."""

    def __init__(self, other: torch.Tensor):
        self.trainer = SimpleNamespace(world_size=2)
        self.device = torch.device("cpu")
        self.other = other

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:  # the sizes
            return torch.stack([tensor, torch.tensor(self.other.shape[1])])
        other = F.pad(self.other, (0, tensor.shape[1] - self.other.shape[1]))
        return torch.stack([tensor, other])


@pytest.mark.parametrize("n_mine, n_other", [(3, 5), (5, 3), (0, 2), (4, 4)])
def test_ranks_holding_different_counts_are_gathered_whole(n_mine, n_other):
    mine, other = torch.rand(2, n_mine), torch.rand(2, n_other)
    gathered = gather_columns(TwoRanks(other), mine)
    assert torch.equal(gathered, torch.cat([mine, other], dim=1))


def test_on_one_process_nothing_is_gathered():
    values = torch.rand(2, 3)
    assert gather_columns(one_process(), values) is values


def test_without_tensorboard_the_scalars_reach_another_logger(tmp_path, tiny_fit,
                                                              stats_recorder):
    """A CSVLogger alone gets every scalar; only the histograms are missing, with one warning."""
    recorder = stats_recorder()
    callbacks = [SurpriseStatistics(), GateRate(), MemoryHealth(), recorder]
    with pytest.warns(UserWarning) as caught:
        trainer = tiny_fit(tmp_path, callbacks, test=True, logger=CSVLogger(str(tmp_path)))
    messages = [str(w.message) for w in caught if "no TensorBoardLogger" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("SurpriseStatistics draws surprise "
                                                         "histograms")
    table = pd.read_csv(f"{trainer.log_dir}/metrics.csv")
    for split in SPLITS:
        tag = f"memory/layer1/surprise/{split}/mean"
        (value,) = table[tag].dropna()
        assert value == pytest.approx(recorder.values(split, 1, "surprise").mean().item(),
                                      rel=RTOL)
        (rate,) = table[f"memory/layer0/gate_rate/{split}"].dropna()
        assert rate == pytest.approx(recorder.values(split, 0, "gate_rate").mean().item())
        assert table[f"memory/layer0/update_norm/{split}/max"].notna().sum() == 1
