"""titans_default: the momentum rule by hand, two updates in a row, and a surprise that drops."""
import pytest
import torch
import torch.nn.functional as F

from titans_lightning import NeuralMemory
from titans_lightning.strategies import titans_default


def squared_error_grads(memory, x):
    """Keys, values and the gradient of the default surprise, written out independently."""
    K, V = memory.state["key_proj"], memory.state["value_proj"]
    keys = F.normalize(F.silu(x @ K.T), dim=-1)
    values = F.silu(x @ V.T)
    w = {n: t.detach().clone().requires_grad_(True) for n, t in memory.weights.items()}
    h = F.silu(keys @ w["w1"].transpose(1, 2) + w["b1"][:, None])
    out = h @ w["w2"].transpose(1, 2) + w["b2"][:, None]
    loss = ((out - values) ** 2).mean(1).sum()  # sum over features of the mean over rows
    return dict(zip(w, torch.autograd.grad(loss, list(w.values()))))


def test_two_updates_follow_the_momentum_formulas():
    alpha, eta, theta = 0.9, 0.5, 0.2
    torch.manual_seed(0)
    memory = NeuralMemory(dim=4, hidden=8, strategy="titans_default",
                          options={"alpha": alpha, "eta": eta, "theta": theta})
    gen = torch.Generator().manual_seed(1)
    momentum = {n: torch.zeros_like(t) for n, t in memory.weights.items()}
    for _ in range(2):  # the second update must carry the first one's momentum
        x = torch.randn(1, 5, 4, generator=gen)
        w = {n: t.clone() for n, t in memory.weights.items()}
        grads = squared_error_grads(memory, x)
        memory.update(x)
        for name in w:
            momentum[name] = eta * momentum[name] - theta * grads[name]
            stored = memory.unflatten(memory.state["momentum"])[name]
            torch.testing.assert_close(stored, momentum[name])
            torch.testing.assert_close(memory.weights[name], alpha * w[name] + momentum[name])


def test_first_step_on_a_tiny_case_by_hand():
    """One-layer memory, one row, every number checkable on paper."""
    memory = NeuralMemory(dim=2, num_layers=1, strategy="titans_default",
                          options={"alpha": 0.5, "eta": 0.9, "theta": 0.1})
    memory.state["key_proj"] = torch.eye(2)
    memory.state["value_proj"] = torch.eye(2)
    memory.set_weights({"w": torch.zeros(1, 2, 2), "b": torch.ones(1, 2)})
    x = torch.tensor([[[3.0, 4.0]]])
    memory.update(x)
    k = F.normalize(F.silu(x[0, 0]), dim=0)  # key
    v = F.silu(x[0, 0])  # value
    err = torch.ones(2) - v  # M(k) = w k + b = b: error per feature
    g_w, g_b = 2 * err[:, None] * k[None, :], 2 * err  # d/dw and d/db of sum_f err_f^2
    torch.testing.assert_close(memory.weights["w"][0], 0.5 * torch.zeros(2, 2) - 0.1 * g_w)
    torch.testing.assert_close(memory.weights["b"][0], 0.5 * torch.ones(2) - 0.1 * g_b)


@pytest.mark.parametrize("seed", range(3))
def test_update_on_a_repeated_chunk_lowers_the_surprise(seed):
    torch.manual_seed(seed)
    memory = NeuralMemory(dim=16, hidden=32, strategy="titans_default")  # benchmark settings
    x = torch.randn(1, 64, 16)
    first = memory.update(x)
    assert memory.update(x).item() < first.item()


def test_defaults_are_the_benchmark_values():
    assert titans_default.DEFAULTS == {"alpha": 0.999, "eta": 0.9, "theta": 0.01}
