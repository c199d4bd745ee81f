"""The MAC block's transformer encoder layer, computed without wasted work on the CPU.

Shape legend
    N  windows    L  tokens per window (P + 2C)    d  model width    f  feed-forward width

``EncoderLayer`` computes exactly what ``nn.TransformerEncoderLayer(d, nhead, f, dropout,
activation=silu, batch_first=True)`` computes (post-norm, same parameter names, so the two
load each other's state dicts). On the CPU it differs only in *how*:

* where the fused kernels of :mod:`titans_lightning.fused` apply (float32, d = 16, a C++
  compiler), the 2048-wide feed-forward, the attention core (scores, softmax, dropout, product
  with v), the residual dropouts and residual + layer norm are one kernel call each, with
  counter-based dropout draws; without a gradient or dropout (evaluation) the whole layer is
  four calls, the norms folded into the output projection and the feed-forward;
* otherwise the feed-forward runs in row chunks that stay in cache. Either way its (N*L, f)
  activation is recomputed in the backward pass instead of stored;
* the remaining dropouts draw the positions of the dropped elements directly (geometric gaps
  between drops, the same Bernoulli(p) process as a per-element mask) instead of one random
  number per element, which is what dominated the reference's training time.
On CUDA it uses the library kernels, whose random numbers are cheap.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused

CHUNK_ROWS = 576  # rows of the (rows, f) feed-forward activation kept in cache at once


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


class _Dropout(torch.autograd.Function):
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


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` with the same distribution, cheaper on the CPU."""
    if not training or p == 0.0:
        return x
    if x.is_cuda or p >= 1.0:
        return F.dropout(x, p, True)
    return _Dropout.apply(x, drop_positions(x.numel(), p, x.device), 1.0 / (1.0 - p))


class _FeedForward(torch.autograd.Function):
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


def _draw_together(sizes: list[int], p: float, device: torch.device) -> list[Tensor]:
    """Dropped positions for tensors of the given sizes from one Bernoulli(p) draw over all of
    their elements (one draw costs little more than each of three small ones)."""
    pos = drop_positions(sum(sizes), p, device)
    ends = list(itertools.accumulate(sizes))
    cuts = [0, *torch.searchsorted(pos, torch.tensor(ends, device=device)).tolist()]
    return [pos[a:b] - s if s else pos[a:b] for a, b, s in zip(cuts, cuts[1:], [0, *ends])]


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with SiLU feed-forward (batch first)."""

    fused = True  # use the fused CPU kernels where they apply (False: PyTorch operators only)

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, layer_norm_eps: float = 1e-5):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead, self.p = nhead, dropout
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        if self._fused_without_grad(x):
            return self._forward_without_grad(x)
        N, L, d = x.shape
        drops = [None] * 3  # dropped positions: attention weights, attention output, feed-forward
        if self.training and 0.0 < self.p < 1.0 and not x.is_cuda:
            if not self._fused_attention(x):
                drops = _draw_together([N * self.nhead * L * L, N * L * d, N * L * d], self.p,
                                       x.device)
            elif not fused.supports_dropout(x):  # the kernel draws the weights' dropout itself
                drops[1:] = _draw_together([N * L * d, N * L * d], self.p, x.device)
        x = self._add_norm(x, self._drop(self._attend(x, drops[0]), drops[1]), self.norm1)
        return self._add_norm(x, self._drop(self.feed_forward(x), drops[2]), self.norm2)

    def _fused_without_grad(self, x: Tensor) -> bool:
        """No gradient, nothing dropped, and kernels for every step."""
        return (not torch.is_grad_enabled() and (not self.training or self.p == 0.0)
                and self._fused_attention(x)
                and fused.supports_feed_forward(x, self.linear1.out_features)
                and fused.supports_layer_norm(x, self.norm1)
                and fused.supports_layer_norm(x, self.norm2))

    def _forward_without_grad(self, x: Tensor) -> Tensor:
        """The same layer in four calls: the input projection, the attention core, then the
        output projection with residual and norm 1, the feed-forward with residual and norm 2."""
        N, L, d = x.shape
        attn = self.self_attn
        heads = fused.attention(F.linear(x, attn.in_proj_weight, attn.in_proj_bias), self.nhead,
                                0.0)  # (N, L, d)
        x = fused.project_add_layer_norm(x, heads, attn.out_proj, self.norm1)
        rows = x.reshape(N * L, d)
        return fused.feed_forward_add_norm(rows, self.linear1.weight, self.linear1.bias,
                                           self.linear2.weight, self.linear2.bias,
                                           self.norm2).view(N, L, d)

    def _add_norm(self, x: Tensor, r: Tensor, norm: nn.LayerNorm) -> Tensor:
        """``norm(x + r)`` (N, L, d): the residual connection and the post-norm."""
        if self.fused and fused.supports_layer_norm(x, norm):
            return fused.add_layer_norm(x, r, norm)
        return norm(x + r)

    def _fused_attention(self, x: Tensor) -> bool:
        head_width = x.shape[-1] // self.nhead
        return self.fused and self.p < 1.0 and fused.supports_attention(x, head_width)

    def attend(self, x: Tensor) -> Tensor:
        return self._attend(x, None)

    def _attend(self, x: Tensor, weight_drops: Tensor | None) -> Tensor:
        N, L, d = x.shape
        h = self.nhead
        attn = self.self_attn
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3d)
        if self._fused_attention(x):  # reads q, k, v in place, writes (N, L, d)
            return attn.out_proj(fused.attention(qkv, h, self.p if self.training else 0.0))
        qkv = qkv.view(N, L, 3, h, d // h).permute(2, 0, 3, 1, 4).reshape(3, N * h, L, d // h)
        q, k, v = qkv  # (N*h, L, d/h) each, contiguous for the batched products
        scores = torch.bmm(q * (1.0 / math.sqrt(d // h)), k.transpose(1, 2))  # (N*h, L, L)
        weights = self._drop(torch.softmax(scores, dim=-1), weight_drops)
        out = torch.bmm(weights, v).view(N, h, L, d // h).transpose(1, 2).reshape(N, L, d)
        return attn.out_proj(out)

    def _drop(self, x: Tensor, positions: Tensor | None) -> Tensor:
        """Dropout at positions drawn in advance, or (positions None) drawn now: by the kernel
        where it applies, which draws from a counter-based hash instead of a random stream."""
        if positions is None:
            if (self.fused and self.training and 0.0 < self.p < 1.0
                    and fused.supports_dropout(x)):
                return fused.dropout(x, self.p)
            return dropout(x, self.p, self.training)
        return _Dropout.apply(x, positions, 1.0 / (1.0 - self.p))

    def feed_forward(self, x: Tensor) -> Tensor:
        N, L, d = x.shape
        p = self.p if self.training else 0.0
        if x.is_cuda:
            h = F.dropout(F.silu(self.linear1(x)), p, self.training)
            return self.linear2(h)
        rows = x.reshape(N * L, d)
        params = (self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias)
        if self.fused and fused.supports_feed_forward(x, self.linear1.out_features):
            return fused.feed_forward(rows, *params, p).view(N, L, d)
        return _FeedForward.apply(rows, *params, p).view(N, L, d)
