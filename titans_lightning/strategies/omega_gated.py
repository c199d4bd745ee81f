"""titans_gated's data-dependent gates on omega_window's surprise over a window of chunks
(``omega_gated``).

The two ideas the screen ranked nearest a gain in the shared scope, together. Per slot, over the
rows r of the current chunk and the ``window - 1`` chunks before it (omega_window), with the
gates read from the current chunk's mean row m (titans_gated):

    keys    = l2normalize(silu(K z))       values = silu(V z)          K, V learned
    loss    = sum_r weight_r sum_features (M(k_r) - v_r)^2 / sum_r weight_r
    g       = d loss / d w,   g <- g * min(1, c / |g|)                 per slot
    theta_t = theta_max * sigmoid(a_theta . m + b_theta)
    eta_t   = sigmoid(a_eta . m + b_eta)
    alpha_t = sigmoid(a_alpha . m + b_alpha)
    S      <- eta_t * S - theta_t * g
    w      <- w0 + alpha_t * (w - w0) + S                              toward the learned start

Everything is learned by the outer optimiser through the differentiable update
(``DIFFERENTIABLE = True``); ``window = 1`` is titans_gated. The past chunks are stored as in
omega_window, the gates as in titans_gated (and reduced with the gradients under
data-parallel training of the shared memory, as there).

Options (``strategy_options``): titans_gated's ``theta`` (0.1), ``eta`` (0.5), ``alpha``
(0.999), ``theta_max`` (1.0), ``clip`` (1.0), and omega_window's ``window`` (2) and ``max_rows``
(1024; 256 holds a per-sequence chunk of the context window 16 whole).
"""
from . import omega_window, titans_gated
from .omega_window import compute_surprise  # the loss over the window; it slides the window
from .titans_gated import apply_update, compute_keys_values, reduce_across_ranks  # the gates

DIFFERENTIABLE = True
DEFAULTS = {**titans_gated.DEFAULTS, "window": 2, "max_rows": 1024}


def init_memory_state(memory, emb_dim):
    titans_gated.register_gates(memory, emb_dim, rule="omega_gated")  # K, V, gates, mean, S, w0
    omega_window.register_window(memory, emb_dim, rule="omega_gated", defaults=DEFAULTS)
