"""benchmarks/throughput.py trains on the loss the module trains on (one scoring function)."""
import importlib.util
from pathlib import Path

import torch

from titans_lightning import MACTitan
from titans_lightning import module as forecaster

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def load_script():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_a_timed_training_batch_is_scored_by_the_modules_loss(monkeypatch):
    script = load_script()
    calls = []

    def spy(preds, targets, first):
        calls.append((preds.shape, targets, first))
        return forecaster.forecast_loss(preds, targets, first)

    monkeypatch.setattr(script, "forecast_loss", spy)
    torch.manual_seed(0)
    model = MACTitan(context_window=4, hidden_dim=8, dim_feedforward=8, memory_hidden=8)
    batch = torch.sin(torch.linspace(0, 6, 20)).repeat(2, 1)[..., None]  # (2, 20, 1)
    before = [p.detach().clone() for p in model.parameters()]
    script.time_batches(model, batch, train=True, n=1, warmup=0)
    ((shape, targets, first),) = calls
    assert shape == (2, 20, 1) and targets is batch and first == 3  # C - 1, as the module
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
