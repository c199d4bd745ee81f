"""MemoryProfile: the surprise, gate rate and update norm over the position in the sequence, per
layer and split: the reduction over slots per update, the figures, the profile as scalars whose
step is the update, and, with per-sequence memory, chosen sequences one by one."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import MemoryProfile, RunCSVLogger
from callbacks.memory_profile import STATS, EpochProfile, figure_tag, scalar_tag

SPLITS = ("train", "val", "test")
LAYERS = (0, 1)
UPDATES = 10  # per sequence of the tiny fits: 37 windows in groups of 4


def one_process() -> SimpleNamespace:
    return SimpleNamespace(trainer=SimpleNamespace(world_size=1), device=torch.device("cpu"))


def batch_stats(surprise: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's ``{stat: (U, S)}`` with the gate rate and update norm derived from it."""
    return {"surprise": surprise, "gate_rate": surprise / 10, "update_norm": surprise * 2}


# -- the reduction -----------------------------------------------------------------------------
def test_each_update_is_reduced_over_the_slots_of_every_batch():
    first = torch.arange(12.0).reshape(3, 4)  # (U=3, S=4)
    second = 100 + torch.arange(6.0).reshape(3, 2)  # (U=3, S=2)
    profile_values = EpochProfile(sequences=[])
    profile_values.add([batch_stats(first)], index=None)
    profile_values.add([batch_stats(second)], index=None)
    (profile,) = profile_values.reduce(one_process(), n_layers=1, across_ranks=False)

    both = torch.cat([first, second], dim=1)  # (U, 6)
    assert torch.allclose(profile.mean[0], both.mean(1))
    assert torch.allclose(profile.low[0], both.quantile(0.1, dim=1))
    assert torch.allclose(profile.high[0], both.quantile(0.9, dim=1))
    assert torch.allclose(profile.mean[1], both.mean(1) / 10)  # the gate rate
    assert torch.allclose(profile.high[2], both.quantile(0.9, dim=1) * 2)  # the update norm
    assert profile.count.tolist() == [[6] * 3] * 3
    assert profile.sequences == {}
    assert not profile_values.batches  # reducing ends the epoch


def test_skipped_updates_and_shorter_sequences_are_left_out_per_update():
    long = torch.tensor([[1.0], [2.0], [float("nan")], [4.0]])  # (U=4, S=1): update 2 skipped
    short = torch.tensor([[3.0], [float("inf")]])  # (U=2, S=1)
    profile_values = EpochProfile(sequences=[])
    profile_values.add([batch_stats(long)], index=None)
    profile_values.add([batch_stats(short), {}], index=None)  # layer 1: no update here
    first, second = profile_values.reduce(one_process(), n_layers=2, across_ranks=False)
    mean = first.mean[0]  # the surprise: (1 + 3) / 2, 2 (inf left out), none, 4
    assert mean[[0, 1, 3]].tolist() == [2.0, 2.0, 4.0] and mean[2].isnan()
    assert first.count[0].tolist() == [2, 1, 0, 1]
    assert second is None


def test_chosen_sequences_are_kept_one_by_one_and_averaged_over_copies():
    surprise = torch.tensor([[1.0, 2.0, float("nan")],
                             [4.0, 5.0, float("nan")]])  # (U=2, S=3): slot 2 diverged
    profile_values = EpochProfile(sequences=[7, 3, 9])
    profile_values.add([batch_stats(surprise)], index=torch.tensor([3, 8, 5]))
    profile_values.add([batch_stats(surprise + 10)], index=torch.tensor([7, 3, 1]))
    (profile,) = profile_values.reduce(one_process(), n_layers=1, across_ranks=False)

    assert sorted(profile.sequences) == [3, 7]  # 9 was never seen
    assert profile.sequences[7][0].tolist() == [11.0, 14.0]
    assert profile.sequences[3][0].tolist() == [(1.0 + 12.0) / 2, (4.0 + 15.0) / 2]
    assert profile.sequences[3][2].tolist() == [13.0, 19.0]  # update norm = 2 x surprise


def test_the_figure_draws_band_mean_and_sequences_against_the_update():
    surprise = torch.rand(5, 4)  # (U=5, S=4)
    profile_values = EpochProfile(sequences=[0, 2])
    profile_values.add([batch_stats(surprise)], index=torch.arange(4))
    (profile,) = profile_values.reduce(one_process(), n_layers=1, across_ranks=False)

    figure = MemoryProfile().draw(profile, layer=0, split="val")
    assert len(figure.axes) == len(STATS)
    for j, ax in enumerate(figure.axes):
        mean, *sequences = ax.get_lines()
        assert mean.get_xdata().tolist() == list(range(5))
        assert mean.get_ydata() == pytest.approx(profile.mean[j].tolist())
        assert [line.get_label() for line in sequences] == ["sequence 0", "sequence 2"]
        assert sequences[1].get_ydata() == pytest.approx(
            batch_stats(surprise)[STATS[j]][:, 2].tolist())
        (band,) = ax.collections
        assert band.get_label() == "10-90%"
    assert figure.axes[0].get_title().startswith("memory layer 0, val")


def test_negative_sequences_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        MemoryProfile(sequences=[0, -1])


# -- in a fit ----------------------------------------------------------------------------------
class KeepsDrawn(MemoryProfile):
    """Keeps what each figure was drawn from: ``drawn[(layer, split)]`` = the last Profile."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn = {}

    def draw(self, profile, layer, split):
        self.drawn[(layer, split)] = profile
        return super().draw(profile, layer, split)


def last_epoch(recorder, split: str, epochs: int) -> tuple[list, list]:
    """The recorded batches and their indices of the split's last epoch (one test)."""
    per_epoch = len(recorder.batches[split]) // (1 if split == "test" else epochs)
    return recorder.batches[split][-per_epoch:], recorder.indices[split][-per_epoch:]


def fit_with_profile(directory, tiny_fit, read_events, stats_recorder, scope, epochs):
    recorder, callback = stats_recorder(), KeepsDrawn(sequences=[0, 1, 40])
    loggers = [TensorBoardLogger(str(directory), name="tiny", version=0),
               RunCSVLogger(str(directory), name="tiny", version=0)]
    trainer = tiny_fit(directory, [callback, recorder], max_epochs=epochs, test=True,
                       memory_scope=scope, logger=loggers)
    return SimpleNamespace(trainer=trainer, events=read_events(trainer.log_dir),
                           recorder=recorder, callback=callback, epochs=epochs)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_fit, read_events, stats_recorder):
    return fit_with_profile(tmp_path_factory.mktemp("shared"), tiny_fit, read_events,
                            stats_recorder, "shared", epochs=2)


@pytest.fixture(scope="module")
def per_sequence(tmp_path_factory, tiny_fit, read_events, stats_recorder):
    return fit_with_profile(tmp_path_factory.mktemp("per_sequence"), tiny_fit, read_events,
                            stats_recorder, "per_sequence", epochs=1)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layer", LAYERS)
def test_a_figure_per_epoch_layer_and_split_at_the_epochs_step(shared, layer, split):
    images = shared.events.Images(figure_tag(layer, split))
    steps = [4] if split == "test" else [2, 4]  # 2 batches per epoch; the test after epoch 1
    assert [image.step for image in images] == steps
    assert all((image.width, image.height) == (800, 600) for image in images)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layer", LAYERS)
def test_the_profile_scalars_are_the_last_epochs_values_per_update(shared, layer, split):
    """Training and validation of the fit's last epoch (written at the fit's end), the test's
    at its end; one value per update, step = the update."""
    recorded, _ = last_epoch(shared.recorder, split, shared.epochs)
    for stat in STATS:
        values = torch.cat([b[layer][stat] for b in recorded], dim=1).double()  # (U, N)
        expected = {"mean": values.mean(1), "p10": values.quantile(0.1, dim=1),
                    "p90": values.quantile(0.9, dim=1)}
        for series, line in expected.items():
            events = shared.events.Scalars(scalar_tag(layer, stat, split, series))
            assert [e.step for e in events] == list(range(UPDATES))
            assert [e.value for e in events] == pytest.approx(line.tolist(), rel=1e-5)


def test_the_profile_scalars_reach_every_logger(shared):
    import pandas as pd

    table = pd.read_csv(f"{shared.trainer.log_dir}/metrics.csv")
    rows = table.dropna(subset=[scalar_tag(1, "surprise", "test", "mean")])
    assert rows["step"].tolist() == list(range(UPDATES))
    events = shared.events.Scalars(scalar_tag(1, "surprise", "test", "mean"))
    assert rows[scalar_tag(1, "surprise", "test", "mean")].tolist() == pytest.approx(
        [e.value for e in events], rel=1e-6)


def test_shared_memory_draws_no_single_sequences(shared):
    assert all(profile.sequences == {} for profile in shared.callback.drawn.values())


@pytest.mark.parametrize("split", SPLITS)
def test_per_sequence_memory_draws_the_chosen_sequences_as_they_were(per_sequence, split):
    batches, indices = last_epoch(per_sequence.recorder, split, per_sequence.epochs)
    for layer in LAYERS:
        profile = per_sequence.callback.drawn[(layer, split)]
        seen = {int(s) for index in indices for s in index if int(s) in (0, 1, 40)}
        assert sorted(profile.sequences) == sorted(seen) and 40 not in seen
        assert seen or split == "train"  # validation and test hold sequences 0 and 1
        for sequence in seen:
            ((b, row),) = [(b, int((index == sequence).nonzero()))
                           for b, index in enumerate(indices) if (index == sequence).any()]
            for j, stat in enumerate(STATS):
                assert torch.allclose(profile.sequences[sequence][j],
                                      batches[b][layer][stat][:, row])
        slots = sum(index.numel() for index in indices)  # one slot per sequence
        assert profile.count.tolist() == [[slots] * UPDATES] * len(STATS)


def test_without_matplotlib_only_the_figures_are_missing(tmp_path, tiny_fit, read_events,
                                                         monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.warns(UserWarning, match="MemoryProfile needs matplotlib") as caught:
        trainer = tiny_fit(tmp_path, [MemoryProfile()], test=True)
    assert sum("needs matplotlib" in str(w.message) for w in caught) == 1
    events = read_events(trainer.log_dir)
    assert not events.Tags()["images"]
    assert len(events.Scalars(scalar_tag(0, "gate_rate", "val", "mean"))) == UPDATES
