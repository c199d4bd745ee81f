"""One step axis: every epoch-level scalar, figure and histogram of an epoch sits at the optimizer
steps taken when it ends, (epoch + 1) x batches, for training and validation alike (Lightning on
its own puts them at the last batch's index, and the memory callbacks used the global step); a
test sits at the step of the checkpoint it scores, as does its ``epoch``. TensorBoard and
metrics.csv agree."""
from __future__ import annotations

import pandas as pd
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

BATCHES = 2  # per training epoch in the tiny fit
EPOCH_STEPS = [BATCHES, 2 * BATCHES]  # the two epochs


@pytest.fixture(scope="module")
def run(logged_run, read_events):
    trainer, best, folder = logged_run
    return trainer, best, folder, read_events(folder)


def steps(events, tag, kind="Scalars"):
    return [e.step for e in getattr(events, kind)(tag)]


@pytest.mark.parametrize("tag", [
    "train/loss", "val/mse", "val/mae",
    "memory/layer0/surprise/train/mean", "memory/layer1/surprise/val/max",
    "memory/layer0/gate_rate/train", "memory/layer1/gate_rate/val",
    "memory/layer0/update_norm/val", "memory/layer1/skipped/train"])
def test_an_epochs_training_and_validation_scalars_share_its_step(run, tag):
    *_, events = run
    assert steps(events, tag) == EPOCH_STEPS


@pytest.mark.parametrize("tag, kind", [
    ("memory/layer0/surprise/train", "Histograms"), ("memory/layer1/surprise/val", "Histograms"),
    ("memory/layer0/profile/train", "Images"), ("memory/layer1/profile/val", "Images"),
    ("forecast/val", "Images")])
def test_figures_and_histograms_sit_beside_the_scalars(run, tag, kind):
    *_, events = run
    assert steps(events, tag, kind) == EPOCH_STEPS


def test_the_test_sits_at_the_step_and_epoch_of_the_checkpoint_it_scores(run):
    trainer, best, _, events = run
    step = best["global_step"]
    assert step in EPOCH_STEPS and trainer.global_step == EPOCH_STEPS[-1]
    for tag in ("test/mse", "memory/layer0/surprise/test/mean", "memory/layer1/gate_rate/test"):
        assert steps(events, tag) == [step]
    assert steps(events, "memory/layer0/profile/test", "Images") == [step]
    assert steps(events, "memory/layer0/surprise/test", "Histograms") == [step]
    epoch = {e.step: e.value for e in events.Scalars("epoch")}  # the test's is the last one
    assert [e.value for e in events.Scalars("epoch")][-1] == best["epoch"]
    assert epoch[EPOCH_STEPS[0]] == 0


def test_a_fresh_trainer_testing_a_checkpoint_logs_at_its_step(run, read_events):
    _, best, folder, _ = run
    events = read_events(folder.parent / "version_1")
    (test,) = events.Scalars("test/mse")
    assert test.step == best["global_step"] > 0  # not the fresh trainer's global step, 0


def test_metrics_csv_has_the_same_steps_and_epochs(run):
    _, best, folder, _ = run
    table = pd.read_csv(folder / "metrics.csv")
    for column in ("train/loss", "val/mse", "memory/layer0/surprise/val/mean"):
        rows = table.dropna(subset=[column])
        assert rows["step"].tolist() == EPOCH_STEPS
        assert rows["epoch"].tolist() == [0, 1]
    (test,) = table.dropna(subset=["test/mse"]).itertuples()
    assert (test.step, test.epoch) == (best["global_step"], best["epoch"])


def test_checkpoints_saved_within_an_epoch_are_named_by_their_own_step(tmp_path, tiny_fit):
    """ModelCheckpoint names files by a logged `step` and `epoch` where there are some: those of
    the epoch before must not name (and overwrite) the checkpoints of the next one."""
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=1,
                                 save_top_k=-1)
    tiny_fit(tmp_path, [checkpoint], max_epochs=2, limit_train_batches=3,
             enable_checkpointing=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"epoch={(s - 1) // 3}-step={s}.ckpt" for s in range(1, 7)]
