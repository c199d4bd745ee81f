"""Energy-normalised (NLMS-style) delta rule anchored at a learned start (``delta_energy``).

NLMS divides the delta rule's step by the energy of its input, ||k||^2, so a step cannot
overshoot whatever the scale of the input. The keys here are l2-normalised, so for the
two-layer memory each layer's gradient is divided by the energy of *that layer's* input
instead, the keys for the first and the hidden features for the second:

    M(k) = W2 h + b2,   h = silu(W1 k + b1)             (the current fast weights)
    E1   = mean_rows ||k||^2                            (= 1 for l2-normalised keys)
    E2   = mean_rows ||h||^2
    g_(W1, b1) <- g_(W1, b1) / (1 + E1)      g_(W2, b2) <- g_(W2, b2) / (1 + E2)

The one-layer memory M(k) = W k + b divides both by 1 + E1. The rest is meta_nlms without its
clipping, which the normalisation replaces:

    keys   = l2normalize(silu(K z))        values = silu(V z)          K, V learned
    loss   = sum_features mean_rows (M(keys) - values)^2               (as titans_default)
    S     <- eta * S - theta * g                                        g normalised as above
    w     <- w0 + alpha * (w - w0) + S                                  decay toward the start

with theta = softplus(.), eta = sigmoid(.), alpha = sigmoid(.) learned scalars, w0 the learned
start (``memory.initial_weights``), and the graph kept through every update while training
(``DIFFERENTIABLE = True``; the energies are part of it). theta is now dimensionless: one step
on a single row removes the fraction 2 theta E2 / (1 + E2) of its error through the last
layer, so theta near 0.5 is a full correction and theta < 1 does not overshoot.

``compute_surprise`` records the energies as per-slot state (``input_energy``, (S, layers)),
which ``apply_update`` reads. Under data-parallel training of the shared memory,
``reduce_across_ranks`` replaces them by those of the global batch in the same ``all_reduce``
as the surprise and gradients (they are means over rows, like the other two).

Options (``strategy_options``): ``theta`` (0.1), ``eta`` (0.5), ``alpha`` (0.999) initial
values, meta_nlms's.
"""
import torch
import torch.nn.functional as F

from ..distributed import all_reduce_mean
from . import meta_nlms, titans_default
from .meta_nlms import anchored_step, learned_rates
from .titans_default import compute_keys_values  # the default rule's keys and values

DIFFERENTIABLE = True
DEFAULTS = {k: meta_nlms.DEFAULTS[k] for k in ("theta", "eta", "alpha")}
LAYER_OF = {"w": 0, "b": 0, "w1": 0, "b1": 0, "w2": 1, "b2": 1}  # whose input a weight scales


def init_memory_state(memory, emb_dim):
    meta_nlms.init_memory_state(memory, emb_dim)  # K, V, theta, eta, alpha, momentum, w0
    memory.register_state("input_energy", torch.zeros(memory.n_slots, memory.num_layers),
                          per_slot=True)


def compute_surprise(memory, keys, values):
    memory.state["input_energy"] = input_energies(memory, keys)
    return titans_default.compute_surprise(memory, keys, values)


def input_energies(memory, keys):
    """mean_rows ||input||^2 of each layer of the memory with its current weights (S, layers)."""
    energies = [keys.square().sum(-1).mean(1)]  # (S,)
    if memory.num_layers == 2:
        w = memory.weights
        h = F.silu(torch.baddbmm(w["b1"].unsqueeze(1), keys, w["w1"].transpose(1, 2)))  # (S, R, h)
        energies.append(h.square().sum(-1).mean(1))
    return torch.stack(energies, dim=1)


def apply_update(memory, grads, surprise):
    scale = 1.0 / (1.0 + memory.state["input_energy"])  # (S, layers)
    g = memory.flatten({name: grads[name] * scale[:, LAYER_OF[name]].view(-1, *[1] * (
        grads[name].dim() - 1)) for name in memory.weight_names})  # (S, n)
    return memory.unflatten(anchored_step(memory, memory.fast_weights, g, *learned_rates(memory)))


def reduce_across_ranks(memory, surprise, grads, rows):
    """Data-parallel shared memory: the surprise, gradients and energies of the global batch,
    in one ``all_reduce``."""
    n = grads.shape[1]
    packed = torch.cat([grads, memory.state["input_energy"]], dim=1)  # (S, n + layers)
    surprise, packed = all_reduce_mean(surprise, packed, rows)
    memory.state["input_energy"] = packed[:, n:]
    return surprise, packed[:, :n]
