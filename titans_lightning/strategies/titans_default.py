"""The Titans update rule (Behrouz et al., 2024, Eqs. 12-14), exactly as the reference runs it.

For a chunk of layer outputs z (R rows, detached), per slot:

    keys   = l2normalize(silu(K z))              values = silu(V z)
    loss   = sum_features mean_rows (M(keys) - values)^2                 (Eq. 12)
    S_w   <- eta * S_w - theta * d loss / d w        (momentum "surprise", Eq. 13)
    w     <- alpha * w + S_w                         (retention / forgetting, Eq. 14)

K and V are fixed Linear(d, d, bias=False) maps, Xavier-uniform initialised. Options
(``strategy_options``): ``alpha`` retention (0.999), ``eta`` momentum (0.9), ``theta``
step size (0.01) — the benchmark model's values.
"""
import torch
from torch import nn

from .. import kernels

DEFAULTS = {"alpha": 0.999, "eta": 0.9, "theta": 0.01}


def register_projections(memory, emb_dim, learnable=False):
    """The key and value maps K, V: Linear(d, d, bias=False), Xavier-uniform initialised."""
    for name in ("key_proj", "value_proj"):
        memory.register_state(name, nn.init.xavier_uniform_(torch.empty(emb_dim, emb_dim)),
                              learnable=learnable)


def init_memory_state(memory, emb_dim):
    register_projections(memory, emb_dim)
    # one momentum entry per fast weight, kept flat like memory.fast_weights (S, n_weights)
    memory.register_state("momentum", torch.zeros_like(memory.fast_weights), per_slot=True)


def compute_keys_values(memory, x):
    # normalize(silu(x K^T)), silu(x V^T), each (S, R, d)
    return kernels.keys_values(x, memory.state["key_proj"], memory.state["value_proj"])


def compute_surprise(memory, keys, values):
    return memory.recall_error(keys, values)  # sum_features mean_rows (M(k) - v)^2, (S,)


def apply_update(memory, grads, surprise):
    alpha, eta, theta = (memory.options.get(k, v) for k, v in DEFAULTS.items())
    momentum = eta * memory.state["momentum"] - theta * memory.flatten(grads)  # Eq. 13
    memory.state["momentum"] = momentum
    return memory.unflatten(alpha * memory.fast_weights + momentum)  # Eq. 14

