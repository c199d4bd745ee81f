"""TitansForecaster: what is scored, what is trained, and what the memory does in each stage."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import SinwaveDataModule
from titans_lightning.memory import STAT_NAMES
from titans_lightning.module import (TitansForecaster, capture_rng_states, forecast_loss,
                                     restore_rng_states, scored_pairs)


def tiny_module(**kwargs) -> TitansForecaster:
    return TitansForecaster(context_window=4, dim_feedforward=32, **kwargs)


def tiny_data() -> SinwaveDataModule:
    return SinwaveDataModule(context_window=4, n_sequences=20, seq_len=40)


def tiny_trainer(**kwargs) -> L.Trainer:
    options = dict(max_epochs=1, inference_mode=False, num_sanity_val_steps=0, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_train_batches=2)
    return L.Trainer(**{**options, **kwargs})


def test_loss_counts_only_positions_with_a_window_and_a_target():
    T = 6  # window C = 3: predictions exist from t = 2
    targets = torch.arange(T, dtype=torch.float32).view(1, T, 1)  # target at t is t
    preds = torch.full((1, T, 1), 1000.0)  # garbage where nothing is scored
    preds[0, 2:5, 0] = torch.tensor([3.0, 5.0, 5.0])  # forecasts of targets 3, 4, 5
    preds.requires_grad_(True)

    loss = forecast_loss(preds, targets, first=2)

    # errors 0, 1, 0 at t = 2, 3, 4; t = 5 has no target t+1, t < 2 no window
    assert loss.item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.all(preds.grad[0, [0, 1, 5]] == 0)
    scored_preds, scored_targets = scored_pairs(preds, targets, first=2)
    assert scored_preds.shape == scored_targets.shape == (1, 3, 1)
    assert scored_targets.flatten().tolist() == [3.0, 4.0, 5.0]


def test_optimizer_trains_outer_parameters_but_not_fast_weights_nor_keys_values():
    module = tiny_module()
    optimizer = module.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {name for name, p in module.named_parameters() if id(p) in optimized}

    assert names == {name for name, _ in module.named_parameters()}
    assert all(group["weight_decay"] == 0 for group in optimizer.param_groups)
    buffers = dict(module.named_buffers())
    for layer in range(2):
        memory = f"model.layers.{layer}.memory."
        assert memory + "fast_weights" in buffers
        assert memory + "strategy_state.key_proj" in buffers
        assert memory + "strategy_state.value_proj" in buffers
        assert not any(name.startswith(memory) for name in names)
        assert {f"model.layers.{layer}.persistent", f"model.layers.{layer}.query.weight",
                f"model.layers.{layer}.project.weight"} <= names
    assert {"model.emb.weight", "model.head.weight"} <= names


class StatsRecorder(L.Callback):
    """Reads ``pl_module.memory_stats`` the way TensorBoard callbacks do."""

    def __init__(self):
        self.seen: dict[str, list] = {"train": [], "val": [], "test": [], "predict": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["train"].append(pl_module.memory_stats)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self.seen["val"].append(pl_module.memory_stats)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self.seen["test"].append(pl_module.memory_stats)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self.seen["predict"].append(pl_module.memory_stats)


def test_memory_stats_of_each_batch_reach_callbacks_in_every_stage():
    recorder = StatsRecorder()
    module, data = tiny_module(), tiny_data()
    trainer = tiny_trainer(callbacks=[recorder])
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    trainer.predict(module, data)

    for stage, batches in recorder.seen.items():
        assert batches, stage
        for stats in batches:
            assert len(stats) == 2  # one entry per memory layer
            for layer in stats:
                assert set(layer) == set(STAT_NAMES)
                assert layer["surprise"].shape == (10, 1)  # 10 updates of the one shared slot


def test_memory_keeps_learning_in_validation_test_and_predict():
    module, data = tiny_module(), tiny_data()
    trainer = tiny_trainer(limit_train_batches=0)
    memory = module.model.memories[0]
    for run in (trainer.validate, trainer.test, trainer.predict):
        before, updates = memory.fast_weights.clone(), int(memory.num_updates)
        run(module, data)
        assert int(memory.num_updates) == updates + 10  # one batch of 2 sequences
        assert not torch.equal(memory.fast_weights, before)


class ModeRecorder(L.Callback):
    def __init__(self):
        self.training: dict[str, bool] = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dl_idx=0):
        self.training["val"] = pl_module.model.training

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dl_idx=0):
        self.training["test"] = pl_module.model.training

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.training["train"] = pl_module.model.training


@pytest.mark.parametrize("protocol, dropout_in_evaluation", [("default", False),
                                                             ("reference", True)])
def test_eval_protocol_decides_whether_dropout_stays_on(protocol, dropout_in_evaluation):
    recorder = ModeRecorder()
    # two epochs: the second epoch's training starts after a validation, back in train mode
    trainer = tiny_trainer(callbacks=[recorder], limit_train_batches=1, max_epochs=2)
    module = tiny_module(eval_protocol=protocol)
    trainer.fit(module, tiny_data())
    trainer.test(module, tiny_data(), verbose=False)
    assert recorder.training == {"train": True, "val": dropout_in_evaluation,
                                 "test": dropout_in_evaluation}


def test_unknown_eval_protocol_is_rejected():
    with pytest.raises(ValueError, match="eval_protocol must be one of"):
        tiny_module(eval_protocol="shuffled")


class SanityWatcher(L.Callback):
    def on_sanity_check_start(self, trainer, pl_module):
        self.before = {k: v.clone() for k, v in pl_module.model.named_buffers()}

    def on_sanity_check_end(self, trainer, pl_module):
        # Lightning calls this after the module's on_validation_end, where the memory is restored.
        self.after = {k: v.clone() for k, v in pl_module.model.named_buffers()}


def test_sanity_check_leaves_the_memory_as_it_was():
    watcher = SanityWatcher()
    trainer = tiny_trainer(callbacks=[watcher], num_sanity_val_steps=1, limit_train_batches=1)
    trainer.fit(tiny_module(), tiny_data())
    assert watcher.before.keys() == watcher.after.keys()
    assert all(torch.equal(watcher.before[k], watcher.after[k]) for k in watcher.before)


def test_inference_mode_is_refused_with_a_clear_message():
    trainer = tiny_trainer(inference_mode=True)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer.validate(tiny_module(), tiny_data())


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    path = tmp_path / "rng.pt"
    torch.save(capture_rng_states(), path)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_states(torch.load(path, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())

    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_reference_protocol_scores_from_position_15_with_missing_predictions_as_zero():
    import torch as _torch

    from titans_lightning.module import TitansForecaster

    module = TitansForecaster(context_window=20, dim_feedforward=8, eval_protocol="reference")
    seen = {}
    module.metrics["test"].update = lambda p, t: seen.update(p=p, t=t)
    module.log_dict = lambda *a, **k: None
    batch = {"inputs": _torch.randn(2, 40, 1), "targets": _torch.randn(2, 40, 1)}
    module.evaluate("test", batch)
    assert seen["p"].shape == (2, 40 - 16, 1)
    assert _torch.all(seen["p"][:, : 20 - 1 - 15] == 0)  # t = 15..18 have no window
    assert _torch.equal(seen["t"], batch["targets"][:, 16:])


def test_the_epoch_loss_is_summed_on_the_device_weighted_by_batch_size():
    module = tiny_module()
    module.add_to_epoch_loss(torch.tensor(1.0), 4)
    module.add_to_epoch_loss(torch.tensor(4.0), 1)
    total, count = module._train_loss_sum
    assert float(total) / count == pytest.approx(8.0 / 5)  # not the mean of the two, 2.5


class PoisonValidation(L.Callback):
    """Feeds a NaN prediction into the validation MSE of one epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if trainer.current_epoch == self.epoch:
            pl_module.metrics["val"].update(torch.full((1, 1), float("nan")), torch.zeros(1, 1))


def test_the_learning_curve_has_an_entry_per_epoch_and_null_for_a_nonfinite_score():
    module = tiny_module()
    trainer = tiny_trainer(max_epochs=3, limit_val_batches=1, callbacks=[PoisonValidation(1)])
    with pytest.warns(RuntimeWarning, match="epoch 1: val_mse not finite"):
        trainer.fit(module, datamodule=tiny_data())
    curve = module.curve
    assert [entry["epoch"] for entry in curve] == [0, 1, 2]
    assert curve[1]["val_mse"] is None
    for entry in curve:
        assert entry["train_loss"] is not None and np.isfinite(entry["train_loss"])
    assert np.isfinite(curve[0]["val_mse"]) and np.isfinite(curve[2]["val_mse"])
