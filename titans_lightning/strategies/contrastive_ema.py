"""Contrastive surprise with an EMA-blended step: the memory learns to *tell rows apart*.

Keys and values are the default rule's (``keys = l2normalize(silu(K z))``, ``values =
silu(V z)``, K and V fixed, Xavier-uniform). The surprise is InfoNCE (van den Oord et al.,
2018) between the memory's answer to each key and the chunk's values, every other row of the
chunk serving as a negative; per slot, over rows i, j = 1..R':

    logits_ij = <l2normalize(M(k_i)), l2normalize(v_j)> / tau
    loss      = mean_i CE(logits_i, i) = mean_i (logsumexp_j logits_ij - logits_ii)

Unlike the default squared error, this loss ignores the scale of M's output and rewards only
that M(k_i) points at its own v_i more than at the others'. The update takes a (momentum) step
and blends it into the current weights with an exponential moving average:

    S_w <- eta * S_w - theta * g                  (S starts at zero; eta = 0: plain step)
    w'  =  alpha * w + S_w                        (the stepped weights)
    w   <- beta * w + (1 - beta) * w'             (EMA blend)

so with the defaults (alpha = 1, eta = 0) each update moves w by exactly
``-(1 - beta) * theta * g``: beta damps the step without changing its direction, and theta
keeps its usual meaning as the raw step size.

Long chunks: the R x R logits grow quadratically, so when a slot holds more than ``max_rows``
rows the loss uses ``max_rows`` of them, evenly strided and deterministic: rows
``floor(i * R / max_rows)`` for i = 0..max_rows-1 (the model's 1024-row chunks give every
4th row). Keys and values are still computed for all rows.

Options (``strategy_options``): ``tau`` temperature (0.1), ``theta`` step size (0.1), ``beta``
EMA factor (0.9), ``eta`` momentum (0.0), ``alpha`` retention (1.0: the loss is blind to the
output scale, so nothing would restore the scale that retention removes), ``max_rows`` (256).
"""
import torch
import torch.nn.functional as F

from .titans_default import (  # the default rule's pieces, shared as they are
    compute_keys_values, register_projections)

DEFAULTS = {"tau": 0.1, "theta": 0.1, "beta": 0.9, "eta": 0.0, "alpha": 1.0, "max_rows": 256}


def init_memory_state(memory, emb_dim):
    register_projections(memory, emb_dim)
    # one momentum entry per fast weight, flat like memory.fast_weights (S, n_weights)
    memory.register_state("momentum", torch.zeros_like(memory.fast_weights), per_slot=True)


def compute_surprise(memory, keys, values):
    max_rows = int(memory.options.get("max_rows", DEFAULTS["max_rows"]))
    tau = memory.options.get("tau", DEFAULTS["tau"])
    rows = strided_rows(keys.shape[1], max_rows, keys.device)
    keys, values = keys[:, rows], values[:, rows]  # (S, R', d)
    out = F.normalize(memory.retrieve(keys), dim=-1)  # (S, R', d)
    logits = out @ F.normalize(values, dim=-1).transpose(1, 2) / tau  # (S, R', R')
    return -torch.diagonal(logits.log_softmax(-1), dim1=1, dim2=2).mean(-1)  # (S,)


def apply_update(memory, grads, surprise):
    opt = {k: memory.options.get(k, v) for k, v in DEFAULTS.items()}
    momentum = opt["eta"] * memory.state["momentum"] - opt["theta"] * memory.flatten(grads)
    memory.state["momentum"] = momentum
    w = memory.fast_weights  # (S, n)
    stepped = opt["alpha"] * w + momentum
    return memory.unflatten(opt["beta"] * w + (1 - opt["beta"]) * stepped)


def strided_rows(n_rows, max_rows, device=None):
    """Indices of at most ``max_rows`` evenly spaced rows out of ``n_rows`` (all if fewer)."""
    if n_rows <= max_rows:
        return torch.arange(n_rows, device=device)
    return torch.arange(max_rows, device=device) * n_rows // max_rows
