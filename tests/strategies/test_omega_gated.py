"""omega_gated: titans_gated's gates on omega_window's surprise over the window, by hand;
window 1 is titans_gated; outer gradients that reach the gates and the projections through the
stored chunk."""
import pytest
import torch
from by_hand import (assert_loads_with_the_probe, assert_outer_gradient_is_exact,
                     assert_works_in_both_scopes, clipped, keys_values, make_memory,
                     moved_from_the_start, surprise_grad)

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


def test_loads_with_the_probe():
    assert_loads_with_the_probe("omega_gated")
    assert_loads_with_the_probe("omega_gated", window=3, max_rows=2)


@pytest.mark.parametrize("num_layers", [2, 1])
def test_works_in_both_scopes(num_layers):
    assert_works_in_both_scopes("omega_gated", num_layers, prepare=open_the_gates)
