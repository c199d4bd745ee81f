"""benchmarks/throughput.py trains on the loss the module trains on (one scoring function)."""
import importlib.util
import json
from pathlib import Path

import pytest
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


def test_the_timed_model_is_the_rule_scope_and_order_asked_for():
    script = load_script()
    args = script.parse_args(["--strategy", "multi_step", "--scope", "per_sequence",
                              "--order", "causal", "--windows", "16"])
    model = script.build_model(args, 16)
    assert args.windows == [16] and model.C == 16 and model.memory_scope == "per_sequence"
    assert all(m.strategy.__name__.endswith("multi_step") for m in model.memories)
    assert all(type(layer).__name__ == "CausalMACLayer" for layer in model.layers)
    default = script.build_model(script.parse_args([]), 32)
    assert default.memory_scope == "shared" and type(default.layers[0]).__name__ == "MACLayer"
    assert all(m.strategy.__name__.endswith("titans_default") for m in default.memories)


def test_own_path_times_the_three_update_paths_it_names(monkeypatch):
    """benchmarks/own_path.py's premise: its three rules take the built-in rule's own path, the
    general path with the one-call surprise, and the general path with autograd's."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("own_path", SCRIPT.parent / "own_path.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from titans_lightning import kernels, memory_network, memory_update
    seen = []
    real_step, real_pair = kernels.momentum_step, memory_update.recall_error_and_gradient
    monkeypatch.setattr(kernels, "momentum_step",
                        lambda *a: seen.append("step") or real_step(*a))
    monkeypatch.setattr(memory_update, "recall_error_and_gradient",
                        lambda *a: seen.append("one call") or real_pair(*a))
    assert memory_network.recall_error_and_gradient is not memory_update.recall_error_and_gradient
    paths, surprises = {}, {}
    for key, rule in script.RULES.items():
        torch.manual_seed(0)
        memory = MACTitan(context_window=4, hidden_dim=16, dim_feedforward=16,
                          strategy=rule).memories[0]
        seen.clear()
        torch.manual_seed(1)
        with torch.no_grad():
            surprises[key] = memory.update(torch.randn(1, 8, 16))
        paths[key] = sorted(set(seen))
    assert paths == {"own": ["one call", "step"], "shortcut": ["one call"], "general": []}
    assert torch.equal(surprises["own"], surprises["shortcut"])
    torch.testing.assert_close(surprises["general"], surprises["own"])


def test_a_run_records_only_the_windows_and_setting_asked_for(monkeypatch, tmp_path):
    script = load_script()
    monkeypatch.setattr(script, "time_batches", lambda *args: [0.0])
    out = tmp_path / "times.jsonl"
    script.main(["--windows", "16", "--strategy", "multi_step", "--scope", "per_sequence",
                 "--order", "causal", "--out", str(out), "--threads", str(torch.get_num_threads())])
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(record["result"]) == ["eval_s_per_batch_c16", "train_s_per_batch_c16"]
    assert sorted(record["batch_seconds"]) == ["eval_c16", "train_c16"]
    assert (record["strategy"], record["memory_scope"], record["mac_order"]) == (
        "multi_step", "per_sequence", "causal")


def test_a_window_named_twice_is_refused(capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--windows", "16", "16"])
    assert "names a context window twice" in capsys.readouterr().err
