"""The encoder layer computes what nn.TransformerEncoderLayer computes, on PyTorch's operators
(float64 here, so the CPU kernels stay out; tests/test_kernels.py has them), and its dropouts
are the Bernoulli process they should be."""
import math

import pytest
import torch
import torch.nn.functional as F

from titans_lightning import encoder as enc
from titans_lightning.kernels import reference


def assert_same_gradients(ref, mine, x, a, b, **close) -> None:
    """The input and parameter gradients of two layers' outputs a, b for one random cotangent."""
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *ref.parameters()], g)
    gb = torch.autograd.grad(b, [x, *mine.parameters()], g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, **close)


def pair(d=16, f=40):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(d, 2, f, 0.1, activation=F.silu, batch_first=True)
    mine = enc.EncoderLayer(d, 2, f, 0.1)
    mine.load_state_dict(ref.state_dict())
    return ref.double(), mine.double()


def test_eval_forward_and_gradients_equal_the_library_layer(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ROWS", 7)  # several chunks and a ragged last one
    ref, mine = pair()
    ref.eval(), mine.eval()
    x = torch.randn(5, 9, 16, dtype=torch.double, requires_grad=True)
    a, b = ref(x), mine(x)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert_same_gradients(ref, mine, x, a, b, rtol=1e-9, atol=1e-11)


def test_training_feed_forward_equals_explicit_mask(monkeypatch):
    """With the dropped positions fixed, forward and backward equal a dense-mask computation."""
    monkeypatch.setattr(reference, "CHUNK_ROWS", 4)
    torch.manual_seed(1)
    M, d, f, p = 11, 6, 10, 0.3
    x = torch.randn(M, d, dtype=torch.double, requires_grad=True)
    w1, b1 = torch.randn(f, d, dtype=torch.double), torch.randn(f, dtype=torch.double)
    w2, b2 = torch.randn(d, f, dtype=torch.double), torch.randn(d, dtype=torch.double)
    params = [w.requires_grad_(True) for w in (w1, b1, w2, b2)]
    pos = torch.tensor([0, 3, 17, 18, 40, 59, 60, 99, 109])
    monkeypatch.setattr(reference, "drop_positions", lambda n, p_, device: pos)
    out = reference._ChunkedFeedForward.apply(x, *params, p)
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
    y = reference.dropout(x, 0.25)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    dropped = y == 0
    assert torch.equal(grad == 0, dropped)
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)


def test_drop_positions_are_a_bernoulli_process():
    torch.manual_seed(0)
    n, p = 2_000_000, 0.1
    pos = reference.drop_positions(n, p, torch.device("cpu"))
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
    a = reference.drop_positions(10_000, 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    b = reference.drop_positions(10_000, 0.1, torch.device("cpu"))
    c = reference.drop_positions(10_000, 0.1, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_drop_positions_small_and_empty(n):
    pos = reference.drop_positions(n, 0.5, torch.device("cpu"))
    assert pos.numel() <= n and (pos.numel() == 0 or int(pos.max()) < n)


def test_training_forward_equals_explicit_masks(monkeypatch):
    """The three dropouts of a training forward (attention weights, attention output,
    feed-forward output) come from one draw, split in that order, and act as dense masks."""
    monkeypatch.setattr(reference, "drop_positions", lambda n, p, device: torch.arange(0, n, 7))
    ref, mine = pair()
    mine.train()
    N, L, d, h, p = 3, 5, 16, 2, 0.1
    x = torch.randn(N, L, d, dtype=torch.double, requires_grad=True)
    out = mine(x)

    sizes = [N * h * L * L, N * L * d, N * L * d]
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    masks = []
    for start, size in zip(starts, sizes):
        mask = torch.ones(size, dtype=torch.double)
        dropped = torch.arange(0, start + size, 7) - start
        mask[dropped[dropped >= 0]] = 0.0
        masks.append(mask / (1 - p))
    attn = ref.self_attn
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (t.view(N, L, h, d // h).transpose(1, 2) for t in (q, k, v))  # (N, h, L, d/h)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    a = (weights * masks[0].view(N, h, L, L)) @ v
    a = attn.out_proj(a.transpose(1, 2).reshape(N, L, d))
    x1 = ref.norm1(x + a * masks[1].view(N, L, d))
    ff = reference.feed_forward(x1, mine.linear1, mine.linear2, p)  # its own (fixed) mask
    expected = ref.norm2(x1 + ff * masks[2].view(N, L, d))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(expected, x, g)[0], rtol=1e-9, atol=1e-11)


def test_dropouts_drawn_together_are_bernoulli_in_each_tensor():
    torch.manual_seed(0)
    sizes, p = [300_000, 50_000, 120_000], 0.1
    parts = [drops() for drops in reference.dropout_draws(p, sizes)]
    for pos, n in zip(parts, sizes):
        assert pos.dtype == torch.long and torch.all(pos[1:] > pos[:-1])
        assert pos.numel() == 0 or (0 <= int(pos[0]) and int(pos[-1]) < n)
        assert abs(pos.numel() - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_dropout_draws_are_made_when_first_needed_and_only_for_what_is_left(monkeypatch):
    """Nothing is drawn before a tensor needs its positions (a kernel that drops a tensor
    itself draws nothing here); the first asked draws itself and every later tensor not yet
    drawn in one draw, which is then split."""
    draws = []
    monkeypatch.setattr(reference, "drop_positions",
                        lambda n, p, device: draws.append(n) or torch.arange(0, n, 5))
    weights, output, feed_forward = reference.dropout_draws(0.2, [30, 20, 10])
    assert draws == []
    assert torch.equal(output(), torch.arange(0, 20, 5))  # the first 20 of 30 drawn together
    assert torch.equal(feed_forward(), torch.arange(20, 30, 5) - 20)  # its part, made local
    assert draws == [30]
    assert torch.equal(weights(), torch.arange(0, 30, 5))  # drawn on its own, later ones kept
    assert draws == [30, 30] and torch.equal(output(), torch.arange(0, 20, 5))


def test_a_float64_training_layer_draws_its_three_dropouts_together_then_the_feed_forwards(
        monkeypatch):
    """The order of the random draws of the layer's PyTorch path, which the recorded training
    run depends on: one draw for the attention weights, the attention output and the
    feed-forward output, then the feed-forward's inner dropout."""
    draws = []
    real = reference.drop_positions
    monkeypatch.setattr(reference, "drop_positions",  # the draws that drop something
                        lambda n, p, device: (p > 0 and draws.append(n)) or real(n, p, device))
    _, mine = pair(f=40)
    N, L, d, h = 3, 5, 16, 2
    mine.train()(torch.randn(N, L, d, dtype=torch.double))
    assert draws == [N * h * L * L + 2 * N * L * d, N * L * 40]
    draws.clear()
    mine.eval()(torch.randn(N, L, d, dtype=torch.double))
    assert draws == []


def test_off_the_cpu_the_layer_would_run_the_plain_operators(monkeypatch):
    """Where tensors are not on the CPU (CUDA, MPS, XPU), dropout is F.dropout, the feed-forward
    the plain one and the attention F.scaled_dot_product_attention: here the CPU tensors are
    made to look like another device's, and the layer equals the library's without dropout."""
    ref, mine = pair()
    ref.eval(), mine.eval()
    monkeypatch.setattr(reference, "_on_cpu", lambda t: False)
    x = torch.randn(4, 7, 16, dtype=torch.double)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(reference, "drop_positions", None)  # never drawn on the host
    out = mine.train()(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
