"""delta_energy: each layer's step divided by its input's energy, by hand (two layers and one),
no clipping, exact outer gradients through the energies, and the global energies under DDP."""
import pytest
import torch
from by_hand import (another_ranks_share, assert_loads_with_the_probe,
                     assert_outer_gradient_is_exact, assert_works_in_both_scopes, hidden,
                     keys_values, make_memory, moved_from_the_start, surprise_grad)

from titans_lightning import distributed
from titans_lightning.strategies import delta_energy

THETA, ETA, ALPHA = 0.3, 0.6, 0.9
OPTIONS = {"theta": THETA, "eta": ETA, "alpha": ALPHA}


def energies_by_hand(memory, w, keys):
    """(1 + mean_rows ||k||^2) for the first layer, (1 + mean_rows ||h||^2) for the second."""
    energies = [keys.pow(2).sum(-1).mean(1)]
    if memory.num_layers == 2:
        energies.append(hidden(memory.unflatten(w), keys).pow(2).sum(-1).mean(1))
    return [1 + e for e in energies]  # each (S,)


def normalised(memory, g, divisors):
    """The flat gradient with each weight divided by its layer's divisor."""
    parts = memory.unflatten(g)
    layer = {"w": 0, "b": 0, "w1": 0, "b1": 0, "w2": 1, "b2": 1}
    return memory.flatten({n: parts[n] / divisors[layer[n]].view(-1, *[1] * (parts[n].dim() - 1))
                           for n in memory.weight_names})


@pytest.mark.parametrize("num_layers", [2, 1])
def test_two_updates_follow_the_normalised_formulas(num_layers):
    memory = make_memory("delta_energy", num_layers, **OPTIONS)
    gen = torch.Generator().manual_seed(1)
    w0, w = moved_from_the_start(memory, gen)
    S = torch.zeros_like(w)
    for _ in range(2):  # the second update carries the first one's momentum
        x = 3 * torch.randn(1, 5, 4, generator=gen)
        keys, values = keys_values(memory, x)
        g = surprise_grad(memory, w, keys, values)
        assert g.norm() > 1.0  # a clipped rule (meta_nlms's c = 1) would differ
        divisors = energies_by_hand(memory, w, keys)
        torch.testing.assert_close(divisors[0], torch.full((1,), 2.0))  # l2-normalised keys
        S = ETA * S - THETA * normalised(memory, g, divisors)
        w = w0 + ALPHA * (w - w0) + S
        memory.update(x)
        torch.testing.assert_close(memory.state["input_energy"].detach(),
                                   torch.stack(divisors, dim=1) - 1)
        torch.testing.assert_close(memory.state["momentum"].detach(), S)
        torch.testing.assert_close(memory.fast_weights.detach(), w)


def test_a_more_energetic_layer_takes_a_proportionally_smaller_step():
    memory = make_memory("delta_energy", **OPTIONS)
    grads = memory.unflatten(torch.ones_like(memory.fast_weights))
    memory.state["input_energy"] = torch.tensor([[1.0, 9.0]])
    new = memory.flatten(delta_energy.apply_update(memory, grads, None)).detach()
    step = memory.unflatten(memory.fast_weights - new)
    w1, w2 = step["w1"].flatten(), step["w2"].flatten()
    torch.testing.assert_close(w1, torch.full_like(w1, THETA / 2))  # (1 - alpha) (w - w0) = 0
    torch.testing.assert_close(w2, torch.full_like(w2, THETA / 10))


@pytest.mark.parametrize("name", ["initial_weights", "theta_raw", "key_proj"])
def test_outer_gradient_is_exact_through_the_energies(name):
    assert_outer_gradient_is_exact(make_memory("delta_energy"), name)


def test_data_parallel_reduce_gives_every_rank_the_energies_of_the_global_batch(monkeypatch):
    memory = make_memory("delta_energy", **OPTIONS)
    gen = torch.Generator().manual_seed(3)
    x, n = torch.randn(1, 6, 4, generator=gen), memory.fast_weights.shape[1]
    # another rank, 2 rows: its surprise, gradient and energies
    other_s, other_g, other_e = torch.rand(1), torch.randn(1, n), torch.tensor([[1.0, 5.0]])
    other = another_ranks_share(2, other_s, other_g, other_e)
    monkeypatch.setattr(distributed._AllReduceSum, "apply", lambda packed: packed + other)
    memory.reduce = distributed.reduce_hook(memory)

    keys, values = keys_values(memory, x)
    w = memory.fast_weights.detach().clone()
    local = torch.stack(energies_by_hand(memory, w, keys), dim=1) - 1  # (1, 2)
    energy = (6 * local + 2 * other_e) / 8
    g = (6 * surprise_grad(memory, w, keys, values) + 2 * other_g) / 8
    memory.update(x)

    torch.testing.assert_close(memory.state["input_energy"].detach(), energy)
    step = normalised(memory, g, list((1 + energy).unbind(1)))
    torch.testing.assert_close(memory.fast_weights.detach(), w - THETA * step)  # w = w0


def test_loads_with_the_probe():
    assert_loads_with_the_probe("delta_energy")


@pytest.mark.parametrize("num_layers", [2, 1])
def test_works_in_both_scopes(num_layers):
    assert_works_in_both_scopes("delta_energy", num_layers)
