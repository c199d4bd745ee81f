"""A fit stopped after one epoch and resumed from last.ckpt ends exactly where an uninterrupted
fit ends: same outer parameters, same memory fast weights and strategy state, same optimiser."""
from __future__ import annotations

from pathlib import Path

import torch

from titans_lightning.cli import TitansCLI


def last_checkpoint(cli: TitansCLI) -> dict:
    path = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert path.name == "last.ckpt"
    return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resumed_fit_matches_an_uninterrupted_one(tiny_sinwave, in_tmp):
    straight = last_checkpoint(TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2"]))
    first_epoch = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1"])
    resumed = last_checkpoint(TitansCLI([
        "fit", *tiny_sinwave, "--trainer.max_epochs", "2",
        "--ckpt_path", first_epoch.trainer.checkpoint_callback.last_model_path]))

    assert straight["epoch"] == resumed["epoch"] == 1
    assert straight["global_step"] == resumed["global_step"]
    state = straight["state_dict"]
    memory = [name for name in state if ".memory." in name]
    assert any(name.endswith("memory.fast_weights") for name in memory)
    assert any(".strategy_state." in name for name in memory)
    assert int(state["model.layers.0.memory.num_updates"]) > 0
    assert_same_tensors(state, resumed["state_dict"])
    for a, b in zip(straight["optimizer_states"], resumed["optimizer_states"]):
        for param in a["state"]:
            assert_same_tensors(a["state"][param], b["state"][param])
