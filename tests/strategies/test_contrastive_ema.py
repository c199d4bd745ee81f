"""contrastive_ema: the InfoNCE surprise by hand, the EMA-blend factor, the row subsampling."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_lightning import NeuralMemory
from titans_lightning.strategies import contrastive_ema


def make_memory(**options):
    torch.manual_seed(0)
    return NeuralMemory(dim=4, hidden=8, strategy="contrastive_ema", options=options)


def mlp_by_hand(weights, k):
    """M(k) for one slot in NumPy: Linear, SiLU, Linear."""
    w1, b1, w2, b2 = (weights[n][0].double().numpy() for n in ("w1", "b1", "w2", "b2"))
    a = k @ w1.T + b1
    return (a / (1 + np.exp(-a))) @ w2.T + b2


def test_surprise_is_infonce_on_three_rows():
    tau = 0.5
    memory = make_memory(tau=tau)
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    surprise = contrastive_ema.compute_surprise(memory, keys, values)
    assert surprise.shape == (1,)

    out = mlp_by_hand(memory.weights, keys[0].double().numpy())
    v = values[0].double().numpy()
    loss = 0.0
    for i in range(3):
        a = out[i] / np.linalg.norm(out[i])
        logits = [a @ (v[j] / np.linalg.norm(v[j])) / tau for j in range(3)]
        loss += -math.log(math.exp(logits[i]) / sum(math.exp(l) for l in logits))
    assert surprise.item() == pytest.approx(loss / 3, rel=1e-5)


def contrastive_grads(memory, x, tau):
    """Gradient of a hand-written InfoNCE surprise with respect to each fast weight."""
    keys, values = contrastive_ema.compute_keys_values(memory, x)
    w = {n: t.detach().clone().requires_grad_(True) for n, t in memory.weights.items()}
    h = F.silu(keys @ w["w1"].transpose(1, 2) + w["b1"][:, None])
    out = F.normalize(h @ w["w2"].transpose(1, 2) + w["b2"][:, None], dim=-1)
    logits = out @ F.normalize(values, dim=-1).transpose(1, 2) / tau  # (S, R, R)
    target = torch.arange(logits.shape[1])
    loss = sum(F.cross_entropy(logits[s], target) for s in range(logits.shape[0]))
    return dict(zip(w, torch.autograd.grad(loss, list(w.values()))))


@pytest.mark.parametrize("beta, theta", [(0.9, 0.1), (0.5, 0.3)])
def test_update_is_the_documented_ema_blend_of_a_step(beta, theta):
    memory = make_memory(beta=beta, theta=theta, tau=0.2)
    x = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(4))
    w = {n: t.clone() for n, t in memory.weights.items()}
    grads = contrastive_grads(memory, x, tau=0.2)
    memory.update(x)
    for name in w:
        expected = beta * w[name] + (1 - beta) * (w[name] - theta * grads[name])
        torch.testing.assert_close(memory.weights[name], expected, rtol=1e-5, atol=1e-7)
        # the documented equivalent: a step of (1 - beta) * theta along -g
        torch.testing.assert_close(memory.weights[name] - w[name],
                                   -(1 - beta) * theta * grads[name], rtol=1e-4, atol=1e-7)


def test_momentum_and_retention_enter_the_stepped_weights():
    eta, theta, beta, alpha = 0.5, 0.2, 0.7, 0.9
    memory = make_memory(eta=eta, theta=theta, beta=beta, alpha=alpha)
    gen = torch.Generator().manual_seed(5)
    momentum = {n: torch.zeros_like(t) for n, t in memory.weights.items()}
    for _ in range(2):
        w = {n: t.clone() for n, t in memory.weights.items()}
        grads = {n: torch.randn(t.shape, generator=gen) for n, t in w.items()}
        memory.set_weights(contrastive_ema.apply_update(memory, grads, torch.tensor([1.0])))
        for name in w:
            momentum[name] = eta * momentum[name] - theta * grads[name]
            expected = beta * w[name] + (1 - beta) * (alpha * w[name] + momentum[name])
            torch.testing.assert_close(memory.weights[name], expected)


def test_long_chunks_use_evenly_strided_rows():
    assert contrastive_ema.strided_rows(10, 4).tolist() == [0, 2, 5, 7]
    assert contrastive_ema.strided_rows(1024, 256).tolist() == list(range(0, 1024, 4))
    assert contrastive_ema.strided_rows(3, 256).tolist() == [0, 1, 2]
    memory = make_memory(max_rows=4)
    g = torch.Generator().manual_seed(6)
    keys, values = torch.randn(1, 10, 4, generator=g), torch.randn(1, 10, 4, generator=g)
    rows = [0, 2, 5, 7]
    full = contrastive_ema.compute_surprise(memory, keys, values)
    subset = contrastive_ema.compute_surprise(memory, keys[:, rows], values[:, rows])
    torch.testing.assert_close(full, subset)


@pytest.mark.parametrize("seed", range(3))
def test_update_lowers_the_contrastive_surprise(seed):
    torch.manual_seed(seed)
    memory = NeuralMemory(dim=16, hidden=32, strategy="contrastive_ema")  # the model's sizes
    x = torch.randn(1, 64, 16)
    first = memory.update(x)
    assert memory.update(x).item() < first.item()
