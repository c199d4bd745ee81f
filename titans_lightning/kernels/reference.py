"""The PyTorch implementation of the operations: their specification, which the CPU kernels are
tested against, and what runs wherever the kernels do not (other devices, float64, half
precision, sizes outside the kernels' limits, the kernels switched off or not built).

Shape legend
    N  windows    L  tokens per window    d  row width    f  feed-forward width    M  rows
    S  memory slots    R  rows per slot    h  hidden width of the two-layer memory

On the CPU two operations avoid work the straightforward formulation wastes, computing the
same function:

* dropout draws the positions of the dropped elements directly (geometric gaps between drops,
  the same Bernoulli(p) process as a per-element mask) instead of one random number per
  element, which dominated the training time; one layer call draws the positions of its three
  dropouts together (:func:`dropout_draws`);
* the feed-forward runs in row chunks that stay in cache, and its (M, f) activation is
  recomputed in the backward pass instead of stored.

On other devices they are ``F.dropout`` and the plain feed-forward, and the attention is
``F.scaled_dot_product_attention``: cheap random numbers, no host synchronisation.
"""
from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_ROWS = 576  # rows of the (rows, f) feed-forward activation kept in cache at once

Drops = Callable[[], Tensor]  # gives the flat positions to drop in one tensor, ascending


# -- dropout ---------------------------------------------------------------------------------
def drop_positions(numel: int, p: float, device: torch.device) -> Tensor:
    """Flat indices dropped by i.i.d. Bernoulli(p) over ``numel`` elements, ascending.

    The gaps between successive drops of a Bernoulli(p) process are Geometric(p):
    ``gap = floor(log(u) / log(1 - p)) + 1`` with u uniform on (0, 1], so about ``p * numel``
    random numbers are drawn instead of ``numel``. u has 32-bit resolution (the library's
    float Bernoulli sampler has 24), from a counter-free SFC64 stream seeded by the torch
    generator, so ``torch.manual_seed`` makes dropout reproducible.
    """
    if p <= 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    mean = numel * p
    count = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16) // 2 * 2
    rng = np.random.SFC64(int(torch.randint(0, 2**62, ())))
    parts, end = [], 0
    while end < numel:  # one draw almost always suffices
        u = rng.random_raw(count // 2).view(np.uint32).astype(np.float64)  # 0 .. 2^32-1
        gaps = torch.from_numpy(u).add_(1.0).log_().sub_(32 * math.log(2.0))  # log u, u in (0, 1]
        pos = gaps.div_(math.log1p(-p)).floor_().long().add_(1).cumsum_(0).add_(end - 1)
        parts.append(pos)
        end = int(pos[-1]) + 1
    pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    return pos[: int(torch.searchsorted(pos, numel))].to(device)


def dropout_draws(p: float, sizes: list[int]) -> list[Drops]:
    """For tensors of the given sizes, one :data:`Drops` each. The first one asked draws its
    positions and those of the later tensors not drawn yet in one Bernoulli(p) draw over all
    of their elements (one draw costs little more than each of three small ones); nothing is
    drawn for the tensors a kernel drops itself, and nothing at all off the CPU."""
    drawn: dict[int, Tensor] = {}

    def positions(i: int) -> Tensor:
        if i not in drawn:
            end = min((j for j in drawn if j > i), default=len(sizes))
            drawn.update(enumerate(_draw_together(sizes[i:end], p), start=i))
        return drawn[i]

    return [partial(positions, i) for i in range(len(sizes))]


def _draw_together(sizes: list[int], p: float) -> list[Tensor]:
    """Dropped positions for tensors of the given sizes from one draw over all their elements."""
    device = torch.device("cpu")
    pos = drop_positions(sum(sizes), p, device)
    ends = list(itertools.accumulate(sizes))
    cuts = [0, *torch.searchsorted(pos, torch.tensor(ends, device=device)).tolist()]
    return [pos[a:b] - s if s else pos[a:b] for a, b, s in zip(cuts, cuts[1:], [0, *ends])]


class _PositionsDropout(torch.autograd.Function):
    """Inverted dropout given the dropped positions."""

    @staticmethod
    def forward(ctx, x: Tensor, pos: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(pos)
        ctx.scale = scale
        return (x * scale).view(-1).index_fill_(0, pos, 0.0).view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (pos,) = ctx.saved_tensors
        grad = (grad * ctx.scale).reshape(-1).index_fill_(0, pos, 0.0).view_as(grad)
        return grad, None, None


def dropout(x: Tensor, p: float, drops: Drops | None = None) -> Tensor:
    """Inverted dropout with probability p (0: none): ``F.dropout(x, p, training=True)``; on the
    CPU at the positions ``drops()`` gives, or drawn now."""
    if p == 0.0:
        return x
    if not _on_cpu(x) or p >= 1.0:
        return F.dropout(x, p, True)
    pos = drops() if drops is not None else drop_positions(x.numel(), p, x.device)
    return _PositionsDropout.apply(x, pos, 1.0 / (1.0 - p))


def _on_cpu(x: Tensor) -> bool:
    """Whether x takes the CPU's formulation (CUDA, MPS and XPU take the plain operators)."""
    return x.device.type == "cpu"


# -- the encoder layer's three steps ---------------------------------------------------------
def attention(qkv: Tensor, heads: int, p: float, drops: Drops | None = None) -> Tensor:
    """``dropout(softmax(q k^T / sqrt(e)), p) v`` per window and head, from the input projection
    qkv (N, L, 3d) laid out as (N, L, 3, heads, e); returns (N, L, d)."""
    N, L, three_d = qkv.shape
    d = three_d // 3
    e = d // heads
    qkv = qkv.view(N, L, 3, heads, e).permute(2, 0, 3, 1, 4)  # (3, N, heads, L, e)
    if not _on_cpu(qkv):
        q, k, v = qkv
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (N, heads, L, e)
        return out.transpose(1, 2).reshape(N, L, d)
    q, k, v = qkv.reshape(3, N * heads, L, e)  # contiguous for the batched products
    scores = torch.bmm(q * (1.0 / math.sqrt(e)), k.transpose(1, 2))  # (N*heads, L, L)
    weights = dropout(torch.softmax(scores, dim=-1), p, drops)
    return torch.bmm(weights, v).view(N, heads, L, e).transpose(1, 2).reshape(N, L, d)


def add_norm(x: Tensor, r: Tensor, norm: nn.LayerNorm, p: float, drops: Drops | None = None,
             project: nn.Linear | None = None) -> Tensor:
    """``norm(x + dropout(project(r), p))``: a residual connection and its post-norm."""
    if project is not None:
        r = project(r)
    return norm(x + dropout(r, p, drops))


def feed_forward_add_norm(x: Tensor, linear1: nn.Linear, linear2: nn.Linear, norm: nn.LayerNorm,
                          p: float, drops: Drops | None = None) -> Tensor:
    """``norm(x + dropout(linear2(dropout(silu(linear1(x)), p)), p))`` for x (..., d)."""
    return norm(x + dropout(feed_forward(x, linear1, linear2, p), p, drops))


def feed_forward(x: Tensor, linear1: nn.Linear, linear2: nn.Linear, p: float) -> Tensor:
    """``linear2(dropout(silu(linear1(x)), p))`` for x (..., d)."""
    if not _on_cpu(x):
        h = F.silu(linear1(x))
        return linear2(F.dropout(h, p, True) if p > 0.0 else h)
    rows = x.reshape(-1, x.shape[-1])  # (M, d)
    return _ChunkedFeedForward.apply(rows, linear1.weight, linear1.bias, linear2.weight,
                                     linear2.bias, p).view(x.shape)


class _ChunkedFeedForward(torch.autograd.Function):
    """``linear2(dropout(silu(linear1(x))))`` over rows of x (M, d), in cache-sized chunks.

    The first layer's bias rides along as an extra input column of ones, so one matrix product
    gives both its weight and its bias gradient.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p: float):
        M, f = x.shape[0], w1.shape[0]
        x1 = torch.cat([x, x.new_ones(M, 1)], dim=1)  # (M, d+1)
        w1b = torch.cat([w1, b1[:, None]], dim=1)  # (f, d+1)
        pos = drop_positions(M * f, p, x.device)
        scale = 1.0 / (1.0 - p)
        out = b2.expand(M, -1).contiguous()  # (M, d)
        work = x.new_empty(min(CHUNK_ROWS, M), f)
        for r0, r1, chunk_pos in _chunks(M, f, pos):
            s = torch.mm(x1[r0:r1], w1b.T, out=work[: r1 - r0])  # (c, f)
            F.silu(s, inplace=True)
            s.view(-1).index_fill_(0, chunk_pos, 0.0)
            out[r0:r1].addmm_(s, w2.T, alpha=scale)  # (c, d)
        ctx.save_for_backward(x1, w1b, w2, pos)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        x1, w1b, w2, pos = ctx.saved_tensors
        M, f, d = x1.shape[0], w1b.shape[0], w2.shape[0]
        g = g.contiguous()
        gs = g * ctx.scale  # gradient reaching the scaled, dropped-out activation
        gx = x1.new_empty(M, d)
        gw1b_t, gw2 = w1b.new_zeros(w1b.shape[1], f), torch.zeros_like(w2)  # (d+1, f), (d, f)
        a_buf = x1.new_empty(min(CHUNK_ROWS, M), f)
        s_buf, d_buf = torch.empty_like(a_buf), torch.empty_like(a_buf)
        for r0, r1, chunk_pos in _chunks(M, f, pos):
            c = r1 - r0
            a = torch.mm(x1[r0:r1], w1b.T, out=a_buf[:c])  # recomputed pre-activation (c, f)
            s = torch.ops.aten.silu.out(a, out=s_buf[:c])
            s.view(-1).index_fill_(0, chunk_pos, 0.0)
            gw2.addmm_(gs[r0:r1].T, s)  # (d, f)
            ds = torch.mm(gs[r0:r1], w2, out=d_buf[:c])  # (c, f)
            ds.view(-1).index_fill_(0, chunk_pos, 0.0)
            da = torch.ops.aten.silu_backward.grad_input(ds, a, grad_input=s_buf[:c])
            gw1b_t.addmm_(x1[r0:r1].T, da)  # weight and bias at once
            torch.mm(da, w1b[:, :d], out=gx[r0:r1])
        return gx, gw1b_t[:d].T, gw1b_t[d], gw2, g.sum(0), None


def _chunks(M: int, f: int, pos: Tensor):
    """Row ranges of at most CHUNK_ROWS rows, with the dropped positions local to each."""
    bounds = torch.arange(0, M + CHUNK_ROWS, CHUNK_ROWS, device=pos.device).clamp_(max=M) * f
    cuts = torch.searchsorted(pos, bounds).tolist()
    for i, r0 in enumerate(range(0, M, CHUNK_ROWS)):
        yield r0, min(r0 + CHUNK_ROWS, M), pos[cuts[i]:cuts[i + 1]] - r0 * f


# -- the MAC layer's rows ----------------------------------------------------------------------
def mac_query(x: Tensor, linear: nn.Linear, then_silu: bool) -> Tensor:
    """The memory query ``normalize(linear(x))`` of rows x (..., d), then silu if asked."""
    q = F.normalize(linear(x), dim=-1)
    return F.silu(q) if then_silu else q


def keys_values(x: Tensor, key_proj: Tensor, value_proj: Tensor) -> tuple[Tensor, Tensor]:
    """``normalize(silu(x K^T))`` and ``silu(x V^T)`` of rows x (..., d)."""
    kv = F.silu(x @ torch.cat([key_proj, value_proj]).T)
    keys, values = kv.split(key_proj.shape[0], dim=-1)  # one product for both
    return F.normalize(keys, dim=-1), values


# -- the two-layer memory --------------------------------------------------------------------
def hidden_width(flat: Tensor, d: int) -> int:
    """h of the flat two-layer weights (S, h*d + h + d*h + d)."""
    return (flat.shape[1] - d) // (2 * d + 1)


def two_layer_weights(flat: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Views of the flat weights, per slot ``[W1 (h, d) | b1 (h) | W2 (d, h) | b2 (d)]``, shaped
    for batched products: W1^T (S, d, h), b1 (S, 1, h), W2^T (S, h, d), b2 (S, 1, d).

    One ``as_strided`` each, where slicing, viewing and transposing would take three operations.
    """
    flat = flat.contiguous()
    S, n = flat.shape
    h = hidden_width(flat, d)
    o = flat.storage_offset()
    return (flat.as_strided((S, d, h), (n, 1, d), o),
            flat.as_strided((S, 1, h), (n, h, 1), o + h * d),
            flat.as_strided((S, h, d), (n, 1, h), o + h * d + h),
            flat.as_strided((S, 1, d), (n, d, 1), o + 2 * h * d + h))


def two_layer(q: Tensor, w1t: Tensor, b1: Tensor, w2t: Tensor, b2: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
    """``M(q) = silu(q W1^T + b1) W2^T + b2`` per slot -> (out, pre-activation a, silu(a))."""
    a = torch.baddbmm(b1, q, w1t)  # (S, R, h)
    s = F.silu(a)
    return torch.baddbmm(b2, s, w2t), a, s  # (S, R, d)


def two_layer_backward(q: Tensor, flat: Tensor, a: Tensor, s: Tensor, g: Tensor, need_q: bool,
                       need_flat: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients (gq, gflat) of :func:`two_layer` for g = d loss / d M(q). Under grad mode
    (a backward pass that is itself differentiated) the activations are recomputed from q and
    flat, so that the second derivative is exact."""
    w1t, b1, w2t, b2 = two_layer_weights(flat, q.shape[-1])
    gs = torch.bmm(g, w2t.transpose(1, 2))  # (S, R, h)
    if torch.is_grad_enabled():  # double backward: a and s must carry their graph
        _, a, s = two_layer(q, w1t, b1, w2t, b2)
        sig = torch.sigmoid(a)
        ga = gs * sig * (1 + a * (1 - sig))  # silu'(a) in differentiable operations
    else:
        ga = torch.ops.aten.silu_backward(gs, a)  # (S, R, h)
    gq = torch.bmm(ga, w1t.transpose(1, 2)) if need_q else None  # (S, R, d)
    gflat = None
    if need_flat:
        gw1 = torch.bmm(ga.transpose(1, 2), q)  # (S, h, d)
        gw2 = torch.bmm(g.transpose(1, 2), s)  # (S, d, h)
        gflat = torch.cat([gw1.flatten(1), ga.sum(1), gw2.flatten(1), g.sum(1)], dim=1)
    return gq, gflat


# -- the update's check ------------------------------------------------------------------------
def value_and_gradient(surprise_of: Callable[[Tensor], Tensor], flat: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """``surprise_of(flat)`` (S,) and the gradient of its sum with respect to ``flat``, by
    autograd on a detached leaf, both without a graph."""
    with torch.enable_grad():
        leaf = flat.detach().requires_grad_(True)
        surprise = surprise_of(leaf)
        (gradient,) = torch.autograd.grad(surprise.sum(), [leaf])
    return surprise.detach(), gradient


def all_finite(*flats: Tensor) -> Tensor:
    """Per slot, whether every entry of the (S, ...) tensors is finite, in four operations:
    ``x * 0`` is 0 for finite x and NaN for inf or NaN, so a slot's sum is 0 exactly when all
    its entries are finite (no sum of large values that could overflow)."""
    with torch.no_grad():
        return torch.cat([f.reshape(f.shape[0], -1) for f in flats], dim=1).mul_(0).sum(1) == 0


def commit_update(surprise: Tensor, grads: Tensor, new: Tensor, old: Tensor, updates: Tensor,
                  skipped: Tensor) -> tuple[Tensor, Tensor]:
    """Per slot (S,), whether the surprise, gradients and new weights are all finite (ok), and
    the weights to keep, ``new`` where ok, else ``old``; counts the update and its skipped
    slots in ``updates`` and ``skipped`` (in place)."""
    ok = all_finite(surprise.reshape(old.shape[0], -1), grads, new)  # (S,)
    updates.add_(1)
    skipped.add_(ok.numel() - ok.sum())
    return ok, torch.where(ok[:, None], new, old)


def momentum_step(surprise: Tensor, grads: Tensor, old: Tensor, momentum: Tensor, alpha: float,
                  eta: float, theta: float, updates: Tensor, skipped: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The Titans rule's step (``titans_default.apply_update``: ``m' = eta m - theta g``,
    ``w' = alpha w + m'``) and the commit of :func:`commit_update`, the momentum kept or rolled
    back with the weights: (ok (S,), weights, momentum (S, n))."""
    new_momentum = eta * momentum - theta * grads
    new = alpha * old + new_momentum
    ok = all_finite(surprise.reshape(old.shape[0], -1), grads, new, new_momentum)  # (S,)
    updates.add_(1)
    skipped.add_(ok.numel() - ok.sum())
    keep = ok[:, None]
    return ok, torch.where(keep, new, old), torch.where(keep, new_momentum, momentum)
