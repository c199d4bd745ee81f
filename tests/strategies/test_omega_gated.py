"""omega_gated: titans_gated's gates on omega_window's surprise over the window, by hand;
window 1 is titans_gated; outer gradients that reach the gates and the projections through the
stored chunk."""
import pytest
import torch
from by_hand import (another_ranks_share, assert_loads_with_the_probe,
                     assert_outer_gradient_is_exact, assert_works_in_both_scopes, clipped,
                     keys_values, make_memory, moved_from_the_start, surprise_grad)

from titans_lightning import distributed

OPTIONS = {"theta": 0.2, "eta": 0.6, "alpha": 0.9, "theta_max": 0.5}


def open_the_gates(memory):
    """Non-zero gate projections, so that every gate depends on its chunk."""
    with torch.no_grad():
        memory.state["gate_proj"].copy_(
            0.5 * torch.randn(3, 4, generator=torch.Generator().manual_seed(9)))


def chunks(rows, slots=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(slots, r, 4, generator=gen) for r in rows]


@pytest.mark.parametrize("clip", [1e3, 1e-2])  # never binds, always binds
@pytest.mark.parametrize("window", [2, 3])
def test_updates_follow_the_formulas(window, clip):
    """Chunks of 5, 3, 6 and 4 rows: the gradient of the mean over the window's rows, stepped
    with the gates of the current chunk's mean row."""
    memory = make_memory("omega_gated", window=window, clip=clip, **OPTIONS)
    open_the_gates(memory)
    A, b = memory.state["gate_proj"].detach(), memory.state["gate_bias"].detach()
    w0, w = moved_from_the_start(memory, torch.Generator().manual_seed(2))
    S, seen = torch.zeros_like(w), []
    for x in chunks([5, 3, 6, 4]):
        seen.append(keys_values(memory, x))
        keys, values = (torch.cat(parts, dim=1) for parts in zip(*seen[-window:]))
        z = torch.sigmoid(x.mean(1) @ A.T + b)  # (1, 3)
        theta, eta, alpha = OPTIONS["theta_max"] * z[:, :1], z[:, 1:2], z[:, 2:]
        S = eta * S - theta * clipped(surprise_grad(memory, w, keys, values), clip)
        w = w0 + alpha * (w - w0) + S
        memory.update(x)
        torch.testing.assert_close(memory.state["momentum"].detach(), S)
        torch.testing.assert_close(memory.fast_weights.detach(), w)


def test_data_parallel_reduce_gives_every_rank_the_gates_of_the_global_batch(monkeypatch):
    """With a past chunk in the window: the local gradient is the window's, and the surprise,
    gradient and mean row are combined with another rank's, weighted by the current chunk's
    rows, so that the copies of a shared memory stay equal."""
    memory = make_memory("omega_gated", **OPTIONS)
    open_the_gates(memory)
    past, x = chunks([5, 6])
    memory.update(past)  # one rank alone: the window now holds this chunk
    n = memory.fast_weights.shape[1]
    other_s, other_g, other_m = torch.rand(1), torch.randn(1, n), torch.randn(1, 4)
    other = another_ranks_share(2, other_s, other_g, other_m)  # another rank, 2 rows
    monkeypatch.setattr(distributed._AllReduceSum, "apply", lambda packed: packed + other)
    memory.reduce = distributed.reduce_hook(memory)

    keys, values = (torch.cat(parts, dim=1) for parts in zip(keys_values(memory, x),
                                                              keys_values(memory, past)))
    w, w0 = memory.fast_weights.detach().clone(), memory.initial_weights.detach()
    S = memory.state["momentum"].detach().clone()
    local_s = (memory.retrieve(keys).detach() - values).pow(2).sum(-1).mean(1)
    m = (6 * x.mean(1) + 2 * other_m) / 8
    g = (6 * surprise_grad(memory, w, keys, values) + 2 * other_g) / 8
    surprise = memory.update(x)

    torch.testing.assert_close(surprise.detach(), (6 * local_s + 2 * other_s) / 8)
    torch.testing.assert_close(memory.state["chunk_mean"], m)
    A, b = memory.state["gate_proj"].detach(), memory.state["gate_bias"].detach()
    z = torch.sigmoid(m @ A.T + b)
    theta, eta, alpha = OPTIONS["theta_max"] * z[:, :1], z[:, 1:2], z[:, 2:]
    S = eta * S - theta * clipped(g, 1.0)
    torch.testing.assert_close(memory.fast_weights.detach(), w0 + alpha * (w - w0) + S)


def test_window_one_is_titans_gated():
    memories = [make_memory("omega_gated", window=1, **OPTIONS),
                make_memory("titans_gated", **OPTIONS)]
    for memory in memories:
        open_the_gates(memory)
        memory.start_sequences(2)
    for x in chunks([5, 3, 6], slots=2):
        for memory in memories:
            memory.update(x)
    torch.testing.assert_close(memories[0].fast_weights, memories[1].fast_weights)


@pytest.mark.parametrize("name", ["gate_proj", "gate_bias", "key_proj", "initial_weights"])
def test_outer_gradient_is_exact(name):
    memory = make_memory("omega_gated", **OPTIONS)
    open_the_gates(memory)
    assert_outer_gradient_is_exact(memory, name)


@pytest.mark.parametrize("option", ["window", "max_rows"])
def test_window_and_rows_must_be_whole_numbers(option):
    with pytest.raises(ValueError, match="omega_gated needs a whole number"):
        make_memory("omega_gated", **{option: 0})


def test_a_bad_theta_names_omega_gated_and_its_defaults_shape_the_window(monkeypatch):
    with pytest.raises(ValueError, match="omega_gated needs 0 < theta < theta_max"):
        make_memory("omega_gated", theta=0.7, theta_max=0.5)
    from titans_lightning.strategies import omega_gated
    monkeypatch.setitem(omega_gated.DEFAULTS, "max_rows", 7)  # its own, not omega_window's
    assert make_memory("omega_gated").state["past_weight"].shape == (1, 1, 7)


def test_loads_with_the_probe():
    assert_loads_with_the_probe("omega_gated")
    assert_loads_with_the_probe("omega_gated", window=3, max_rows=2)


@pytest.mark.parametrize("num_layers", [2, 1])
def test_works_in_both_scopes(num_layers):
    assert_works_in_both_scopes("omega_gated", num_layers, prepare=open_the_gates)
