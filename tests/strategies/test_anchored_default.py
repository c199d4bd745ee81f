"""anchored_default: the reference momentum rule decaying toward a learned start, by hand (also
at the benchmark's sizes, where the CPU kernels compute the surprise), and the first-order
outer gradient its start receives although the rule is not differentiable."""
import pytest
import torch
from by_hand import (assert_loads_with_the_probe, assert_works_in_both_scopes, keys_values,
                     make_memory, moved_from_the_start, recall, surprise_grad)

from titans_lightning import NeuralMemory
from titans_lightning.strategies import anchored_default, titans_default

ALPHA, ETA, THETA = 0.9, 0.5, 0.2
OPTIONS = {"alpha": ALPHA, "eta": ETA, "theta": THETA}


@pytest.mark.parametrize("dim, hidden", [(4, 8), (16, 32)])
def test_two_updates_follow_the_anchored_formulas(dim, hidden):
    torch.manual_seed(0)
    memory = NeuralMemory(dim, hidden, strategy="anchored_default", options=OPTIONS)
    gen = torch.Generator().manual_seed(1)
    w0, w = moved_from_the_start(memory, gen)
    S = torch.zeros_like(w)
    for _ in range(2):  # the second update carries the first one's momentum
        x = torch.randn(1, 6, dim, generator=gen)
        S = ETA * S - THETA * surprise_grad(memory, w, *keys_values(memory, x))  # Eq. 13
        w = w0 + ALPHA * (w - w0) + S  # Eq. 14, toward w0
        memory.update(x)
        torch.testing.assert_close(memory.state["momentum"], S)
        torch.testing.assert_close(memory.fast_weights.detach(), w, rtol=1e-5, atol=1e-6)


def test_is_titans_default_when_the_start_is_zero():
    memories = [make_memory(name, **OPTIONS) for name in ("anchored_default", "titans_default")]
    with torch.no_grad():
        memories[0].initial_weights.zero_()
    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(2))
    for memory in memories:
        memory.update(x)
    torch.testing.assert_close(memories[0].fast_weights.detach(), memories[1].fast_weights)


def test_keeps_the_reference_rule_fixed_and_not_differentiable():
    assert anchored_default.DEFAULTS == titans_default.DEFAULTS
    assert not getattr(anchored_default, "DIFFERENTIABLE", False)
    memory = make_memory("anchored_default")
    learned = {n for n, p in memory.named_parameters()}
    assert learned == {"initial_weights"}  # K, V fixed as in the reference


@pytest.mark.parametrize("scope", ["per_sequence", "shared"])
def test_start_gets_the_first_order_outer_gradient(scope):
    """The momentum counts as a constant: after t updates of a forward w_t is affine in w0,
    d w_t / d w0 = 1 per sequence (each slot starts at w0), 1 - alpha^t in the shared memory."""
    memory = make_memory("anchored_default", **OPTIONS)
    gen = torch.Generator().manual_seed(3)
    slots = 2 if scope == "per_sequence" else 1
    if scope == "per_sequence":
        memory.start_sequences(slots)
    for _ in range(2):
        memory.update(torch.randn(slots, 5, 4, generator=gen))
    q = torch.randn(slots, 3, 4, generator=gen)
    memory.retrieve(q).pow(2).sum().backward()

    final = memory.fast_weights.detach().clone().requires_grad_(True)
    (at_final,) = torch.autograd.grad(recall(memory.unflatten(final), q).pow(2).sum(), [final])
    factor = 1.0 if scope == "per_sequence" else 1 - ALPHA ** 2
    torch.testing.assert_close(memory.initial_weights.grad, factor * at_final.sum(0, keepdim=True))


def test_loads_with_the_probe():
    assert_loads_with_the_probe("anchored_default")


@pytest.mark.parametrize("num_layers", [2, 1])
def test_works_in_both_scopes(num_layers):
    assert_works_in_both_scopes("anchored_default", num_layers)
