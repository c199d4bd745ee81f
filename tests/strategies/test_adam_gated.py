"""adam_gated: the surprise gate, the bias-corrected Adam step, and nothing moving when closed."""
import numpy as np
import pytest
import torch

from titans_lightning import NeuralMemory
from titans_lightning.strategies import adam_gated

LR, B1, B2, EPS, ALPHA = 0.01, 0.9, 0.999, 1e-8, 0.99


def make_memory(**options):
    torch.manual_seed(0)
    return NeuralMemory(dim=4, hidden=8, strategy="adam_gated", options=options)


def snapshot(memory):
    return {name: value.clone() for name, value in memory.state.items()}


def test_gate_closes_on_familiar_chunks_and_opens_on_a_surprising_one():
    memory = make_memory(warmup=3, k=1.0)
    g = torch.Generator().manual_seed(1)
    familiar = torch.randn(1, 6, 4, generator=g)
    for _ in range(7):
        memory.update(familiar)
    before_weights, before_state = memory.fast_weights.clone(), snapshot(memory)
    memory.update(familiar)
    gates = memory.pop_history()["gate_rate"].flatten().tolist()
    assert gates == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # warm-up, then nothing new
    # closed: no step, no retention, moments and step count untouched; statistics still move
    assert torch.equal(memory.fast_weights, before_weights)
    for name in before_state:
        if name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(memory.state[name], before_state[name]), name
    assert float(memory.state["seen"]) == float(before_state["seen"]) + 1
    assert not torch.equal(memory.state["surprise_mean"], before_state["surprise_mean"])

    surprising = 10 * torch.randn(1, 6, 4, generator=g)
    surprise = memory.update(surprising)
    assert float(surprise) > float(before_state["surprise_mean"]) * 10
    assert memory.pop_history()["gate_rate"].flatten().tolist() == [1.0]
    assert not torch.equal(memory.fast_weights, before_weights)
    assert float(memory.state["step"]) == 4.0
    assert int(memory.skipped_updates) == 0


def test_gate_threshold_is_mean_plus_k_running_std():
    memory = make_memory(warmup=0, k=2.0, gamma=0.5)
    opt = {**adam_gated.DEFAULTS, **memory.options}
    memory.state["seen"] = torch.tensor([3.0])
    memory.state["surprise_mean"] = torch.tensor([1.0])
    memory.state["surprise_var"] = torch.tensor([0.25])  # std 0.5: threshold 2.0
    assert not adam_gated._gate_and_track(memory, torch.tensor([1.99]), opt).item()
    # the statistics folded 1.99 in: mean 1 + 0.5 * 0.99, var 0.5 * (0.25 + 0.5 * 0.99^2)
    assert memory.state["surprise_mean"].item() == pytest.approx(1.495)
    assert memory.state["surprise_var"].item() == pytest.approx(0.5 * (0.25 + 0.5 * 0.99**2))
    memory.state["surprise_mean"] = torch.tensor([1.0])
    memory.state["surprise_var"] = torch.tensor([0.25])
    assert adam_gated._gate_and_track(memory, torch.tensor([2.01]), opt).item()


def adam_by_hand(w, grads_seq, lr=LR, b1=B1, b2=B2, eps=EPS, alpha=ALPHA):
    """Bias-corrected Adam with retention, one weight array, float64."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads_seq, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        w = alpha * w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return w


def test_open_step_is_bias_corrected_adam_with_retention():
    memory = make_memory(lr=LR, beta1=B1, beta2=B2, eps=EPS, alpha=ALPHA, warmup=10)
    start = {n: w.double().numpy().copy() for n, w in memory.weights.items()}
    g = torch.Generator().manual_seed(2)
    grads_seq = [{n: torch.randn(w.shape, generator=g) for n, w in memory.weights.items()}
                 for _ in range(2)]
    for grads in grads_seq:  # two open steps: t = 1 and t = 2 bias corrections
        new = adam_gated.apply_update(memory, grads, torch.tensor([1.0]))
        memory.set_weights(new)
    assert memory.state["step"].item() == 2.0
    for name, w0 in start.items():
        expected = adam_by_hand(w0, [gs[name].double().numpy() for gs in grads_seq])
        np.testing.assert_allclose(memory.weights[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_closed_gate_returns_the_weights_unchanged():
    memory = make_memory(warmup=0, k=0.0)
    memory.state["seen"] = torch.tensor([5.0])
    memory.state["surprise_mean"] = torch.tensor([2.0])
    memory.state["surprise_var"] = torch.tensor([0.1])
    before_weights, before_state = memory.weights, snapshot(memory)
    grads = {n: torch.ones_like(w) for n, w in memory.weights.items()}
    new = adam_gated.apply_update(memory, grads, torch.tensor([1.0]))  # below the mean
    for name, w in before_weights.items():
        assert torch.equal(new[name], w)
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(memory.state[name], before_state[name])


def test_gate_is_per_slot():
    memory = make_memory(warmup=0, k=0.0)
    memory.state["seen"] = torch.tensor([5.0, 5.0])
    memory.state["surprise_mean"] = torch.tensor([1.0, 1.0])
    memory.state["surprise_var"] = torch.tensor([0.0, 0.0])
    weights = {n: w.expand(2, *w.shape[1:]).clone() for n, w in memory.weights.items()}
    memory.set_weights(weights)
    grads = {n: torch.ones_like(w) for n, w in weights.items()}
    new = adam_gated.apply_update(memory, grads, torch.tensor([0.5, 3.0]))  # closed, open
    for name, w in weights.items():
        assert torch.equal(new[name][0], w[0])
        assert not torch.equal(new[name][1], w[1])
    assert memory._gate.tolist() == [0.0, 1.0]  # what report_gate was told
    assert memory.state["step"].tolist() == [0.0, 1.0]
