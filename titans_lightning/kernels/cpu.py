"""The CPU kernels (``titans_lightning/csrc/``) called on float32 CPU tensors, with autograd.

Shape legend
    M  rows (tokens of all windows)    d  row width (16)    f  feed-forward width
    N  windows    L  tokens per window    S  memory slots    R  rows per slot    n  flat weights

Each function here takes what its kernel takes and nothing else: which operation runs on them
is decided in :mod:`titans_lightning.kernels`, which calls these only after checking devices,
dtypes and sizes. The kernels check their sizes again, and every status they return is checked
(:func:`_check`).

Dropout is the same Bernoulli(p) process as ``F.dropout``; the draws come from a counter-based
hash of (seed, row, unit), the seed from torch's generator (``torch.manual_seed`` fixes the
masks): the backward pass draws the same decisions again, or reads the forward's keep bits.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from .build import library

ROW_WIDTH = 16  # the kernels' d


class KernelError(RuntimeError):
    """A kernel refused its arguments: a caller skipped the checks of the dispatch."""


def _check(status: int, name: str) -> None:
    """The one convention of the C interface (csrc/status.h): 0 is success."""
    if status == 0:
        return
    if status == 1:
        raise MemoryError(f"the CPU kernel {name} could not allocate its scratch buffers")
    if status == 2:
        raise KernelError(f"the CPU kernel {name} does not take these sizes")
    raise KernelError(f"the CPU kernel {name} failed with status {status}")


def _call(name: str, *args) -> None:
    _check(getattr(library(), name)(*args), name)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _plain(t: Tensor) -> Tensor:
    """t as the kernels read it: contiguous, outside autograd (a detach only where needed: in a
    pass without a gradient it would be one more operation per tensor and call)."""
    if t.device.type != "cpu" or t.dtype != torch.float32:  # the kernels would misread it
        raise TypeError(f"the CPU kernels take float32 CPU tensors, got {t.dtype} on {t.device}")
    return (t.detach() if t.requires_grad else t).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dropout_seed(p: float) -> int:
    """A seed for the kernels' dropout draws, from torch's generator (0 when nothing drops)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if p > 0.0 else 0


def _threshold(p: float) -> int:
    """Drop when the 32-bit draw is below this: P(drop) = p to within 2^-32."""
    return min(round(p * 2.0**32), 2**32 - 1)


def _scale(p: float) -> float:
    return 1.0 / (1.0 - p)


# -- feed-forward ----------------------------------------------------------------------------
def feed_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: float) -> Tensor:
    """``linear2(dropout(silu(linear1(x)), p))`` for rows x (M, d); differentiable. The (M, f)
    activation lives in vector registers between the two products and is recomputed in the
    backward pass."""
    seed = dropout_seed(p)
    if not _needs_grad(x, w1, b1, w2, b2):  # no autograd node: its bookkeeping costs a kernel's
        return _feed_forward(x, w1, b1, w2, b2, p, seed, keep_bits=False)[0]
    return _FeedForward.apply(x, w1, b1, w2, b2, p, seed)


def feed_forward_add_norm(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                          norm: nn.LayerNorm) -> Tensor:
    """``norm(x + linear2(silu(linear1(x))))`` for rows x (M, d): the encoder layer's
    feed-forward, residual connection and post-norm in one pass, without dropout or autograd."""
    return _feed_forward(x, w1, b1, w2, b2, 0.0, 0, keep_bits=False, norm=norm)[0]


def _feed_forward(x, w1, b1, w2, b2, p: float, seed: int, keep_bits: bool,
                  norm: nn.LayerNorm | None = None):
    """The kernel's forward pass -> (out (M, d), the inputs made contiguous, the keep bits);
    with ``norm``, out is ``norm(x + out)``."""
    x, w1, b1, w2, b2 = map(_plain, (x, w1, b1, w2, b2))
    norm_w = norm_b = None
    if norm is not None:
        norm_w, norm_b = _plain(norm.weight), _plain(norm.bias)
    M, f = x.shape[0], w1.shape[0]
    out = x.new_empty(M, ROW_WIDTH)
    # the keep decisions, 16 per int16, for the backward pass (cheaper than drawing again)
    bits = x.new_empty((M, f // 16) if p > 0.0 and keep_bits else (0,), dtype=torch.int16)
    _call("titans_ffn_forward", x.data_ptr(), M, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(),
          b2.data_ptr(), f, seed, _threshold(p), _scale(p),
          bits.data_ptr() if bits.numel() else None, out.data_ptr(), torch.get_num_threads(),
          _ptr(norm_w), _ptr(norm_b), norm.eps if norm is not None else 0.0)
    return out, (x, w1, b1, w2), bits


class _FeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p: float, seed: int):
        out, inputs, bits = _feed_forward(x, w1, b1, w2, b2, p, seed, keep_bits=True)
        ctx.save_for_backward(*inputs, bits)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w1, b1, w2, bits = ctx.saved_tensors
        g = g.contiguous()
        M, f = x.shape[0], w1.shape[0]
        gx, gw1, gb1, gw2 = (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1),
                             torch.empty_like(w2))
        _call("titans_ffn_backward", x.data_ptr(), M, w1.data_ptr(), b1.data_ptr(),
              w2.data_ptr(), f, g.data_ptr(), ctx.seed, _threshold(ctx.p),
              bits.data_ptr() if ctx.p > 0.0 else None, _scale(ctx.p), gx.data_ptr(),
              gw1.data_ptr(), gb1.data_ptr(), gw2.data_ptr(), torch.get_num_threads())
        return gx, gw1, gb1, gw2, g.sum(0), None, None


# -- dropout ---------------------------------------------------------------------------------
def dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout (training) of x seen as rows of 16: row r keeps element j as
    ``keep_mask(seed, p, rows, 16)`` says; differentiable (the backward pass draws the same
    decisions again from the seed)."""
    seed = dropout_seed(p)
    if not _needs_grad(x):
        return _dropout(x, p, seed)
    return _Dropout.apply(x, p, seed)


def _dropout(x: Tensor, p: float, seed: int) -> Tensor:
    x = _plain(x)
    out = torch.empty_like(x)
    _call("titans_dropout_apply", x.data_ptr(), x.numel() // ROW_WIDTH, seed, _threshold(p),
          _scale(p), out.data_ptr(), torch.get_num_threads())
    return out


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return _dropout(x, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return _dropout(g, ctx.p, ctx.seed), None, None


def keep_mask(seed: int, p: float, rows: int, f: int) -> Tensor:
    """The kernels' dropout decisions for a given seed, (rows, f) booleans (True = kept)."""
    keep = torch.empty(rows, f, dtype=torch.uint8)
    _call("titans_dropout_keep", seed, _threshold(p), rows, f, keep.data_ptr())
    return keep.bool()


# -- attention -------------------------------------------------------------------------------
def attention(qkv: Tensor, heads: int, p: float) -> Tensor:
    """``dropout(softmax(q k^T / sqrt(e)), p) v`` per window and head, from the input projection
    qkv (N, L, 3d) laid out as (N, L, 3, heads, e); returns (N, L, d). Differentiable."""
    seed = dropout_seed(p)
    if not _needs_grad(qkv):
        return _attention(qkv, heads, p, seed, keep_weights=False)[0]
    return _Attention.apply(qkv, heads, p, seed)


def _attention(qkv, heads: int, p: float, seed: int, keep_weights: bool):
    """The kernel's forward pass -> (out (N, L, d), qkv made contiguous, the softmax weights
    before dropout (N * heads, L, Lp) if kept for a backward pass, else None)."""
    qkv = _plain(qkv)
    N, L, three_d = qkv.shape
    d = three_d // 3
    weights = None
    if keep_weights:
        padded = ctypes.c_int64()
        _call("titans_attention_padded", L, ctypes.byref(padded))
        weights = qkv.new_empty(N * heads, L, padded.value)
    out = qkv.new_empty(N, L, d)
    _call("titans_attention_forward", qkv.data_ptr(), N, L, heads, d // heads, seed,
          _threshold(p), _scale(p), _ptr(weights), out.data_ptr(), torch.get_num_threads())
    return out, qkv, weights


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, heads: int, p: float, seed: int):
        out, qkv, weights = _attention(qkv, heads, p, seed, keep_weights=True)
        ctx.save_for_backward(qkv, weights)
        ctx.heads, ctx.p, ctx.seed = heads, p, seed
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        qkv, weights = ctx.saved_tensors
        g = g.contiguous()
        N, L, three_d = qkv.shape
        gqkv = torch.empty_like(qkv)
        _call("titans_attention_backward", qkv.data_ptr(), weights.data_ptr(), g.data_ptr(), N,
              L, ctx.heads, three_d // 3 // ctx.heads, ctx.seed, _threshold(ctx.p),
              _scale(ctx.p), gqkv.data_ptr(), torch.get_num_threads())
        return gqkv, None, None, None


# -- residual + layer norm -------------------------------------------------------------------
def add_layer_norm(x: Tensor, r: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x + r)``, the residual connection and layer norm in one pass; differentiable."""
    if not _needs_grad(x, r, norm.weight, norm.bias):
        return _add_layer_norm(x, r, norm.weight, norm.bias, norm.eps)[0]
    return _AddLayerNorm.apply(x, r, norm.weight, norm.bias, norm.eps)


def project_add_layer_norm(x: Tensor, r: Tensor, project: nn.Linear,
                           norm: nn.LayerNorm) -> Tensor:
    """``norm(x + project(r))`` for rows of width 16 (a 16 x 16 ``project`` with a bias): the
    attention's output projection, residual connection and post-norm in one pass; no autograd."""
    return _add_layer_norm(x, r, norm.weight, norm.bias, norm.eps, project)[0]


def _add_layer_norm(x, r, w, b, eps: float, project: nn.Linear | None = None):
    """The kernel's forward pass -> (out, the inputs its backward pass needs)."""
    x, r, w, b = _plain(x), _plain(r), _plain(w), _plain(b)
    pw = pb = None
    if project is not None:
        pw, pb = _plain(project.weight), _plain(project.bias)
    out = torch.empty_like(x)
    _call("titans_layer_norm_forward", x.data_ptr(), r.data_ptr(), w.data_ptr(), b.data_ptr(),
          x.numel() // ROW_WIDTH, eps, out.data_ptr(), torch.get_num_threads(), _ptr(pw),
          _ptr(pb))
    return out, (x, r, w)


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, w, b, eps: float):
        out, inputs = _add_layer_norm(x, r, w, b, eps)
        ctx.save_for_backward(*inputs)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, r, w = ctx.saved_tensors
        g = g.contiguous()
        gx, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)
        _call("titans_layer_norm_backward", x.data_ptr(), r.data_ptr(), w.data_ptr(),
              g.data_ptr(), x.numel() // ROW_WIDTH, ctx.eps, gx.data_ptr(), gw.data_ptr(),
              gb.data_ptr(), torch.get_num_threads())
        return gx, gx, gw, gb, None


# -- 16-wide rows without a gradient ---------------------------------------------------------
def mac_query(x: Tensor, linear: nn.Linear, then_silu: bool) -> Tensor:
    """``normalize(linear(x))`` over the last dimension, then silu if asked; no autograd."""
    x, w, b = _plain(x), _plain(linear.weight), _plain(linear.bias)
    out = torch.empty_like(x)
    _call("titans_query_forward", x.data_ptr(), w.data_ptr(), b.data_ptr(),
          x.numel() // ROW_WIDTH, int(then_silu), out.data_ptr(), torch.get_num_threads())
    return out


def keys_values(x: Tensor, key_proj: Tensor, value_proj: Tensor) -> tuple[Tensor, Tensor]:
    """``normalize(silu(x K^T))`` and ``silu(x V^T)`` over the last dimension; no autograd."""
    x, key_proj, value_proj = _plain(x), _plain(key_proj), _plain(value_proj)
    keys, values = torch.empty_like(x), torch.empty_like(x)
    _call("titans_keys_values_forward", x.data_ptr(), key_proj.data_ptr(), value_proj.data_ptr(),
          x.numel() // ROW_WIDTH, keys.data_ptr(), values.data_ptr(), torch.get_num_threads())
    return keys, values


# -- the two-layer memory --------------------------------------------------------------------
def memory_forward(q: Tensor, flat: Tensor, hidden: int, keep: bool
                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``M(q)`` (S, R, d) of the two-layer memory with flat weights (S, n); with ``keep`` also
    its pre-activation and activation (S, R, h) for :func:`memory_backward`. No autograd."""
    q, flat = _plain(q), _plain(flat)
    S, R, d = q.shape
    out = q.new_empty(S, R, d)
    a, s = (q.new_empty(S, R, hidden), q.new_empty(S, R, hidden)) if keep else (None, None)
    _call("titans_mlp_forward", q.data_ptr(), flat.data_ptr(), S, R, d, hidden, out.data_ptr(),
          _ptr(a), _ptr(s), torch.get_num_threads())
    return out, a, s


def memory_backward(q: Tensor, flat: Tensor, a: Tensor, s: Tensor, g: Tensor, need_q: bool,
                    need_weights: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`memory_forward` for g = d loss / d M(q): (gq, gflat)."""
    q, flat, g = _plain(q), _plain(flat), _plain(g)
    S, R, d = q.shape
    gq = torch.empty_like(q) if need_q else None
    gflat = torch.empty_like(flat) if need_weights else None
    _call("titans_mlp_backward", q.data_ptr(), flat.data_ptr(), a.data_ptr(), s.data_ptr(),
          g.data_ptr(), S, R, d, a.shape[-1], _ptr(gq), _ptr(gflat))
    return gq, gflat


def surprise_and_gradient(keys: Tensor, values: Tensor, flat: Tensor, hidden: int
                          ) -> tuple[Tensor, Tensor]:
    """The reference surprise ``sum_features mean_rows (M(keys) - values)^2`` per slot (S,) and
    its gradient with respect to the flat weights (S, n), in one call. No autograd."""
    keys, values, flat = _plain(keys), _plain(values), _plain(flat)
    S, R, d = keys.shape
    surprise, gflat = keys.new_empty(S), torch.empty_like(flat)
    _call("titans_mlp_surprise_and_gradient", keys.data_ptr(), values.data_ptr(),
          flat.data_ptr(), S, R, d, hidden, surprise.data_ptr(), gflat.data_ptr(),
          torch.get_num_threads())
    return surprise, gflat


def recall_error(keys: Tensor, values: Tensor, flat: Tensor, hidden: int) -> Tensor:
    """The reference surprise per slot (S,), differentiable once. Where only the weights can
    need a gradient, that gradient is computed in the same pass as the surprise."""
    if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
        return _RecallError.apply(keys, values, flat, hidden)
    return _SurpriseWithGradient.apply(flat, keys, values, hidden)


class _RecallError(torch.autograd.Function):
    """The surprise with the memory's forward and backward pass on the kernel."""

    @staticmethod
    def forward(ctx, keys: Tensor, values: Tensor, flat: Tensor, hidden: int) -> Tensor:
        out, a, s = memory_forward(keys, flat, hidden, keep=True)
        diff = out.sub_(values)  # (S, R, d)
        ctx.save_for_backward(keys, flat, a, s, diff)
        return diff.square().sum((1, 2)) / keys.shape[1]  # (S,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        keys, flat, a, s, diff = ctx.saved_tensors
        g_out = diff * (g * (2.0 / keys.shape[1]))[:, None, None]  # (S, R, d)
        need_keys, need_values, need_flat = ctx.needs_input_grad[:3]
        g_keys, g_flat = memory_backward(keys, flat, a, s, g_out, need_keys, need_flat)
        return g_keys, -g_out if need_values else None, g_flat, None


class _SurpriseWithGradient(torch.autograd.Function):
    """The surprise with the weights' gradient computed in the forward pass (one kernel call);
    the backward pass only scales it by the incoming gradient of each slot's surprise."""

    @staticmethod
    def forward(ctx, flat: Tensor, keys: Tensor, values: Tensor, hidden: int) -> Tensor:
        surprise, gflat = surprise_and_gradient(keys, values, flat, hidden)
        ctx.save_for_backward(gflat)
        return surprise

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        (gflat,) = ctx.saved_tensors
        return gflat * g[:, None], None, None, None


def commit_update(surprise: Tensor, grads: Tensor, new: Tensor, old: Tensor, updates: Tensor,
                  skipped: Tensor) -> tuple[Tensor, Tensor]:
    """Per slot, whether the surprise (S,), gradients and new weights (S, n) are all finite (ok),
    and the weights to keep: ``new`` where ok, else ``old``. Adds one to the ``updates``
    counter and the number of slots not ok to ``skipped`` (int64 scalars, in place)."""
    surprise, grads, new, old = _plain(surprise), _plain(grads), _plain(new), _plain(old)
    S, n = old.shape
    weights, ok = torch.empty_like(old), torch.empty(S, dtype=torch.bool, device=old.device)
    _call("titans_memory_commit", surprise.data_ptr(), grads.data_ptr(), new.data_ptr(),
          old.data_ptr(), S, n, weights.data_ptr(), ok.data_ptr(), updates.data_ptr(),
          skipped.data_ptr())
    return ok, weights


def momentum_step(surprise: Tensor, grads: Tensor, old: Tensor, momentum: Tensor, alpha: float,
                  eta: float, theta: float, updates: Tensor, skipped: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The Titans rule's step and the commit in one pass: per slot, ``m' = eta m - theta g``,
    ``w' = alpha w + m'``, whether the surprise (S,), g, w' and m' (S, n) are all finite (ok),
    and the weights and momentum to keep: (w', m') where ok, else (old, momentum). Counts the
    update and its skipped slots (int64 scalars, in place)."""
    surprise, grads = _plain(surprise), _plain(grads)
    old, momentum = _plain(old), _plain(momentum)
    S, n = old.shape
    weights, kept_momentum = torch.empty_like(old), torch.empty_like(momentum)
    ok = torch.empty(S, dtype=torch.bool, device=old.device)
    _call("titans_momentum_step", surprise.data_ptr(), grads.data_ptr(), old.data_ptr(),
          momentum.data_ptr(), S, n, alpha, eta, theta, weights.data_ptr(),
          kept_momentum.data_ptr(), ok.data_ptr(), updates.data_ptr(), skipped.data_ptr())
    return ok, weights, kept_momentum
