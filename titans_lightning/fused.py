"""Fused CPU kernels: the encoder's feed-forward and residual dropouts
(``csrc/feed_forward.cpp``), attention core (``csrc/attention.cpp``) and residual + layer norm
(``csrc/rows.cpp``), the MAC query and the memory's keys and values (``csrc/rows.cpp``), and the
two-layer neural memory with the update's surprise, gradient and finite check
(``csrc/memory_mlp.cpp``).

Shape legend
    M  rows (tokens of all windows)    d  row width (16)    f  feed-forward width

``feed_forward(x, w1, b1, w2, b2, p)`` computes ``linear2(dropout(silu(linear1(x))))`` for rows x
(M, d), forward and backward, without ever writing the (M, f) activation to memory: each slice of
it lives in vector registers between the two matrix products, and the backward pass recomputes
it. Dropout is the same Bernoulli(p) process as ``F.dropout``; the draws come from a
counter-based hash of (seed, row, unit), the seed from torch's generator (``torch.manual_seed``
fixes the masks); the forward pass keeps the decisions as bits for the backward pass.

``attention(qkv, heads, p)`` is ``dropout(softmax(q k^T / sqrt(e)), p) v`` per (window, head),
read from and written to the layouts of the projections around it, with the same kind of
counter-based dropout draws.

The two-layer memory's forward and backward pass (:func:`memory_forward`,
:func:`memory_backward`) do a slot's rows in one call instead of a library call per product;
:func:`memory_recall` gives the reference surprise and its weight gradient in one pass,
:func:`query_memory` the memory's answer to the MAC query, :func:`commit_update` the harness's
finite check and weight selection.

Without a gradient or dropout (evaluation), the encoder layer runs as four calls: the input
projection, :func:`attention`, :func:`project_add_layer_norm` and :func:`feed_forward_add_norm`.

The kernels are compiled on first use with the machine's C++ compiler (``$CXX`` or ``c++``) for its
own vector instructions and cached (``$TITANS_LIGHTNING_CACHE``, default
``~/.cache/titans_lightning``); ``$TITANS_LIGHTNING_CXXFLAGS`` adds compiler flags (for example
``-mno-avx512f`` for the portable vector code). Where no compiler is found, the build fails, or
``TITANS_LIGHTNING_FUSED=0`` is set, the ``supports_*`` functions say no and the model runs on
PyTorch operators, which compute the same functions.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
ROW_WIDTH = 16  # the kernel's d
_P, _I64, _U64, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32
_F32, _INT = ctypes.c_float, ctypes.c_int


def supports_feed_forward(x: Tensor, f: int) -> bool:
    """Whether the fused kernel can compute the feed-forward of ``x`` (..., d) with width f."""
    return _kernel_can_take(x) and x.shape[-1] == ROW_WIDTH and f % 16 == 0


def _kernel_can_take(x: Tensor) -> bool:
    """A float32 CPU tensor, no CPU autocast (its operators would hand the kernels other
    dtypes), and the kernels built."""
    return (_float32_cpu(x) and not torch.is_autocast_enabled("cpu")
            and library() is not None)


def _float32_cpu(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _dropout_seed(p: float) -> int:
    """A seed for the kernels' dropout draws, from torch's generator (0 when nothing drops)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if p > 0.0 else 0


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: float) -> Tensor:
    """``linear2(dropout(silu(linear1(x)), p))`` for rows x (M, d); differentiable."""
    seed = _dropout_seed(p)
    if not _needs_grad(x, w1, b1, w2, b2):  # no autograd node: its bookkeeping costs a kernel's
        return _feed_forward(x, w1, b1, w2, b2, p, seed, keep_bits=False)[0]
    return _FusedFeedForward.apply(x, w1, b1, w2, b2, p, seed)


def feed_forward_add_norm(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                          norm: torch.nn.LayerNorm) -> Tensor:
    """``norm(x + linear2(silu(linear1(x))))`` for rows x (M, d): the encoder layer's
    feed-forward, residual connection and post-norm in one pass, without dropout or autograd."""
    return _feed_forward(x, w1, b1, w2, b2, 0.0, 0, keep_bits=False, norm=norm)[0]


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _plain(t: Tensor) -> Tensor:
    """t as the kernels read it: contiguous, outside autograd (a detach only where needed: in a
    pass without a gradient it would be one more operation per tensor and call)."""
    if not _float32_cpu(t):  # the kernels would misread it
        raise TypeError(f"the fused CPU kernels take float32 CPU tensors, got {t.dtype} on "
                        f"{t.device}; check supports_*() before calling them")
    return (t.detach() if t.requires_grad else t).contiguous()


def _feed_forward(x, w1, b1, w2, b2, p: float, seed: int, keep_bits: bool,
                  norm: torch.nn.LayerNorm | None = None):
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
    failed = library().titans_ffn_forward(
        x.data_ptr(), M, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(), f, seed,
        _threshold(p), _scale(p), bits.data_ptr() if bits.numel() else None, out.data_ptr(),
        torch.get_num_threads(), norm_w.data_ptr() if norm is not None else None,
        norm_b.data_ptr() if norm is not None else None, norm.eps if norm is not None else 0.0)
    _check(failed)
    return out, (x, w1, b1, w2), bits


class _FusedFeedForward(torch.autograd.Function):
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
        failed = library().titans_ffn_backward(
            x.data_ptr(), M, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), f, g.data_ptr(),
            ctx.seed, _threshold(ctx.p), bits.data_ptr() if ctx.p > 0.0 else None, _scale(ctx.p),
            gx.data_ptr(), gw1.data_ptr(), gb1.data_ptr(), gw2.data_ptr(),
            torch.get_num_threads())
        _check(failed)
        return gx, gw1, gb1, gw2, g.sum(0), None, None


def supports_memory(q: Tensor, flat: Tensor, hidden: int) -> bool:
    """Whether the kernel can run the two-layer memory with flat weights (S, n) for queries
    q (S, R, d)."""
    if not (_kernel_can_take(q) and q.dim() == 3 and _float32_cpu(flat)):
        return False
    d = q.shape[-1]
    return (tuple(flat.shape) == (q.shape[0], 2 * hidden * d + hidden + d)
            and _memory_widths_supported(d, hidden))


def supports_recall(keys: Tensor, values: Tensor, flat: Tensor, hidden: int) -> bool:
    """Whether :func:`memory_recall` can take these keys and values (S, R, d) and weights."""
    return (supports_memory(keys, flat, hidden) and values.shape == keys.shape
            and _float32_cpu(values))


@lru_cache(maxsize=None)
def _memory_widths_supported(d: int, hidden: int) -> bool:  # asked a few times per window group
    return bool(library().titans_mlp_supported(d, hidden))


def memory_forward(q: Tensor, flat: Tensor, hidden: int, keep: bool
                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``M(q)`` (S, R, d) of the two-layer memory with flat weights (S, n); with ``keep`` also
    its pre-activation and activation (S, R, h) for :func:`memory_backward`. No autograd."""
    q, flat = _plain(q), _plain(flat)
    S, R, d = q.shape
    out = q.new_empty(S, R, d)
    a, s = (q.new_empty(S, R, hidden), q.new_empty(S, R, hidden)) if keep else (None, None)
    library().titans_mlp_forward(q.data_ptr(), flat.data_ptr(), S, R, d, hidden, out.data_ptr(),
                                 a.data_ptr() if keep else None, s.data_ptr() if keep else None,
                                 torch.get_num_threads())
    return out, a, s


def memory_backward(q: Tensor, flat: Tensor, a: Tensor, s: Tensor, g: Tensor, need_q: bool,
                    need_weights: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`memory_forward` for g = d loss / d M(q): (gq, gflat)."""
    q, flat, g = _plain(q), _plain(flat), _plain(g)
    S, R, d = q.shape
    gq = torch.empty_like(q) if need_q else None
    gflat = torch.empty_like(flat) if need_weights else None
    library().titans_mlp_backward(q.data_ptr(), flat.data_ptr(), a.data_ptr(), s.data_ptr(),
                                  g.data_ptr(), S, R, d, a.shape[-1],
                                  gq.data_ptr() if need_q else None,
                                  gflat.data_ptr() if need_weights else None)
    return gq, gflat


def memory_recall(keys: Tensor, values: Tensor, flat: Tensor, hidden: int
                  ) -> tuple[Tensor, Tensor]:
    """The reference surprise ``sum_features mean_rows (M(keys) - values)^2`` per slot (S,) and
    its gradient with respect to the flat weights (S, n), in one call. No autograd."""
    keys, values, flat = _plain(keys), _plain(values), _plain(flat)
    S, R, d = keys.shape
    surprise, gflat = keys.new_empty(S), torch.empty_like(flat)
    library().titans_mlp_recall(keys.data_ptr(), values.data_ptr(), flat.data_ptr(), S, R, d,
                                hidden, surprise.data_ptr(), gflat.data_ptr(),
                                torch.get_num_threads())
    return surprise, gflat


def supports_commit(*tensors: Tensor) -> bool:
    """Whether the kernel can check and apply an update of these float32 CPU tensors (none
    needing a gradient)."""
    return _float32_cpu(*tensors) and not _needs_grad(*tensors) and library() is not None


def commit_update(surprise: Tensor, grads: Tensor, new: Tensor, old: Tensor, updates: Tensor,
                  skipped: Tensor) -> tuple[Tensor, Tensor]:
    """Per slot, whether the surprise (S,), gradients and new weights (S, n) are all finite (ok),
    and the weights to keep: ``new`` where ok, else ``old``. Adds one to the ``updates``
    counter and the number of slots not ok to ``skipped`` (int64 scalars, in place)."""
    surprise, grads, new, old = _plain(surprise), _plain(grads), _plain(new), _plain(old)
    S, n = old.shape
    weights, ok = torch.empty_like(old), torch.empty(S, dtype=torch.bool, device=old.device)
    library().titans_memory_commit(surprise.data_ptr(), grads.data_ptr(), new.data_ptr(),
                                   old.data_ptr(), S, n, weights.data_ptr(), ok.data_ptr(),
                                   updates.data_ptr(), skipped.data_ptr())
    return ok, weights


def supports_titans_update(x: Tensor, key_proj: Tensor, value_proj: Tensor, flat: Tensor,
                           momentum: Tensor, hidden: int) -> bool:
    """Whether :func:`titans_update` can take layer outputs x (S, R, 16), the (16, 16)
    projections and the two-layer memory's flat weights and momentum (S, n), none of them
    needing a gradient."""
    return (supports_keys_values(x, key_proj, value_proj) and supports_memory(x, flat, hidden)
            and momentum.shape == flat.shape and _float32_cpu(momentum)
            and not _needs_grad(flat, momentum))


def titans_update(x: Tensor, key_proj: Tensor, value_proj: Tensor, flat: Tensor,
                  momentum: Tensor, alpha: float, eta: float, theta: float, hidden: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The built-in Titans rule in one call: keys ``normalize(silu(x K^T))``, values
    ``silu(x V^T)``, the surprise (S,) and its gradient g (S, n), momentum ``eta m - theta g``
    and weights ``alpha w + momentum``. Returns (surprise, g, weights, momentum); no autograd."""
    x, key_proj, value_proj = _plain(x), _plain(key_proj), _plain(value_proj)
    flat, momentum = _plain(flat), _plain(momentum)
    S, R, d = x.shape
    surprise = x.new_empty(S)
    grads, weights, new_momentum = (torch.empty_like(flat) for _ in range(3))
    library().titans_update(x.data_ptr(), key_proj.data_ptr(), value_proj.data_ptr(),
                            flat.data_ptr(), momentum.data_ptr(), alpha, eta, theta, S, R, d,
                            hidden, surprise.data_ptr(), grads.data_ptr(), weights.data_ptr(),
                            new_momentum.data_ptr(), torch.get_num_threads())
    return surprise, grads, weights, new_momentum


def supports_attention(x: Tensor, head_width: int) -> bool:
    """Whether the kernel can run the attention core of x (N, L, d) with heads of width e."""
    return _kernel_can_take(x) and _attention_sizes_supported(head_width, x.shape[-2])


@lru_cache(maxsize=None)
def _attention_sizes_supported(head_width: int, tokens: int) -> bool:
    return bool(library().titans_attention_supported(head_width, tokens))


def attention(qkv: Tensor, heads: int, p: float) -> Tensor:
    """``dropout(softmax(q k^T / sqrt(e)), p) v`` per window and head, from the input projection
    qkv (N, L, 3d) laid out as (N, L, 3, heads, e); returns (N, L, d). Differentiable."""
    seed = _dropout_seed(p)
    if not _needs_grad(qkv):
        return _attention(qkv, heads, p, seed, keep_weights=False)[0]
    return _Attention.apply(qkv, heads, p, seed)


def _attention(qkv, heads: int, p: float, seed: int, keep_weights: bool):
    """The kernel's forward pass -> (out (N, L, d), qkv made contiguous, the softmax weights
    before dropout (N * heads, L, Lp) if kept for a backward pass, else None)."""
    qkv = _plain(qkv)
    N, L, three_d = qkv.shape
    d = three_d // 3
    lib = library()
    weights = (qkv.new_empty(N * heads, L, lib.titans_attention_padded(L)) if keep_weights
               else None)
    out = qkv.new_empty(N, L, d)
    lib.titans_attention_forward(qkv.data_ptr(), N, L, heads, d // heads, seed, _threshold(p),
                                 _scale(p), weights.data_ptr() if keep_weights else None,
                                 out.data_ptr(), torch.get_num_threads())
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
        library().titans_attention_backward(
            qkv.data_ptr(), weights.data_ptr(), g.data_ptr(), N, L, ctx.heads,
            three_d // 3 // ctx.heads, ctx.seed, _threshold(ctx.p), _scale(ctx.p),
            gqkv.data_ptr(), torch.get_num_threads())
        return gqkv, None, None, None


def supports_layer_norm(x: Tensor, norm: torch.nn.LayerNorm) -> bool:
    """Whether the kernel can compute ``norm(x + r)`` for rows x (..., 16)."""
    return (_kernel_can_take(x) and tuple(norm.normalized_shape) == (ROW_WIDTH,)
            and norm.weight is not None and norm.bias is not None)


def add_layer_norm(x: Tensor, r: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    """``norm(x + r)``, the residual connection and layer norm in one pass; differentiable."""
    if not _needs_grad(x, r, norm.weight, norm.bias):
        return _add_layer_norm(x, r, norm.weight, norm.bias, norm.eps)[0]
    return _AddLayerNorm.apply(x, r, norm.weight, norm.bias, norm.eps)


def project_add_layer_norm(x: Tensor, r: Tensor, project: torch.nn.Linear,
                           norm: torch.nn.LayerNorm) -> Tensor:
    """``norm(x + project(r))`` for rows of width 16 (a 16 x 16 ``project`` with a bias): the
    attention's output projection, residual connection and post-norm in one pass; no autograd."""
    return _add_layer_norm(x, r, norm.weight, norm.bias, norm.eps, project)[0]


def _add_layer_norm(x, r, w, b, eps: float, project: torch.nn.Linear | None = None):
    """The kernel's forward pass -> (out, the inputs its backward pass needs)."""
    if r.shape != x.shape:
        raise ValueError(f"the residual branch {tuple(r.shape)} must have the shape of its "
                         f"input {tuple(x.shape)}")
    x, r, w, b = _plain(x), _plain(r), _plain(w), _plain(b)
    pw = pb = None
    if project is not None:
        pw, pb = _plain(project.weight), _plain(project.bias)
    out = torch.empty_like(x)
    library().titans_layer_norm_forward(x.data_ptr(), r.data_ptr(), w.data_ptr(), b.data_ptr(),
                                        x.numel() // ROW_WIDTH, eps, out.data_ptr(),
                                        torch.get_num_threads(),
                                        pw.data_ptr() if project is not None else None,
                                        pb.data_ptr() if project is not None else None)
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
        library().titans_layer_norm_backward(x.data_ptr(), r.data_ptr(), w.data_ptr(),
                                             g.data_ptr(), x.numel() // ROW_WIDTH, ctx.eps,
                                             gx.data_ptr(), gw.data_ptr(), gb.data_ptr(),
                                             torch.get_num_threads())
        return gx, gx, gw, gb, None


def supports_query(x: Tensor, linear: torch.nn.Linear) -> bool:
    """Whether the kernel can compute the MAC query of rows x (..., 16) without a gradient."""
    return (_kernel_can_take(x) and not torch.is_grad_enabled()
            and linear.in_features == linear.out_features == ROW_WIDTH
            and linear.bias is not None)


def query(x: Tensor, linear: torch.nn.Linear, then_silu: bool) -> Tensor:
    """``normalize(linear(x))`` over the last dimension, then silu if asked; no autograd."""
    x, w, b = _plain(x), _plain(linear.weight), _plain(linear.bias)
    out = torch.empty_like(x)
    library().titans_query_forward(x.data_ptr(), w.data_ptr(), b.data_ptr(), x.numel() // ROW_WIDTH,
                                   int(then_silu), out.data_ptr(), torch.get_num_threads())
    return out


def supports_query_memory(x: Tensor, linear: torch.nn.Linear, flat: Tensor, hidden: int) -> bool:
    """Whether one kernel call can give the two-layer memory's answer to the MAC query of rows
    x (S, R, 16), without a gradient."""
    return supports_query(x, linear) and supports_memory(x, flat, hidden)


def query_memory(x: Tensor, linear: torch.nn.Linear, then_silu: bool, flat: Tensor,
                 hidden: int) -> Tensor:
    """``M(query(x, linear, then_silu))`` for rows x (S, R, 16) and the two-layer memory's flat
    weights (S, n): the query never leaves the registers; no autograd."""
    x, flat, w, b = _plain(x), _plain(flat), _plain(linear.weight), _plain(linear.bias)
    S, R, d = x.shape
    out = torch.empty_like(x)
    library().titans_mlp_query_forward(x.data_ptr(), w.data_ptr(), b.data_ptr(), int(then_silu),
                                       flat.data_ptr(), S, R, d, hidden, out.data_ptr(),
                                       torch.get_num_threads())
    return out


def supports_keys_values(x: Tensor, *projections: Tensor) -> bool:
    """Whether the kernel can compute the reference keys and values of rows x (..., 16) with
    (16, 16) projections, none of them needing a gradient."""
    return (_kernel_can_take(x) and x.shape[-1] == ROW_WIDTH
            and all(p.shape == (ROW_WIDTH, ROW_WIDTH) for p in projections)
            and _float32_cpu(*projections)
            and not _needs_grad(x, *projections))


def keys_values(x: Tensor, key_proj: Tensor, value_proj: Tensor) -> tuple[Tensor, Tensor]:
    """``normalize(silu(x K^T))`` and ``silu(x V^T)`` over the last dimension; no autograd."""
    x, key_proj, value_proj = _plain(x), _plain(key_proj), _plain(value_proj)
    keys, values = torch.empty_like(x), torch.empty_like(x)
    library().titans_keys_values_forward(x.data_ptr(), key_proj.data_ptr(),
                                         value_proj.data_ptr(), x.numel() // ROW_WIDTH,
                                         keys.data_ptr(), values.data_ptr(),
                                         torch.get_num_threads())
    return keys, values


def supports_dropout(x: Tensor) -> bool:
    """Whether the kernel can apply dropout to x (a float32 CPU tensor of 16k elements)."""
    return _kernel_can_take(x) and x.numel() % ROW_WIDTH == 0


def dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout (training), with the kernels' counter-based draws: x seen as rows of 16,
    row r keeps element j as ``keep_mask(seed, p, rows, 16)`` says; differentiable (the
    backward pass draws the same decisions again from the seed)."""
    seed = _dropout_seed(p)
    if not _needs_grad(x):
        return _dropout(x, p, seed)
    return _FusedDropout.apply(x, p, seed)


def _dropout(x: Tensor, p: float, seed: int) -> Tensor:
    x = _plain(x)
    out = torch.empty_like(x)
    library().titans_dropout_apply(x.data_ptr(), x.numel() // ROW_WIDTH, seed, _threshold(p),
                                   _scale(p), out.data_ptr(), torch.get_num_threads())
    return out


class _FusedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return _dropout(x, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return _dropout(g, ctx.p, ctx.seed), None, None


def keep_mask(seed: int, p: float, rows: int, f: int) -> Tensor:
    """The kernel's dropout decisions for a given seed, (rows, f) booleans (True = kept)."""
    keep = torch.empty(rows, f, dtype=torch.uint8)
    library().titans_dropout_keep(seed, _threshold(p), rows, f, keep.data_ptr())
    return keep.bool()


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("the fused feed-forward could not allocate its scratch buffers")


def _threshold(p: float) -> int:
    """Drop when the 32-bit draw is below this: P(drop) = p to within 2^-32."""
    return min(round(p * 2.0**32), 2**32 - 1)


def _scale(p: float) -> float:
    return 1.0 / (1.0 - p)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per machine and source version; None if unavailable."""
    if os.environ.get("TITANS_LIGHTNING_FUSED", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"the fused CPU feed-forward is unavailable, and the other CPU kernels with "
                      f"it ({err}); the model runs on PyTorch operators, which is slower. Install "
                      "a C++ compiler (g++ or clang++) or set CXX to use them; set "
                      "TITANS_LIGHTNING_FUSED=0 to silence this.",
                      RuntimeWarning, stacklevel=2)
        return None
    lib.titans_ffn_forward.argtypes = [_P, _I64, _P, _P, _P, _P, _I64, _U64, _U32, _F32,
                                       _P, _P, _INT, _P, _P, _F32]
    lib.titans_ffn_forward.restype = _INT
    lib.titans_ffn_backward.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _U64, _U32, _P,
                                        _F32, _P, _P, _P, _P, _INT]
    lib.titans_ffn_backward.restype = _INT
    lib.titans_dropout_keep.argtypes = [_U64, _U32, _I64, _I64, _P]
    lib.titans_dropout_keep.restype = None
    lib.titans_dropout_apply.argtypes = [_P, _I64, _U64, _U32, _F32, _P, _INT]
    lib.titans_dropout_apply.restype = None
    lib.titans_attention_supported.argtypes = [_I64, _I64]
    lib.titans_attention_padded.argtypes = [_I64]
    lib.titans_attention_padded.restype = _I64
    lib.titans_attention_forward.argtypes = [_P, _I64, _I64, _I64, _I64, _U64, _U32,
                                             _F32, _P, _P, _INT]
    lib.titans_attention_backward.argtypes = [_P, _P, _P, _I64, _I64, _I64, _I64, _U64, _U32,
                                              _F32, _P, _INT]
    lib.titans_layer_norm_forward.argtypes = [_P, _P, _P, _P, _I64, _F32, _P, _INT, _P, _P]
    lib.titans_layer_norm_forward.restype = None
    lib.titans_layer_norm_backward.argtypes = [_P, _P, _P, _P, _I64, _F32, _P, _P, _P, _INT]
    lib.titans_layer_norm_backward.restype = None
    lib.titans_query_forward.argtypes = [_P, _P, _P, _I64, _INT, _P, _INT]
    lib.titans_query_forward.restype = None
    lib.titans_keys_values_forward.argtypes = [_P, _P, _P, _I64, _P, _P, _INT]
    lib.titans_keys_values_forward.restype = None
    lib.titans_mlp_supported.argtypes = [_I64, _I64]
    lib.titans_mlp_forward.argtypes = [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT]
    lib.titans_mlp_forward.restype = _INT
    lib.titans_mlp_backward.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P]
    lib.titans_mlp_backward.restype = _INT
    lib.titans_mlp_recall.argtypes = [_P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _INT]
    lib.titans_mlp_recall.restype = _INT
    lib.titans_memory_commit.argtypes = [_P, _P, _P, _P, _I64, _I64, _P, _P, _P, _P]
    lib.titans_memory_commit.restype = None
    lib.titans_mlp_query_forward.argtypes = [_P, _P, _P, _INT, _P, _I64, _I64, _I64, _I64,
                                             _P, _INT]
    lib.titans_mlp_query_forward.restype = _INT
    lib.titans_update.argtypes = [_P, _P, _P, _P, _P, _F32, _F32, _F32, _I64, _I64, _I64, _I64,
                                  _P, _P, _P, _P, _INT]
    lib.titans_update.restype = _INT
    return lib


def _build() -> Path:
    """Compile the kernel into the cache unless a build for this source and CPU is there."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") \
        or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    flags = FLAGS + os.environ.get("TITANS_LIGHTNING_CXXFLAGS", "").split()
    code = [path.read_bytes() for path in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*code, " ".join(flags).encode(), compiler.encode(),
                                     _cpu_signature()])).hexdigest()[:16]
    cache = Path(os.environ.get("TITANS_LIGHTNING_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "titans_lightning")
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    print(f"titans-lightning: compiling the CPU kernels into {target} (once per machine and "
          "source version, about 20 s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # concurrent builds never see half a file
        built = Path(tmp) / target.name
        # With OpenMP the kernels share PyTorch's CPU thread pool (the libgomp.so.1 already
        # loaded), so the two never compete for cores as separately created threads would;
        # without it they run on one thread.
        for threading in (["-fopenmp"], []):
            result = subprocess.run([compiler, *flags, *threading, *map(str, SOURCES), "-o",
                                     str(built)], capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _cpu_signature() -> bytes:
    """What ``-march=native`` depends on: a build is reused only on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo", "rb") as info:
            lines = [ln for ln in info if ln.startswith((b"model name", b"flags"))][:2]
        return b"".join(lines)
    except OSError:
        return f"{platform.machine()} {platform.processor()} {sys.platform}".encode()
