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


def test_training_forward_equals_explicit_masks(monkeypatch):
    """The three dropouts of a training forward (attention weights, attention output,
    feed-forward output) come from one draw, split in that order, and act as dense masks."""
    monkeypatch.setattr(enc, "drop_positions", lambda n, p, device: torch.arange(0, n, 7))
    ref, mine = pair()
    mine.fused = False  # the chunked feed-forward takes its mask from drop_positions too
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
    ff = mine.feed_forward(x1)  # its own (fixed) mask, tested in the feed-forward's tests
    expected = ref.norm2(x1 + ff * masks[2].view(N, L, d))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(expected, x, g)[0], rtol=1e-9, atol=1e-11)


def test_dropouts_drawn_together_are_bernoulli_in_each_tensor():
    torch.manual_seed(0)
    sizes, p = [300_000, 50_000, 120_000], 0.1
    parts = enc._draw_together(sizes, p, torch.device("cpu"))
    for pos, n in zip(parts, sizes):
        assert pos.dtype == torch.long and torch.all(pos[1:] > pos[:-1])
        assert pos.numel() == 0 or (0 <= int(pos[0]) and int(pos[-1]) < n)
        assert abs(pos.numel() - n * p) < 5 * math.sqrt(n * p * (1 - p))
