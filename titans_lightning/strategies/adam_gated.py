"""Surprise-gated Adam: the memory takes an Adam step only on chunks that surprise it.

Keys, values and the surprise are the default rule's (see ``titans_default``):

    keys = l2normalize(silu(K z))      values = silu(V z)
    s    = sum_features mean_rows (M(keys) - values)^2            (one per slot)

The gate compares s with exponential running statistics of the earlier surprises of the slot
(mean mu, variance var, decay ``gamma``), computed *before* s joins them:

    open = (n < warmup)  or  (s > mu + k * sqrt(var))             n = surprises seen so far
    mu  <- mu + (1 - gamma) * (s - mu)                            (always, open or not;
    var <- gamma * (var + (1 - gamma) * (s - mu_old)^2)            the first s sets mu = s, var = 0)

When the gate is open, a bias-corrected Adam step with retention (t counts the open steps):

    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g          v <- beta2 * v + (1 - beta2) * g^2
    w <- alpha * w - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

When it is closed nothing but the running statistics changes: no step, no retention (a closed
gate means "this chunk taught nothing new", so it should not cost the memory anything either),
moments and t untouched. The first ``warmup`` updates are always open, while mu and var are
still estimates from a handful of chunks. The gate is reported per slot with
``memory.report_gate``; everything is computed with ``torch.where`` (no host synchronisation).

Options (``strategy_options``): ``lr`` (1e-3), ``beta1`` (0.9), ``beta2`` (0.999), ``eps``
(1e-8), ``alpha`` retention (0.999, as the default rule), ``k`` threshold in running standard
deviations (0.5), ``gamma`` decay of the running statistics (0.9, about the last ten chunks),
``warmup`` updates always open (5).
"""
import torch

from .titans_default import (  # the default rule's pieces, shared as they are
    compute_keys_values, compute_surprise, register_projections)

DEFAULTS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "alpha": 0.999,
            "k": 0.5, "gamma": 0.9, "warmup": 5}


def init_memory_state(memory, emb_dim):
    register_projections(memory, emb_dim)
    # Adam's moments, one entry per fast weight, flat like memory.fast_weights (S, n_weights)
    memory.register_state("exp_avg", torch.zeros_like(memory.fast_weights), per_slot=True)
    memory.register_state("exp_avg_sq", torch.zeros_like(memory.fast_weights), per_slot=True)
    for name in ("step", "seen", "surprise_mean", "surprise_var"):  # t, n, mu, var: (S,)
        memory.register_state(name, torch.zeros(memory.n_slots), per_slot=True)


def apply_update(memory, grads, surprise):
    opt = {k: memory.options.get(k, v) for k, v in DEFAULTS.items()}
    gate = _gate_and_track(memory, surprise, opt)  # (S,) bool
    memory.report_gate(gate.float())
    step = memory.state["step"] + gate.float()  # (S,)
    memory.state["step"] = step
    open_, t = gate[:, None], step.clamp(min=1.0)[:, None]  # t >= 1 keeps unused slots finite
    g, m, v = memory.flatten(grads), memory.state["exp_avg"], memory.state["exp_avg_sq"]
    m = torch.where(open_, opt["beta1"] * m + (1 - opt["beta1"]) * g, m)  # (S, n)
    v = torch.where(open_, opt["beta2"] * v + (1 - opt["beta2"]) * g * g, v)  # (S, n)
    memory.state["exp_avg"], memory.state["exp_avg_sq"] = m, v
    m_hat, v_hat = m / (1 - opt["beta1"] ** t), v / (1 - opt["beta2"] ** t)
    w = memory.fast_weights  # (S, n)
    stepped = opt["alpha"] * w - opt["lr"] * m_hat / (v_hat.sqrt() + opt["eps"])
    return memory.unflatten(torch.where(open_, stepped, w))


def _gate_and_track(memory, surprise, opt):
    """Decide the gate from the statistics of earlier surprises, then fold ``surprise`` in."""
    seen, mean, var = (memory.state[n] for n in ("seen", "surprise_mean", "surprise_var"))
    gate = (seen < opt["warmup"]) | (surprise > mean + opt["k"] * var.sqrt())  # (S,)
    delta = surprise - mean
    first = seen == 0
    memory.state["surprise_mean"] = torch.where(first, surprise, mean + (1 - opt["gamma"]) * delta)
    memory.state["surprise_var"] = torch.where(
        first, torch.zeros_like(var), opt["gamma"] * (var + (1 - opt["gamma"]) * delta * delta))
    memory.state["seen"] = seen + 1
    return gate
