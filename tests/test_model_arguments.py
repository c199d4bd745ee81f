"""Impossible model settings are refused before anything is built, in one line naming the
setting as the CLI spells it, its value and what is allowed: directly and through the CLI."""
import pytest

from titans_lightning import MACTitan
from titans_lightning.cli import TitansCLI

BAD = {  # argument=value: the one line it must give
    "pm_len=-1": "--model.pm_len=-1 is not allowed: it must be at least 0 (0: no "
                 "persistent-memory tokens)",
    "hidden_dim=0": "--model.hidden_dim=0 is not allowed: it must be at least 1",
    "hidden_dim=-4": "--model.hidden_dim=-4 is not allowed: it must be at least 1",
    "nhead=3": "--model.nhead=3 is not allowed: it must be a divisor of --model.hidden_dim=16: "
               "[1, 2, 4, 8, 16]",
    "nhead=0": "--model.nhead=0 is not allowed: it must be a divisor of --model.hidden_dim=16: "
               "[1, 2, 4, 8, 16]",
    "nhead=-2": "--model.nhead=-2 is not allowed: it must be a divisor of --model.hidden_dim=16: "
                "[1, 2, 4, 8, 16]",
    "num_layers=0": "--model.num_layers=0 is not allowed: it must be at least 1",
    "memory_hidden=0": "--model.memory_hidden=0 is not allowed: it must be at least 1",
    "dim_feedforward=0": "--model.dim_feedforward=0 is not allowed: it must be at least 1",
    "context_window=0": "--model.context_window=0 is not allowed: it must be at least 1",
    "memory_layers=3": "--model.memory_layers=3 is not allowed: it must be 1 or 2",
}


def parse(setting: str) -> tuple[str, int]:
    name, value = setting.split("=")
    return name, int(value)


@pytest.mark.parametrize("setting", list(BAD))
def test_model_refuses_the_setting_before_building_anything(setting, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a memory was built before the arguments were checked")

    monkeypatch.setattr("titans_lightning.model.NeuralMemory", built)
    name, value = parse(setting)
    with pytest.raises(ValueError) as info:
        MACTitan(**{name: value})
    assert str(info.value) == BAD[setting]


# context_window is left out: it is linked to the datamodule's, which refuses it first
@pytest.mark.parametrize("setting", [s for s in BAD if not s.startswith("context_window")])
def test_cli_reports_the_same_line(setting, in_tmp, tiny_sinwave):
    name, value = parse(setting)
    with pytest.raises(ValueError) as info:
        TitansCLI(["fit", *tiny_sinwave, f"--model.{name}", str(value),
                   "--trainer.max_epochs", "1"])
    assert str(info.value) == BAD[setting]


def test_smallest_allowed_settings_build():
    model = MACTitan(context_window=1, hidden_dim=1, nhead=1, pm_len=0, num_layers=1,
                     memory_layers=1, memory_hidden=1, dim_feedforward=1)
    assert len(model.layers) == 1
