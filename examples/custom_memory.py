"""A memory strategy to copy and edit: the default Titans rule, spelled out.

Copy this file, edit it, and select it by path wherever a strategy string goes (no installation
needed; the config stores only the string)::

    MACTitan(strategy="examples/my_memory.py", strategy_options={"theta": 0.05})

A strategy is these four functions; the harness (``titans_lightning.memory.NeuralMemory``) calls
them, in this order, once per memory update. When the memory is built, the loader checks that
all four exist with these parameters and runs them once on tiny tensors (a throwaway memory
with dim=4, hidden=8, a (1, 3, 4) chunk), so a mistake fails at once with the function's name.

The rule below (Behrouz et al., 2024, Eqs. 12-14)::

    keys = l2normalize(silu(K z))     values = silu(V z)          K, V fixed
    loss = sum_features mean_rows (M(keys) - values)^2
    S_w <- eta * S_w - theta * d loss / d w                       (momentum, per weight)
    w   <- alpha * w + S_w                                        (retention, then the step)

Shapes: S memory slots (1 when one memory serves the whole batch, B with one per sequence),
R rows (tokens) of the chunk, d the embedding width, h the memory's hidden width.
"""
import torch
import torch.nn.functional as F
from torch import nn

# Hyperparameters: the config's ``strategy_options`` arrive as ``memory.options``; read each
# with a default here so that the strategy also runs with no options at all.
DEFAULTS = {"alpha": 0.999, "eta": 0.9, "theta": 0.01}


def init_memory_state(memory, emb_dim):
    """Create everything the rule keeps between updates. Called once, when the memory is built.

    Receives the memory and its width d (``emb_dim``). Returns nothing: register each tensor
    with ``memory.register_state(name, tensor, per_slot=False, learnable=False)``.

    * Shared tensors (here the key/value projections, (d, d)) are plain state.
    * Tensors with a leading slot dimension, like the weights, take ``per_slot=True``:
      ``memory.zeros_like_weights()`` gives ``{name: zeros (S, ...)}`` for each fast weight
      (``w1`` (S, h, d), ``b1`` (S, h), ``w2`` (S, d, h), ``b2`` (S, d); one-layer memories have
      ``w`` (S, d, d), ``b`` (S, d)). Per-slot state is rolled back slot by slot when an update
      goes non-finite.
    * ``learnable=True`` hands the tensor to the outer optimiser (e.g. a learned step size);
      the rule then reads it but never assigns it.

    The harness saves all state in ``state_dict``, restores it on ``memory.reset()`` and moves it
    with ``.to()``; use the global torch RNG for random initialisation so seeds reproduce.
    """
    for name in ("key_proj", "value_proj"):
        memory.register_state(name, nn.init.xavier_uniform_(torch.empty(emb_dim, emb_dim)))
    for name, w in memory.zeros_like_weights().items():
        memory.register_state(f"momentum_{name}", w, per_slot=True)


def compute_keys_values(memory, x):
    """Turn a chunk of layer outputs into the associations to store.

    Receives ``x`` (S, R, d): the layer's outputs for the chunk, already detached (the outer
    loss never flows through the update), split by slot. Returns ``(keys, values)``, two tensors
    (S, R, d') with the same S and R; keys are what ``compute_surprise`` will feed to
    ``memory.retrieve``, so their width must be d if it does. The harness takes no gradient
    through keys and values (only the fast weights' gradient of the surprise), so learnable
    projections here would not be trained; fixed ones, as below, are the usual choice.
    """
    keys = F.normalize(F.silu(x @ memory.state["key_proj"].T), dim=-1)  # (S, R, d)
    values = F.silu(x @ memory.state["value_proj"].T)  # (S, R, d)
    return keys, values


def compute_surprise(memory, keys, values):
    """The loss that drives the update: how badly the memory recalls the chunk.

    Receives the pair from ``compute_keys_values``. Returns a (S,) tensor, one loss per slot,
    computed through the fast weights with ``memory.retrieve(q)`` ((S, R, d) -> (S, R, d), the
    MLP with the current weights) so that it has a gradient. The harness then differentiates
    ``surprise.sum()`` with respect to every fast weight (slots do not mix, so each slot gets
    the gradient of its own loss), with no graph kept, and logs the surprise.
    """
    return (memory.retrieve(keys) - values).pow(2).mean(1).sum(-1)  # (S,)


def apply_update(memory, grads, surprise):
    """The learning rule: new fast weights from their gradients.

    Receives ``grads`` ``{name: (S, ...)}`` (same names and shapes as ``memory.weights``, the
    current weights) and the detached ``surprise`` (S,). Returns a dict with exactly those
    names and shapes: the new weights. The harness keeps them, and the state you assigned,
    only for slots where surprise, gradients and new weights are all finite; other slots keep
    their previous weights and state and count as skipped (``memory.skipped_updates``).

    Read state with ``memory.state[name]``; write it by assignment,
    ``memory.state[name] = new_tensor``, never in place (the harness needs the old tensor for
    the roll-back). Everything stays on the device: branch with ``torch.where``, not ``if``
    on tensor values, and never call ``.item()``. A gated rule reports the fraction it applied
    per slot with ``memory.report_gate(rate)``, which the logs show as the gate rate.
    """
    opt = {k: memory.options.get(k, v) for k, v in DEFAULTS.items()}
    new = {}
    for name, w in memory.weights.items():
        momentum = opt["eta"] * memory.state[f"momentum_{name}"] - opt["theta"] * grads[name]
        memory.state[f"momentum_{name}"] = momentum
        new[name] = opt["alpha"] * w + momentum
    return new
