"""titans_gated: gates and update by hand, one set of gates per slot, outer gradients that reach
the gate projections through two updates, and the gates of the global batch under DDP."""
import pytest
import torch
from by_hand import (another_ranks_share, assert_loads_with_the_probe,
                     assert_outer_gradient_is_exact, assert_works_in_both_scopes, clipped,
                     keys_values, make_memory, moved_from_the_start, surprise_grad)

from titans_lightning import distributed
from titans_lightning.strategies import titans_gated

OPTIONS = {"theta": 0.2, "eta": 0.6, "alpha": 0.9, "theta_max": 0.5}


def open_the_gates(memory):
    """Non-zero gate projections, so that every gate depends on its chunk."""
    with torch.no_grad():
        memory.state["gate_proj"].copy_(
            0.5 * torch.randn(3, 4, generator=torch.Generator().manual_seed(9)))


def test_gates_start_at_the_options_values():
    memory = make_memory("titans_gated", **OPTIONS)
    assert not memory.state["gate_proj"].any()
    memory.state["chunk_mean"] = torch.randn(1, 4)
    theta, eta, alpha = titans_gated.gates(memory, OPTIONS["theta_max"])
    for gate, option in ((theta, "theta"), (eta, "eta"), (alpha, "alpha")):
        assert gate.item() == pytest.approx(OPTIONS[option], rel=1e-6)


@pytest.mark.parametrize("clip", [1e3, 1e-2])  # never binds, always binds
def test_two_updates_follow_the_gated_formulas(clip):
    memory = make_memory("titans_gated", clip=clip, **OPTIONS)
    open_the_gates(memory)
    A, b = memory.state["gate_proj"].detach(), memory.state["gate_bias"].detach()
    gen = torch.Generator().manual_seed(1)
    w0, w = moved_from_the_start(memory, gen)
    S = torch.zeros_like(w)
    for _ in range(2):  # the second update carries the first one's momentum
        x = 2 * torch.randn(1, 5, 4, generator=gen)
        m = x.mean(1)  # (1, d)
        z = torch.sigmoid(m @ A.T + b)  # (1, 3)
        theta, eta, alpha = OPTIONS["theta_max"] * z[:, :1], z[:, 1:2], z[:, 2:]
        g = clipped(surprise_grad(memory, w, *keys_values(memory, x)), clip)
        S = eta * S - theta * g
        w = w0 + alpha * (w - w0) + S
        memory.update(x)
        torch.testing.assert_close(memory.state["chunk_mean"], m)
        torch.testing.assert_close(memory.state["momentum"].detach(), S)
        torch.testing.assert_close(memory.fast_weights.detach(), w)


def test_each_slot_gets_the_gates_of_its_own_chunk():
    memory = make_memory("titans_gated", **OPTIONS)
    open_the_gates(memory)
    memory.start_sequences(2)
    means = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    memory.state["chunk_mean"] = means
    A, b = memory.state["gate_proj"].detach(), memory.state["gate_bias"].detach()
    for i, gate in enumerate(titans_gated.gates(memory, OPTIONS["theta_max"])):
        scale = OPTIONS["theta_max"] if i == 0 else 1.0
        expected = scale * torch.sigmoid(means @ A[i] + b[i])  # (2,)
        torch.testing.assert_close(gate.detach().squeeze(1), expected)
        assert gate[0].item() != gate[1].item()


def test_outer_gradient_reaches_the_gate_projections_through_two_updates():
    """The gates read detached layer outputs; their parameters learn through the update."""
    grad = assert_outer_gradient_is_exact(make_memory("titans_gated"), "gate_proj")
    assert (grad.abs().sum(1) > 0).all()  # a_theta, a_eta and a_alpha all get a gradient
    assert_outer_gradient_is_exact(make_memory("titans_gated"), "gate_bias")


def test_data_parallel_reduce_gives_every_rank_the_gates_of_the_global_batch(monkeypatch):
    memory = make_memory("titans_gated", **OPTIONS)
    open_the_gates(memory)
    gen = torch.Generator().manual_seed(3)
    x, n = torch.randn(1, 6, 4, generator=gen), memory.fast_weights.shape[1]
    # another rank, 2 rows: its surprise, gradient and mean row
    other_s, other_g, other_m = torch.rand(1), torch.randn(1, n), torch.randn(1, 4)
    other = another_ranks_share(2, other_s, other_g, other_m)
    monkeypatch.setattr(distributed._AllReduceSum, "apply", lambda packed: packed + other)
    memory.reduce = distributed.reduce_hook(memory)

    keys, values = keys_values(memory, x)
    w, w0 = memory.fast_weights.detach().clone(), memory.initial_weights.detach()
    local_s = (memory.retrieve(keys).detach() - values).pow(2).mean(1).sum()
    m = (6 * x.mean(1) + 2 * other_m) / 8
    g = (6 * surprise_grad(memory, w, keys, values) + 2 * other_g) / 8
    surprise = memory.update(x)

    torch.testing.assert_close(surprise.detach(), (6 * local_s + 2 * other_s) / 8)
    torch.testing.assert_close(memory.state["chunk_mean"], m)
    z = torch.sigmoid(m @ memory.state["gate_proj"].detach().T + memory.state["gate_bias"].detach())
    theta, alpha = OPTIONS["theta_max"] * z[:, :1], z[:, 2:]
    expected = w0 + alpha * (w - w0) - theta * clipped(g, 1.0)
    torch.testing.assert_close(memory.fast_weights.detach(), expected)


def test_theta_must_lie_below_theta_max():
    with pytest.raises(ValueError, match="0 < theta < theta_max"):
        make_memory("titans_gated", theta=0.5, theta_max=0.5)


def test_loads_with_the_probe():
    assert_loads_with_the_probe("titans_gated")


@pytest.mark.parametrize("num_layers", [2, 1])
def test_works_in_both_scopes(num_layers):
    assert_works_in_both_scopes("titans_gated", num_layers, prepare=open_the_gates)
