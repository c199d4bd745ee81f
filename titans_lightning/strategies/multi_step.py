"""Several inner gradient steps per memory update (``multi_step``): meta_nlms, ``steps`` times.

TTT-style mini-batch learning takes more than one gradient step on each chunk. Per update,
on the same keys and values, starting from the current weights w_0 = w:

    keys   = l2normalize(silu(K z))        values = silu(V z)          K, V learned
    loss   = sum_features mean_rows (M(keys) - values)^2               (as titans_default)
    for i = 1 .. steps:
        g_i = d loss / d w at w_(i-1),   g_i <- g_i * min(1, c / |g_i|)   per slot
        S  <- eta * S - theta * g_i                                     momentum
        w_i = w0 + alpha * (w_(i-1) - w0) + S                           decay toward the start
    w <- w_steps

with theta = softplus(.), eta = sigmoid(.), alpha = sigmoid(.) learned scalars and w0 the
learned start (``memory.initial_weights``), as in meta_nlms: ``steps = 1`` is meta_nlms. The
momentum and the decay act at every step, so one update decays by alpha^steps.

The harness hands ``apply_update`` g_1; the further gradients come from the rule's own surprise
at w_(i-1) (``memory.at(w)``, the memory seen with those weights), taken with ``create_graph``
while training, so the outer optimiser differentiates through every inner step
(``DIFFERENTIABLE = True``), as through the first. ``compute_surprise`` leaves the chunk's keys and values on the memory for
``apply_update`` (a plain attribute, not state: it lives for one update). Under data-parallel
training the further gradients are combined across ranks by the memory's reduce hook, as the
harness combines the first.

Options (``strategy_options``): ``steps`` (2), and meta_nlms's ``theta`` (0.1), ``eta`` (0.5),
``alpha`` (0.999) initial values and ``clip`` c (1.0).
"""
import torch

from . import meta_nlms, titans_default
from .meta_nlms import anchored_step, clip_norm, learned_rates
from .titans_default import compute_keys_values  # the default rule's keys and values

DIFFERENTIABLE = True
DEFAULTS = {"steps": 2, **meta_nlms.DEFAULTS}
CHUNK = "_multi_step_chunk"  # the attribute holding (keys, values) from surprise to update


def init_memory_state(memory, emb_dim):
    steps = memory.options.get("steps", DEFAULTS["steps"])
    if steps < 1 or steps != int(steps):
        raise ValueError(f"multi_step needs a whole number of steps >= 1, got {steps!r}")
    meta_nlms.init_memory_state(memory, emb_dim)  # K, V, theta, eta, alpha, momentum, w0


def compute_surprise(memory, keys, values):
    setattr(memory, CHUNK, (keys, values))  # on the memory itself, for apply_update
    return titans_default.compute_surprise(memory, keys, values)


def apply_update(memory, grads, surprise):
    steps, clip = (memory.options.get(k, DEFAULTS[k]) for k in ("steps", "clip"))
    keys, values = vars(memory).pop(CHUNK)
    rates = learned_rates(memory)
    w, g = memory.fast_weights, memory.flatten(grads)  # (S, n)
    for step in range(int(steps)):
        if step > 0:
            g = surprise_gradient(memory, w, keys, values)
        w = anchored_step(memory, w, clip_norm(g, clip), *rates)
    return memory.unflatten(w)


def surprise_gradient(memory, w, keys, values):
    """d surprise / d w at flat weights w (S, n), with its graph while training (as the harness
    takes g_1), combined across ranks where the memory has a reduce hook."""
    keep_graph = torch.is_grad_enabled()
    if not keep_graph:
        keys, values = keys.detach(), values.detach()
    with torch.enable_grad():
        leaf = w if keep_graph and w.requires_grad else w.detach().requires_grad_(True)
        surprise = titans_default.compute_surprise(memory.at(leaf), keys, values)  # (S,)
        (g,) = torch.autograd.grad(surprise.sum(), [leaf], create_graph=keep_graph)
    if memory.reduce is not None:
        surprise, g = memory.reduce(surprise, g, keys.shape[1])
    return g
