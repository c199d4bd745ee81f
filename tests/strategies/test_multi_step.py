"""multi_step: several clipped momentum steps per update by hand, one step is meta_nlms,
evaluation and training take the same steps, and outer gradients are exact through the
further steps (their gradients keep their graph)."""
import pytest
import torch
from by_hand import (assert_loads_with_the_probe, assert_outer_gradient_is_exact,
                     assert_works_in_both_scopes, clipped, keys_values, make_memory,
                     surprise_grad)

from titans_lightning.strategies import multi_step

THETA, ETA, ALPHA = 0.3, 0.6, 0.9
OPTIONS = {"theta": THETA, "eta": ETA, "alpha": ALPHA}


def chunks(n=2, slots=1):
    gen = torch.Generator().manual_seed(1)
    return [2 * torch.randn(slots, 5, 4, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("clip", [1e3, 1e-2])  # never binds, always binds
@pytest.mark.parametrize("num_layers", [2, 1])
def test_two_updates_of_three_steps_follow_the_formulas(clip, num_layers):
    memory = make_memory("multi_step", num_layers, steps=3, clip=clip, **OPTIONS)
    w0 = memory.initial_weights.detach().clone()
    w = w0 + 0.1 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(2))
    memory.set_weights(memory.unflatten(w.clone()))
    S = torch.zeros_like(w)
    for x in chunks():  # the second update carries the first one's momentum
        keys, values = keys_values(memory, x)
        for _ in range(3):  # each step's gradient at the weights the step before left
            S = ETA * S - THETA * clipped(surprise_grad(memory, w, keys, values), clip)
            w = w0 + ALPHA * (w - w0) + S
        memory.update(x)
        torch.testing.assert_close(memory.state["momentum"].detach(), S)
        torch.testing.assert_close(memory.fast_weights.detach(), w)
        assert multi_step.CHUNK not in vars(memory)  # the keys and values lived one update


def test_one_step_is_meta_nlms():
    memories = [make_memory("multi_step", steps=1, **OPTIONS), make_memory("meta_nlms", **OPTIONS)]
    for x in chunks(3):
        for memory in memories:
            memory.update(x)
    torch.testing.assert_close(memories[0].fast_weights, memories[1].fast_weights)


def test_evaluation_takes_the_steps_training_takes():
    trained, evaluated = (make_memory("multi_step", **OPTIONS) for _ in range(2))
    for memory in (trained, evaluated):
        memory.start_sequences(2)
    for x in chunks(2, slots=2):
        trained.update(x)
        with torch.no_grad():
            evaluated.update(x)
    assert trained.fast_weights.requires_grad and not evaluated.fast_weights.requires_grad
    torch.testing.assert_close(trained.fast_weights.detach(), evaluated.fast_weights)


@pytest.mark.parametrize("name", ["theta_raw", "initial_weights"])
def test_outer_gradient_is_exact_through_the_further_steps(name):
    assert_outer_gradient_is_exact(make_memory("multi_step", steps=3), name)


def test_the_further_gradients_go_through_the_memorys_reduce_hook():
    """Under DDP every gradient of every step must be that of the global batch."""
    memory = make_memory("multi_step", steps=3, clip=1e3, **OPTIONS)
    calls = []

    def twice_the_gradient(surprise, grads, rows):  # stands in for all_reduce_mean
        calls.append(rows)
        return surprise, 2 * grads

    memory.reduce = twice_the_gradient
    w = w0 = memory.initial_weights.detach().clone()
    (x,) = chunks(1)
    keys, values = keys_values(memory, x)
    S = torch.zeros_like(w)
    for _ in range(3):
        S = ETA * S - THETA * 2 * surprise_grad(memory, w, keys, values)
        w = w0 + ALPHA * (w - w0) + S
    memory.update(x)
    assert calls == [5, 5, 5]  # the harness's, then one per further step
    torch.testing.assert_close(memory.fast_weights.detach(), w)


@pytest.mark.parametrize("steps", [0, 1.5])
def test_steps_must_be_a_whole_number_of_at_least_one(steps):
    # 1.5 is refused by the option check (not a whole number), 0 by the rule itself
    with pytest.raises(ValueError, match="whole number"):
        make_memory("multi_step", steps=steps)


def test_loads_with_the_probe():
    assert_loads_with_the_probe("multi_step")


@pytest.mark.parametrize("num_layers", [2, 1])
def test_works_in_both_scopes(num_layers):
    assert_works_in_both_scopes("multi_step", num_layers)
