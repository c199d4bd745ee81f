"""What the strategy tests compare against: the reference keys, values, memory and surprise
gradient written out in plain tensor operations (none of the package's kernels or autograd
nodes), the two memory scopes a rule must work in, and exact outer gradients."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from titans_lightning import NeuralMemory
from titans_lightning.strategy import builtin_strategies, load_strategy


def make_memory(strategy, num_layers=2, **options):
    torch.manual_seed(0)
    return NeuralMemory(dim=4, hidden=8, num_layers=num_layers, strategy=strategy,
                        options=options)


def keys_values(memory, x):
    """keys = l2normalize(silu(K x)), values = silu(V x), (S, R, d), outside any graph."""
    K, V = (memory.state[n].detach() for n in ("key_proj", "value_proj"))
    return F.normalize(F.silu(x @ K.T), dim=-1), F.silu(x @ V.T)


def hidden(w, keys):
    """h = silu(W1 k + b1) of the two-layer memory with weights {name: (S, ...)}: (S, R, h)."""
    return F.silu(keys @ w["w1"].transpose(1, 2) + w["b1"][:, None])


def recall(w, keys):
    """M(keys): one Linear, or Linear, SiLU, Linear, per slot."""
    if "w" in w:
        return keys @ w["w"].transpose(1, 2) + w["b"][:, None]
    return hidden(w, keys) @ w["w2"].transpose(1, 2) + w["b2"][:, None]


def surprise_grad(memory, flat, keys, values):
    """d/dw of sum_features mean_rows (M(keys) - values)^2 at flat weights (S, n), per slot."""
    flat = flat.detach().clone().requires_grad_(True)
    loss = (recall(memory.unflatten(flat), keys) - values).pow(2).mean(1).sum()
    (g,) = torch.autograd.grad(loss, [flat])  # slots are independent: their sum's gradient
    return g


def moved_from_the_start(memory, gen):
    """Sets weights away from the start w0 (drawn from ``gen``), so that a rule's decay or
    retention shows in its update; returns (w0, w), both (S, n)."""
    w0 = memory.initial_weights.detach().clone()
    w = w0 + 0.1 * torch.randn(w0.shape, generator=gen)
    memory.set_weights(memory.unflatten(w.clone()))
    return w0, w


def clipped(g, clip):
    """g * min(1, clip / |g|) per slot, for flat gradients (S, n)."""
    norm = g.norm(dim=1, keepdim=True)
    return torch.where(norm > clip, g * clip / norm, g)


def another_ranks_share(rows, surprise, *per_slot):
    """What another rank adds to the ``all_reduce`` of ``all_reduce_mean``: its surprise (S,)
    and (S, ...) tensors, each times its rows, then its rows."""
    return torch.cat([rows * t.flatten() for t in (surprise, *per_slot)]
                     + [torch.full((1,), float(rows))])


def assert_loads_with_the_probe(name, **options):
    """The strategy is a built-in, and the probe runs it without error or skipped update."""
    assert name in builtin_strategies()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped probe update warns
        assert load_strategy(name, options=options).__name__.endswith(name)


def assert_works_in_both_scopes(strategy, num_layers=2, prepare=None, **options):
    """Shared scope: one slot learns from all rows. Per-sequence scope: slot i of a 3-slot
    memory ends where a 1-slot memory fed only sequence i's rows ends (a rule that mixes the
    slots, or broadcasts per-slot state wrongly, does not). ``prepare(memory)`` runs on every
    memory before its first update."""
    prepare = prepare or (lambda memory: None)
    gen = torch.Generator().manual_seed(7)
    chunks = [torch.randn(3, 5, 4, generator=gen) for _ in range(2)]
    shared = make_memory(strategy, num_layers, **options)
    prepare(shared)
    start = shared.fast_weights.clone()
    for x in chunks:
        shared.update(x.reshape(1, 15, 4))
    assert shared.n_slots == 1 and int(shared.skipped_updates) == 0
    assert not torch.allclose(shared.fast_weights, start)

    slots = make_memory(strategy, num_layers, **options)
    prepare(slots)
    slots.start_sequences(3)
    for x in chunks:
        slots.update(x)
    assert slots.n_slots == 3 and int(slots.skipped_updates) == 0
    for i in range(3):
        alone = make_memory(strategy, num_layers, **options)
        prepare(alone)
        alone.start_sequences(1)
        for x in chunks:
            alone.update(x[i:i + 1])
        torch.testing.assert_close(slots.fast_weights[i:i + 1].detach(),
                                   alone.fast_weights.detach())
    assert not torch.allclose(slots.fast_weights[0], slots.fast_weights[1])


def assert_outer_gradient_is_exact(memory, name):
    """Per-sequence memory (2 slots), two updates, then a retrieval: the outer gradient of the
    learnable tensor ``name`` (strategy state, or ``initial_weights``), along a random
    direction, equals a central finite difference of the outer loss (float64). A rule whose
    update drops part of the graph fails. Returns the gradient."""
    memory = memory.double()
    gen = torch.Generator().manual_seed(8)
    chunks = [torch.randn(2, 5, 4, generator=gen, dtype=torch.double) for _ in range(2)]
    q = torch.randn(2, 3, 4, generator=gen, dtype=torch.double)

    def outer_loss():
        memory.start_sequences(2)
        for x in chunks:
            memory.update(x)
        return memory.retrieve(q).pow(2).sum()

    param = memory.initial_weights if name == "initial_weights" else memory.state[name]
    outer_loss().backward()
    u = torch.randn(param.shape, generator=gen, dtype=torch.double)
    eps, losses = 1e-6, []
    with torch.no_grad():  # evaluation: the same updates, without a graph
        start = param.clone()
        for sign in (1, -1):
            param.copy_(start + sign * eps * u)
            losses.append(outer_loss().item())
        param.copy_(start)
    along_u = (param.grad * u).sum().item()
    assert along_u != 0
    assert along_u == pytest.approx((losses[0] - losses[1]) / (2 * eps), rel=1e-5)
    return param.grad
