"""meta_nlms: the clipped momentum step toward the learned start by hand, initial rates from the
options, and exact outer gradients through the updates."""
import math

import pytest
import torch
from by_hand import (assert_loads_with_the_probe, assert_outer_gradient_is_exact,
                     assert_works_in_both_scopes, clipped, keys_values, make_memory,
                     moved_from_the_start, surprise_grad)

from titans_lightning.strategies import meta_nlms

THETA, ETA, ALPHA = 0.3, 0.6, 0.9
OPTIONS = {"theta": THETA, "eta": ETA, "alpha": ALPHA}


def test_learned_rates_start_at_the_options_values():
    rates = meta_nlms.learned_rates(make_memory("meta_nlms", **OPTIONS))
    assert [r.item() for r in rates] == pytest.approx([THETA, ETA, ALPHA], rel=1e-6)
    assert meta_nlms.logit(0.5) == 0.0 and meta_nlms.logit(0.9) == pytest.approx(math.log(9))


@pytest.mark.parametrize("clip", [1e3, 1e-2])  # never binds, always binds
def test_two_updates_follow_the_formulas(clip):
    memory = make_memory("meta_nlms", clip=clip, **OPTIONS)
    gen = torch.Generator().manual_seed(1)
    w0, w = moved_from_the_start(memory, gen)
    S = torch.zeros_like(w)
    for _ in range(2):  # the second update carries the first one's momentum
        x = 2 * torch.randn(1, 5, 4, generator=gen)
        S = ETA * S - THETA * clipped(surprise_grad(memory, w, *keys_values(memory, x)), clip)
        w = w0 + ALPHA * (w - w0) + S
        memory.update(x)
        torch.testing.assert_close(memory.state["momentum"].detach(), S)
        torch.testing.assert_close(memory.fast_weights.detach(), w)


@pytest.mark.parametrize("name", ["initial_weights", "theta_raw", "eta_raw"])
def test_outer_gradient_is_exact(name):
    assert_outer_gradient_is_exact(make_memory("meta_nlms"), name)


def test_loads_with_the_probe():
    assert_loads_with_the_probe("meta_nlms")


def test_works_in_both_scopes():
    assert_works_in_both_scopes("meta_nlms")
