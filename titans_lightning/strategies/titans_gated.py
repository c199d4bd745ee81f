"""Data-dependent step, momentum and forgetting gates, as in the Titans paper (``titans_gated``).

The paper (Behrouz et al., 2024, Eqs. 13-14) makes theta_t, eta_t and alpha_t functions of the
current input; the reference runs them as constants. Here each slot reads them from the mean
row of its chunk of layer outputs z (S, R, d), through learned projections and a sigmoid:

    m       = mean_rows(z)                                    (S, d)
    theta_t = theta_max * sigmoid(a_theta . m + b_theta)      step size, in (0, theta_max)
    eta_t   = sigmoid(a_eta . m + b_eta)                      momentum decay, in (0, 1)
    alpha_t = sigmoid(a_alpha . m + b_alpha)                  retention, in (0, 1)

and the update is meta_nlms's with these per-slot values:

    keys   = l2normalize(silu(K z))        values = silu(V z)          K, V learned
    loss   = sum_features mean_rows (M(keys) - values)^2               (as titans_default)
    g      = d loss / d w,   g <- g * min(1, c / |g|)                  per slot
    S     <- eta_t * S - theta_t * g                                    (Eq. 13)
    w     <- w0 + alpha_t * (w - w0) + S                                (Eq. 14, toward the start)

alpha_t is a retention (the paper's 1 - alpha_t), and the decay goes toward the learned start
w0 (``memory.initial_weights``) rather than toward zero. The a_* (``gate_proj``, rows theta,
eta, alpha: (3, d)) start at zero and the b_* (``gate_bias``, (3,)) at logit(theta /
theta_max), logit(eta), logit(alpha), so every chunk first gets the options' values; the outer
optimiser learns them through the differentiable update (``DIFFERENTIABLE = True``). z is
detached: the gates learn through their own parameters, not by changing what they read.

``compute_keys_values`` records m as per-slot state (``chunk_mean``), which ``apply_update``
reads. Under data-parallel training of the shared memory, ``reduce_across_ranks`` replaces it
by the mean row of the global batch in the same ``all_reduce`` as the surprise and gradients,
so every rank applies the same gates.

Options (``strategy_options``): ``theta`` (0.1), ``eta`` (0.5), ``alpha`` (0.999) initial
gate values, ``theta_max`` (1.0) the largest step the gate can open to, ``clip`` c (1.0).
"""
import torch

from ..distributed import all_reduce_mean
from . import titans_default
from .meta_nlms import anchored_step, clip_norm, logit
from .titans_default import compute_surprise, register_projections  # the default rule's pieces

DIFFERENTIABLE = True
DEFAULTS = {"theta": 0.1, "eta": 0.5, "alpha": 0.999, "theta_max": 1.0, "clip": 1.0}


def init_memory_state(memory, emb_dim):
    register_gates(memory, emb_dim)


def register_gates(memory, emb_dim, rule="titans_gated"):
    """K, V, the gates' projections and biases (from the options' initial values), the chunk
    mean, momentum and the learned start; ``rule`` names the strategy in a refusal."""
    opt = {k: memory.options.get(k, v) for k, v in DEFAULTS.items()}
    if not 0 < opt["theta"] < opt["theta_max"]:
        raise ValueError(f"{rule} needs 0 < theta < theta_max, got theta={opt['theta']}, "
                         f"theta_max={opt['theta_max']}")
    register_projections(memory, emb_dim, learnable=True)
    memory.register_state("gate_proj", torch.zeros(3, emb_dim), learnable=True)  # a_*
    bias = [logit(opt["theta"] / opt["theta_max"]), logit(opt["eta"]), logit(opt["alpha"])]
    memory.register_state("gate_bias", torch.tensor(bias), learnable=True)  # b_*
    memory.register_state("chunk_mean", torch.zeros(memory.n_slots, emb_dim), per_slot=True)
    memory.register_state("momentum", torch.zeros_like(memory.fast_weights), per_slot=True)
    memory.learn_initial_weights()


def compute_keys_values(memory, x):
    memory.state["chunk_mean"] = x.mean(1)  # (S, d): what the gates read
    return titans_default.compute_keys_values(memory, x)


def apply_update(memory, grads, surprise):
    theta_max, clip = (memory.options.get(k, DEFAULTS[k]) for k in ("theta_max", "clip"))
    g = clip_norm(memory.flatten(grads), clip)  # (S, n)
    return memory.unflatten(anchored_step(memory, memory.fast_weights, g,
                                          *gates(memory, theta_max)))


def gates(memory, theta_max):
    """theta_t, eta_t, alpha_t of each slot, (S, 1) each, from its chunk's mean row."""
    logits = torch.addmm(memory.state["gate_bias"], memory.state["chunk_mean"],
                         memory.state["gate_proj"].T)  # (S, 3)
    theta, eta, alpha = torch.sigmoid(logits).split(1, dim=1)
    return theta_max * theta, eta, alpha


def reduce_across_ranks(memory, surprise, grads, rows):
    """Data-parallel shared memory: the surprise, gradients and chunk mean of the global batch,
    in one ``all_reduce`` (the mean row is a mean over rows, like the other two)."""
    n = grads.shape[1]
    packed = torch.cat([grads, memory.state["chunk_mean"]], dim=1)  # (S, n + d)
    surprise, packed = all_reduce_mean(surprise, packed, rows)
    memory.state["chunk_mean"] = packed[:, n:]
    return surprise, packed[:, :n]
