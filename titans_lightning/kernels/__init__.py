"""The operations the model, the memory and the rules call, and the one place that chooses, per
call, how each runs: the CPU kernels (:mod:`.cpu`, C++ in ``titans_lightning/csrc/``) for
float32 CPU tensors of sizes they take, when they are built and not switched off; otherwise
the PyTorch implementation (:mod:`.reference`), which is their specification and what CUDA,
MPS and XPU, float64 and half precision run. Both compute the same function, to float rounding.

Shape legend
    N  windows    L  tokens per window    d  row width    f  feed-forward width
    S  memory slots    R  rows per slot    n  flat weights of a slot    h  hidden width

``TITANS_LIGHTNING_KERNELS=0`` switches the kernels off. :func:`why_not` says why an operation
would not run on its kernel for given arguments, for example
``kernels.why_not("memory_mlp", q, flat)`` -> ``["hidden width 24 not among the kernel's
(16, 32, 64)"]``; an empty list means the kernel runs. The library is built (once per machine,
:mod:`.build`) only when a call would run on it, that is when a float32 CPU tensor of sizes
it takes first reaches an operation.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..contract import PROBING
from . import build, cpu, reference
from .reference import Drops, all_finite, dropout_draws

ROW_WIDTH = cpu.ROW_WIDTH  # the width of the rows the row kernels take
HEAD_WIDTHS = (4, 8, 16, 32)  # the attention kernel's head widths (csrc/attention.cpp)
MAX_TOKENS = 256  # and its longest window
MEMORY_WIDTHS = (16, 32)  # the memory kernels' d (csrc/memory_mlp.cpp)
MEMORY_HIDDEN = (16, 32, 64)  # and h

__all__ = ["attention", "add_norm", "feed_forward_add_norm", "mac_query", "keys_values",
           "memory_mlp", "recall_error", "recall_error_and_gradient", "commit_update",
           "momentum_step", "all_finite", "dropout_draws", "why_not", "available",
           "KernelSizeWarning"]


# -- the encoder layer -------------------------------------------------------------------------
def attention(qkv: Tensor, heads: int, p: float, drops: Drops | None = None) -> Tensor:
    """``dropout(softmax(q k^T / sqrt(e)), p) v`` per window and head, from the input projection
    qkv (N, L, 3d) laid out as (N, L, 3, heads, e); returns (N, L, d). ``drops``: where the
    PyTorch path takes the dropped positions of the weights from (:func:`dropout_draws`)."""
    if _runs_on_kernel("attention", qkv, heads, p):
        return cpu.attention(qkv, heads, p)
    return reference.attention(qkv, heads, p, drops)


def add_norm(x: Tensor, r: Tensor, norm: nn.LayerNorm, p: float, drops: Drops | None = None,
             project: nn.Linear | None = None) -> Tensor:
    """``norm(x + dropout(project(r), p))`` (``project`` None: r itself) for x (..., d)."""
    if not _runs_on_kernel("add_norm", x, r, norm, p, drops, project):
        return reference.add_norm(x, r, norm, p, drops, project)
    weights = (norm.weight, norm.bias) + ((project.weight, project.bias) if project else ())
    if p == 0.0 and not cpu._needs_grad(x, r, *weights):  # one pass, the projection included
        if project is not None:
            return cpu.project_add_layer_norm(x, r, project, norm)
        return cpu.add_layer_norm(x, r, norm)
    if project is not None:
        r = project(r)
    if p > 0.0:
        r = cpu.dropout(r, p)
    return cpu.add_layer_norm(x, r, norm)


def feed_forward_add_norm(x: Tensor, linear1: nn.Linear, linear2: nn.Linear, norm: nn.LayerNorm,
                          p: float, drops: Drops | None = None) -> Tensor:
    """``norm(x + dropout(linear2(dropout(silu(linear1(x)), p)), p))`` for x (..., d): the
    encoder layer's feed-forward, residual connection and post-norm."""
    if not _runs_on_kernel("feed_forward_add_norm", x, linear1, linear2, norm, p, drops):
        return reference.feed_forward_add_norm(x, linear1, linear2, norm, p, drops)
    rows = x.reshape(-1, x.shape[-1])  # (M, d)
    params = (linear1.weight, linear1.bias, linear2.weight, linear2.bias)
    if p == 0.0 and not cpu._needs_grad(x, *params, norm.weight, norm.bias):  # one pass
        return cpu.feed_forward_add_norm(rows, *params, norm).view(x.shape)
    h = cpu.feed_forward(rows, *params, p).view(x.shape)
    if p > 0.0:
        h = cpu.dropout(h, p)
    return cpu.add_layer_norm(x, h, norm)


# -- the MAC layer and the memory rules' rows --------------------------------------------------
def mac_query(x: Tensor, linear: nn.Linear, then_silu: bool) -> Tensor:
    """The memory query ``normalize(linear(x))`` of rows x (..., d), then silu if asked."""
    if _runs_on_kernel("mac_query", x, linear, then_silu):
        return cpu.mac_query(x, linear, then_silu)
    return reference.mac_query(x, linear, then_silu)


def keys_values(x: Tensor, key_proj: Tensor, value_proj: Tensor) -> tuple[Tensor, Tensor]:
    """``(normalize(silu(x K^T)), silu(x V^T))`` of rows x (..., d), over the last dimension."""
    if _runs_on_kernel("keys_values", x, key_proj, value_proj):
        return cpu.keys_values(x, key_proj, value_proj)
    return reference.keys_values(x, key_proj, value_proj)


# -- the two-layer memory ----------------------------------------------------------------------
def memory_mlp(q: Tensor, flat: Tensor) -> Tensor:
    """``M(q) = silu(q W1^T + b1) W2^T + b2`` per slot, for queries q (S, R, d) and the flat
    weights (S, n) laid out ``[W1 (h, d) | b1 (h) | W2 (d, h) | b2 (d)]``. Differentiable,
    twice (a differentiable rule's outer gradient goes through its backward pass)."""
    if torch.is_grad_enabled() and (q.requires_grad or flat.requires_grad):
        return _TwoLayerMemory.apply(q, flat)
    if _runs_on_kernel("memory_mlp", q, flat):
        return cpu.memory_forward(q, flat, reference.hidden_width(flat, q.shape[-1]), False)[0]
    return reference.two_layer(q, *reference.two_layer_weights(flat, q.shape[-1]))[0]


class _TwoLayerMemory(torch.autograd.Function):
    """The two-layer memory as one autograd node, whose backward is four products and two sums
    (autograd through the composite spends most of an update on bookkeeping: a node, views and
    copies per weight). Each pass runs on the kernel where it can; a backward pass that is
    itself differentiated runs on PyTorch's operators."""

    @staticmethod
    def forward(ctx, q: Tensor, flat: Tensor) -> Tensor:
        d = q.shape[-1]
        if _runs_on_kernel("memory_mlp", q, flat):
            out, a, s = cpu.memory_forward(q, flat, reference.hidden_width(flat, d), keep=True)
        else:
            out, a, s = reference.two_layer(q, *reference.two_layer_weights(flat, d))
        ctx.save_for_backward(q, flat, a, s)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        q, flat, a, s = ctx.saved_tensors
        if not torch.is_grad_enabled() and _runs_on_kernel("memory_mlp", q, flat):
            return cpu.memory_backward(q, flat, a, s, g, *ctx.needs_input_grad)
        return reference.two_layer_backward(q, flat, a, s, g, *ctx.needs_input_grad)


def recall_error(keys: Tensor, values: Tensor, flat: Tensor, twice_differentiable: bool = False
                 ) -> Tensor:
    """How badly the two-layer memory with flat weights (S, n) recalls ``values`` (S, R, d)
    from ``keys``: per slot, the sum over features of the mean over rows of
    ``(M(keys) - values)^2`` (S,), differentiable (twice where asked). Where only the weights
    can need a gradient, the CPU kernel computes that gradient with the surprise, in one pass,
    and the backward pass only scales it."""
    if _runs_on_kernel("recall_error", keys, values, flat, twice_differentiable):
        return cpu.recall_error(keys, values, flat, reference.hidden_width(flat, keys.shape[-1]))
    return (memory_mlp(keys, flat) - values).pow(2).sum((1, 2)) / values.shape[1]


def recall_error_and_gradient(keys: Tensor, values: Tensor, flat: Tensor
                              ) -> tuple[Tensor, Tensor]:
    """:func:`recall_error` (S,) and its gradient with respect to ``flat`` (S, n), of the
    surprises' sum, without a graph: one call on the CPU kernel, PyTorch's autograd otherwise."""
    keys, values, flat = keys.detach(), values.detach(), flat.detach()
    if _runs_on_kernel("recall_error", keys, values, flat):
        return cpu.surprise_and_gradient(keys, values, flat,
                                         reference.hidden_width(flat, keys.shape[-1]))
    return reference.value_and_gradient(lambda w: recall_error(keys, values, w), flat)


def commit_update(surprise: Tensor, grads: Tensor, new: Tensor, old: Tensor, updates: Tensor,
                  skipped: Tensor) -> tuple[Tensor, Tensor]:
    """The update's check: per slot (S,), whether the surprise (S,), gradients and new weights
    (S, n) are all finite (ok), and the weights to keep, ``new`` where ok, else ``old`` (S, n).
    Adds one to the ``updates`` counter and the slots not ok to ``skipped`` (in place)."""
    if _runs_on_kernel("commit_update", surprise, grads, new, old, updates, skipped):
        return cpu.commit_update(surprise, grads, new, old, updates, skipped)
    return reference.commit_update(surprise, grads, new, old, updates, skipped)


def momentum_step(surprise: Tensor, grads: Tensor, old: Tensor, momentum: Tensor, alpha: float,
                  eta: float, theta: float, updates: Tensor, skipped: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The Titans rule's step from the gradients (S, n) and the momentum (S, n),
    ``m' = eta m - theta g`` and ``w' = alpha old + m'``, committed as :func:`commit_update`
    commits (the surprise (S,), g, w' and m' checked per slot): (ok (S,), the weights to keep,
    the momentum to keep), each slot's pair new where ok, else old. Counts as it does."""
    if _runs_on_kernel("momentum_step", surprise, grads, old, momentum, alpha, eta, theta,
                       updates, skipped):
        return cpu.momentum_step(surprise, grads, old, momentum, alpha, eta, theta, updates,
                                 skipped)
    return reference.momentum_step(surprise, grads, old, momentum, alpha, eta, theta, updates,
                                   skipped)


# -- the choice ------------------------------------------------------------------------------
def why_not(op: str, *args) -> list[str]:
    """Why ``op`` (the name of an operation above) would not run on its CPU kernel for these
    arguments, as the operation takes them: one line per reason, empty when the kernel runs.
    The library is built only when nothing else stands in the way, so a build failure
    (``"library not built: ..."``) is reported only then."""
    if op not in _REFUSALS:
        raise ValueError(f"no operation {op!r}; the operations are {sorted(_REFUSALS)}")
    reasons = _REFUSALS[op](*args)
    if not reasons and build.failure() is not None:
        reasons.append(f"library not built: {build.failure()}")
    return reasons


def available() -> bool:
    """Whether the kernels are switched on and built (builds them if not tried yet)."""
    return not build.switched_off() and build.failure() is None


def _runs_on_kernel(op: str, *args) -> bool:
    # Asked about 600 times per batch, so the refusals are plain functions returning lists
    # (a chain of generators cost several times more) and the build is asked last.
    reasons = _REFUSALS[op](*args)
    if reasons:
        if type(reasons[0]) is _Size:  # else not all of them are: no warning, no call
            _warn_about_sizes(op, reasons)
        return False
    return build.failure() is None


class KernelSizeWarning(RuntimeWarning):
    """Float32 CPU tensors, the kernels switched on, and an operation runs on PyTorch's
    operators only because of its sizes (``--model.hidden_dim 32``, say): the same results,
    slower. Shown once per process for each operation and its sizes."""


class _Size(str):
    """A refusal for a size the kernel does not take: it holds for every call of the model."""


_SIZES_WARNED: set[tuple[str, ...]] = set()  # (op, *reasons) already warned about
_OWN_FILES = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent),
              str(Path(__file__).resolve().parents[1] / "memory_network.py"))


def _warn_about_sizes(op: str, reasons: list[str]) -> None:
    key = (op, *reasons)
    if key in _SIZES_WARNED or not all(isinstance(r, _Size) for r in reasons) or PROBING.get():
        return  # said already, other sizes alone would not help, or the probe's own sizes
    if build.known_failure() is not None:
        return  # the build failure has been reported; no size would bring the kernels back
    _SIZES_WARNED.add(key)
    level, frame = 2, sys._getframe(1)  # the warning points at the first caller outside the
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_FILES):  # kernels
        frame, level = frame.f_back, level + 1
    warnings.warn(
        f"{op} runs on PyTorch's operators, not its CPU kernel, for sizes the kernel does not "
        f"take: {'; '.join(reasons)}. The results are the same, only slower; "
        "titans_lightning.kernels.why_not says why for any call, and the README's kernel "
        "section lists the sizes each kernel takes", KernelSizeWarning, stacklevel=level)


def _cpu_float32(*tensors: Tensor, autocast: bool = True) -> list[str]:
    """The switch, devices and dtypes (and CPU autocast, whose operators would hand the kernels
    other dtypes), each reason once. The usual case, all float32 on the CPU, takes one
    attribute test per tensor."""
    reasons = [f"disabled by {build.SWITCH}=0"] if build.switched_off() else []
    for t in tensors:
        if not t.is_cpu or t.dtype is not torch.float32:
            devices = {t.device.type for t in tensors if not t.is_cpu}
            reasons += [f"tensor on {device}" for device in sorted(devices)]
            dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors
                      if t.dtype is not torch.float32}
            reasons += [f"{dtype} tensor" for dtype in sorted(dtypes)]
            break
    if autocast and torch.is_autocast_enabled("cpu"):
        reasons.append("CPU autocast is on")
    return reasons


def _no_grad_needed(*tensors: Tensor) -> list[str]:
    if cpu._needs_grad(*tensors):
        return ["a gradient is needed (the kernel has no backward pass)"]
    return []


def _rows(x: Tensor, what: str = "rows") -> list[str]:
    if x.shape[-1] != ROW_WIDTH:
        return [_Size(f"{what} of width {x.shape[-1]}, the kernel takes {ROW_WIDTH}")]
    return []


def _dropout_probability(p: float) -> list[str]:
    if not 0.0 <= p < 1.0:
        return [f"dropout probability {p} outside [0, 1)"]
    return []


def _norm(norm: nn.LayerNorm) -> list[str]:
    if tuple(norm.normalized_shape) != (ROW_WIDTH,) or norm.weight is None or norm.bias is None:
        return [_Size(f"a layer norm other than an affine one over {ROW_WIDTH} features")]
    return []


def _linear(linear: nn.Linear, name: str, outputs: int | None = ROW_WIDTH) -> list[str]:
    reasons = []
    if linear.in_features != ROW_WIDTH or (outputs is not None and linear.out_features != outputs):
        reasons.append(_Size(f"{name} of {linear.in_features} -> {linear.out_features} features"))
    if linear.bias is None:
        reasons.append(f"{name} without a bias")
    return reasons


def _attention_refusals(qkv: Tensor, heads: int, p: float) -> list[str]:
    reasons = _cpu_float32(qkv)
    e, L = qkv.shape[-1] // 3 // heads, qkv.shape[-2]
    if e not in HEAD_WIDTHS:
        reasons.append(_Size(f"head width {e} not among the kernel's {HEAD_WIDTHS}"))
    if not 1 <= L <= MAX_TOKENS:
        reasons.append(_Size(f"windows of {L} tokens, the kernel takes 1 to {MAX_TOKENS}"))
    return reasons + _dropout_probability(p)


def _add_norm_refusals(x: Tensor, r: Tensor, norm: nn.LayerNorm, p: float, drops=None,
                       project: nn.Linear | None = None) -> list[str]:
    weights = (norm.weight, norm.bias) if norm.weight is not None and norm.bias is not None else ()
    reasons = []
    if project is not None:
        weights += tuple(t for t in (project.weight, project.bias) if t is not None)
        reasons += _linear(project, "a projection")
    reasons += _cpu_float32(x, r, *weights) + _rows(x) + _norm(norm)
    if project is None and r.shape != x.shape:
        reasons.append(f"a residual branch {tuple(r.shape)} of another shape than its input")
    return reasons + _dropout_probability(p)


def _feed_forward_refusals(x: Tensor, linear1: nn.Linear, linear2: nn.Linear,
                           norm: nn.LayerNorm, p: float, drops=None) -> list[str]:
    params = [t for t in (linear1.weight, linear1.bias, linear2.weight, linear2.bias,
                          norm.weight, norm.bias) if t is not None]
    reasons = _cpu_float32(x, *params) + _rows(x)
    f = linear1.out_features
    if f % 16:
        reasons.append(_Size(f"feed-forward width {f}, not a multiple of 16"))
    reasons += _linear(linear1, "linear1", outputs=None)
    if linear2.bias is None:
        reasons.append("linear2 without a bias")
    return reasons + _norm(norm) + _dropout_probability(p)


def _mac_query_refusals(x: Tensor, linear: nn.Linear, then_silu: bool) -> list[str]:
    weights = [t for t in (linear.weight, linear.bias) if t is not None]
    return (_cpu_float32(x, *weights) + _rows(x) + _linear(linear, "a query")
            + _no_grad_needed(x, *weights))


def _keys_values_refusals(x: Tensor, key_proj: Tensor, value_proj: Tensor) -> list[str]:
    reasons = _cpu_float32(x, key_proj, value_proj) + _rows(x)
    for name, proj in (("key", key_proj), ("value", value_proj)):
        if tuple(proj.shape) != (ROW_WIDTH, ROW_WIDTH):
            reasons.append(_Size(f"a {name} projection {tuple(proj.shape)}, the kernel takes "
                                 f"({ROW_WIDTH}, {ROW_WIDTH})"))
    return reasons + _no_grad_needed(x, key_proj, value_proj)


def _memory_refusals(q: Tensor, flat: Tensor, *others: Tensor) -> list[str]:
    reasons = _cpu_float32(q, flat, *others)
    if q.dim() != 3 or flat.dim() != 2 or flat.shape[0] != q.shape[0]:
        return reasons + [f"queries {tuple(q.shape)} and weights {tuple(flat.shape)} not "
                          "(S, R, d), (S, n)"]
    d = q.shape[-1]
    h = reference.hidden_width(flat, d)
    if flat.shape[1] != 2 * h * d + h + d:
        reasons.append(f"{flat.shape[1]} weights per slot are no two-layer memory of width {d}")
    if d not in MEMORY_WIDTHS:
        reasons.append(_Size(f"width {d} not among the kernel's {MEMORY_WIDTHS}"))
    if h not in MEMORY_HIDDEN:
        reasons.append(_Size(f"hidden width {h} not among the kernel's {MEMORY_HIDDEN}"))
    return reasons


def _recall_error_refusals(keys: Tensor, values: Tensor, flat: Tensor,
                           twice_differentiable: bool = False) -> list[str]:
    reasons = _memory_refusals(keys, flat, values)
    if values.shape != keys.shape:
        reasons.append(f"values {tuple(values.shape)} of another shape than the keys "
                       f"{tuple(keys.shape)}")
    elif keys.dim() == 3 and keys.shape[1] == 0:
        reasons.append("no rows")
    if twice_differentiable:
        reasons.append("a second derivative is needed (the kernel's backward pass is not "
                       "differentiable)")
    return reasons


def _commit_refusals(surprise: Tensor, grads: Tensor, new: Tensor, old: Tensor,
                     updates: Tensor, skipped: Tensor) -> list[str]:
    reasons = _cpu_float32(surprise, grads, new, old, autocast=False)
    if (old.dim() != 2 or surprise.shape != old.shape[:1]
            or not new.shape == grads.shape == old.shape):
        reasons.append(f"surprise {tuple(surprise.shape)}, gradients {tuple(grads.shape)} and "
                       f"weights {tuple(new.shape)}, {tuple(old.shape)} not (S,) and (S, n)")
    if any(c.dtype != torch.int64 or c.device.type != "cpu" or c.dim() for c in (updates, skipped)):
        reasons.append("counters other than int64 CPU scalars")
    return reasons + _no_grad_needed(surprise, grads, new, old)


def _momentum_step_refusals(surprise: Tensor, grads: Tensor, old: Tensor, momentum: Tensor,
                            alpha: float, eta: float, theta: float, updates: Tensor,
                            skipped: Tensor) -> list[str]:
    reasons = [f"{name} a {type(value).__name__}, the kernel takes a number"
               for name, value in (("alpha", alpha), ("eta", eta), ("theta", theta))
               if isinstance(value, bool) or not isinstance(value, (int, float))]
    if momentum.shape != old.shape:
        reasons.append(f"a momentum {tuple(momentum.shape)} of another shape than the weights "
                       f"{tuple(old.shape)}")
    return reasons + _commit_refusals(surprise, grads, momentum, old, updates, skipped)


_REFUSALS: dict[str, Callable[..., list[str]]] = {
    "attention": _attention_refusals,
    "add_norm": _add_norm_refusals,
    "feed_forward_add_norm": _feed_forward_refusals,
    "mac_query": _mac_query_refusals,
    "keys_values": _keys_values_refusals,
    "memory_mlp": _memory_refusals,
    "recall_error": _recall_error_refusals,
    "commit_update": _commit_refusals,
    "momentum_step": _momentum_step_refusals,
}
