"""The CPU encoder layer computes what nn.TransformerEncoderLayer computes."""
import math

import pytest
import torch
import torch.nn.functional as F

from titans_lightning import encoder as enc


def pair(d=16, f=40):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(d, 2, f, 0.1, activation=F.silu, batch_first=True)
    mine = enc.EncoderLayer(d, 2, f, 0.1)
    mine.load_state_dict(ref.state_dict())
    return ref.double(), mine.double()


def test_eval_forward_and_gradients_equal_the_library_layer(monkeypatch):
    monkeypatch.setattr(enc, "CHUNK_ROWS", 7)  # several chunks and a ragged last one
    ref, mine = pair()
    ref.eval(), mine.eval()
    x = torch.randn(5, 9, 16, dtype=torch.double, requires_grad=True)
    a, b = ref(x), mine(x)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *ref.parameters()], g)
    gb = torch.autograd.grad(b, [x, *mine.parameters()], g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-11)


def test_training_feed_forward_equals_explicit_mask(monkeypatch):
    """With the dropped positions fixed, forward and backward equal a dense-mask computation."""
    monkeypatch.setattr(enc, "CHUNK_ROWS", 4)
    torch.manual_seed(1)
    M, d, f, p = 11, 6, 10, 0.3
    x = torch.randn(M, d, dtype=torch.double, requires_grad=True)
    w1, b1 = torch.randn(f, d, dtype=torch.double), torch.randn(f, dtype=torch.double)
    w2, b2 = torch.randn(d, f, dtype=torch.double), torch.randn(d, dtype=torch.double)
    params = [w.requires_grad_(True) for w in (w1, b1, w2, b2)]
    pos = torch.tensor([0, 3, 17, 18, 40, 59, 60, 99, 109])
    monkeypatch.setattr(enc, "drop_positions", lambda n, p_, device: pos)
    out = enc._FeedForward.apply(x, *params, p)
    mask = torch.ones(M * f, dtype=torch.double)
    mask[pos] = 0
    expected = (F.silu(x @ w1.T + b1) * mask.view(M, f) / (1 - p)) @ w2.T + b2
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for u, v in zip(torch.autograd.grad(out, [x, *params], g),
                    torch.autograd.grad(expected, [x, *params], g)):
        torch.testing.assert_close(u, v)


def test_dropout_gradient_uses_the_same_mask():
    x = torch.randn(1000, dtype=torch.double, requires_grad=True)
    y = enc.dropout(x, 0.25, True)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    dropped = y == 0
    assert torch.equal(grad == 0, dropped)
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)


def test_drop_positions_are_a_bernoulli_process():
    torch.manual_seed(0)
    n, p = 2_000_000, 0.1
    pos = enc.drop_positions(n, p, torch.device("cpu"))
    assert pos.dtype == torch.long and torch.all(pos[1:] > pos[:-1])
    assert 0 <= int(pos[0]) and int(pos[-1]) < n
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(pos.numel() - n * p) < 5 * sigma
    mask = torch.zeros(n)
    mask[pos] = 1
    # independence: neighbouring elements are dropped together with probability p^2
    both = (mask[1:] * mask[:-1]).mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / n)
    gaps = torch.diff(pos)
    for k in (1, 2, 5, 20):  # geometric gap law P(gap = k) = p (1-p)^(k-1)
        expected = p * (1 - p) ** (k - 1)
        observed = (gaps == k).float().mean().item()
        assert abs(observed - expected) < 5 * math.sqrt(expected / gaps.numel()) + 1e-4


def test_drop_positions_follow_the_torch_seed():
    torch.manual_seed(3)
    a = enc.drop_positions(10_000, 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    b = enc.drop_positions(10_000, 0.1, torch.device("cpu"))
    c = enc.drop_positions(10_000, 0.1, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_drop_positions_small_and_empty(n):
    pos = enc.drop_positions(n, 0.5, torch.device("cpu"))
    assert pos.numel() <= n and (pos.numel() == 0 or int(pos.max()) < n)
