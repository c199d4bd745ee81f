"""The Titans rule with retention toward a learned start (``anchored_default``).

As ``titans_default`` (fixed K and V, fixed alpha, eta, theta, no graph through the updates),
except that the forgetting term decays the memory toward its starting weights w0 instead of
toward zero:

    keys   = l2normalize(silu(K z))              values = silu(V z)
    loss   = sum_features mean_rows (M(keys) - values)^2                 (Eq. 12)
    S_w   <- eta * S_w - theta * d loss / d w        (momentum "surprise", Eq. 13)
    w     <- w0 + alpha * (w - w0) + S_w             (retention toward w0, Eq. 14 anchored)

w0 is ``memory.initial_weights``, learned by the outer optimiser. The rule is not
differentiable (the harness takes d loss / d w without a graph), yet w0 still gets outer
gradients, first-order ones: the momentum counts as a constant, and the weights after t
updates of a forward, w_t = w0 + alpha^t (w_s - w0) + sum_i alpha^(t-i) S_i, are affine in w0
and in the weights w_s the forward started from. With ``memory_scope: per_sequence`` every
slot starts at w_s = w0, so d w_t / d w0 = 1: w0 receives the sum of the outer gradients of
all the weights retrieved with, as in first-order MAML. With the shared scope w_s is the
carried-over memory (detached between forwards) and d w_t / d w0 = 1 - alpha^t, about
0.001 per update at alpha = 0.999: there w0 learns slowly.

Options (``strategy_options``): ``alpha`` retention (0.999), ``eta`` momentum (0.9),
``theta`` step size (0.01) — titans_default's.
"""
from . import titans_default
from .meta_nlms import anchored_step
from .titans_default import (  # the default rule's pieces, shared as they are
    compute_keys_values, compute_surprise)

DEFAULTS = dict(titans_default.DEFAULTS)


def init_memory_state(memory, emb_dim):
    titans_default.init_memory_state(memory, emb_dim)  # fixed K, V; momentum
    memory.learn_initial_weights()


def apply_update(memory, grads, surprise):
    alpha, eta, theta = (memory.options.get(k, v) for k, v in DEFAULTS.items())
    return memory.unflatten(anchored_step(memory, memory.fast_weights, memory.flatten(grads),
                                          theta, eta, alpha))
