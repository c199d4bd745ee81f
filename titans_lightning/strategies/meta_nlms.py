"""Meta-learned, norm-clipped delta rule anchored at a learned start (``meta_nlms``).

The default Titans rule has fixed step sizes and decays the memory toward zero. Here the outer
optimiser learns how the memory learns, through a differentiable inner update (the harness keeps
the graph of every update while training, ``DIFFERENTIABLE = True``):

    keys   = l2normalize(silu(K z))        values = silu(V z)          K, V learned
    loss   = sum_features mean_rows (M(keys) - values)^2               (as titans_default)
    g      = d loss / d w,   g <- g * min(1, c / |g|)                  per slot: no overshoot
    S     <- eta * S - theta * g                                        momentum
    w     <- w0 + alpha * (w - w0) + S                                  decay toward the start

with theta = softplus(.), eta = sigmoid(.), alpha = sigmoid(.) learned scalars, and w0 the
learned starting weights (``memory.initial_weights``). With ``memory_scope: per_sequence`` every
sequence starts at w0 and adapts to its own dynamics; with the shared scope w0 is only the
anchor of the decay.

Options (``strategy_options``): ``theta`` (0.1), ``eta`` (0.5), ``alpha`` (0.999) initial values,
``clip`` c (1.0).
"""
import math

import torch
import torch.nn.functional as F

from .titans_default import (  # the default rule's pieces, shared as they are
    compute_keys_values, compute_surprise, register_projections)

DIFFERENTIABLE = True
DEFAULTS = {"theta": 0.1, "eta": 0.5, "alpha": 0.999, "clip": 1.0}


def logit(p):
    return math.log(p / (1.0 - p))


def init_memory_state(memory, emb_dim):
    opt = {k: memory.options.get(k, v) for k, v in DEFAULTS.items()}
    register_projections(memory, emb_dim, learnable=True)
    memory.register_state("theta_raw", torch.tensor(math.log(math.expm1(opt["theta"]))),
                          learnable=True)
    memory.register_state("eta_raw", torch.tensor(logit(opt["eta"])), learnable=True)
    memory.register_state("alpha_raw", torch.tensor(logit(opt["alpha"])), learnable=True)
    memory.register_state("momentum", torch.zeros_like(memory.fast_weights), per_slot=True)
    memory.learn_initial_weights()


def apply_update(memory, grads, surprise):
    clip = memory.options.get("clip", DEFAULTS["clip"])
    g = clip_norm(memory.flatten(grads), clip)  # (S, n)
    return memory.unflatten(anchored_step(memory, memory.fast_weights, g, *learned_rates(memory)))


def clip_norm(g, clip):
    """Per slot, ``g * min(1, clip / |g|)`` for flat gradients (S, n)."""
    return g * (clip / (g.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0)


def learned_rates(memory):
    """theta = softplus, eta and alpha = sigmoid of their learned raw values (scalars)."""
    return (F.softplus(memory.state["theta_raw"]), torch.sigmoid(memory.state["eta_raw"]),
            torch.sigmoid(memory.state["alpha_raw"]))


def anchored_step(memory, w, g, theta, eta, alpha):
    """One momentum step decaying toward the start: assigns ``S <- eta S - theta g`` and returns
    ``w0 + alpha (w - w0) + S`` for flat weights w and gradients g (S, n); the rates are scalars
    or one per slot (S, 1)."""
    momentum = eta * memory.state["momentum"] - theta * g
    memory.state["momentum"] = momentum
    start = memory.initial_weights  # (1, n)
    return start + alpha * (w - start) + momentum
