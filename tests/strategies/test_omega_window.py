"""omega_window: the clipped momentum step on a surprise over the current and the past chunks by
hand, a window that starts empty with every sequence, state of one shape whatever the rows,
exact outer gradients through the stored chunks, and skipped updates that keep the window."""
import pytest
import torch
from by_hand import (assert_loads_with_the_probe, assert_outer_gradient_is_exact,
                     assert_works_in_both_scopes, clipped, keys_values, make_memory,
                     moved_from_the_start, recall, surprise_grad)

from titans_lightning import MACTitan
from titans_lightning.strategies import omega_window

THETA, ETA, ALPHA = 0.3, 0.6, 0.9
OPTIONS = {"theta": THETA, "eta": ETA, "alpha": ALPHA}


def chunks(rows, slots=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(slots, r, 4, generator=gen) for r in rows]


@pytest.mark.parametrize("clip", [1e3, 1e-2])  # never binds, always binds
@pytest.mark.parametrize("window", [2, 3])
def test_updates_follow_the_formulas_over_the_window(window, clip):
    """Chunks of 5, 3, 6 and 4 rows: each gradient is that of the mean over all the rows of the
    current chunk and the window - 1 before it (a longer chunk weighs more)."""
    memory = make_memory("omega_window", window=window, clip=clip, **OPTIONS)
    w0 = memory.initial_weights.detach().clone()
    _, w = moved_from_the_start(memory, torch.Generator().manual_seed(2))
    S, seen = torch.zeros_like(w), []
    for t, x in enumerate(chunks([5, 3, 6, 4])):
        seen.append(keys_values(memory, x))
        past = seen[-window:]
        keys, values = (torch.cat(parts, dim=1) for parts in zip(*past))
        g = surprise_grad(memory, w, keys, values)
        alone = surprise_grad(memory, w, *seen[-1])  # the current chunk only
        S = ETA * S - THETA * clipped(g, clip)
        w = w0 + ALPHA * (w - w0) + S
        memory.update(x)
        torch.testing.assert_close(memory.state["momentum"].detach(), S)
        torch.testing.assert_close(memory.fast_weights.detach(), w)
        if t > 0:  # ignoring the past chunks would be a different gradient
            assert not torch.allclose(clipped(alone, clip), clipped(g, clip), rtol=1e-2)


def test_window_one_is_meta_nlms():
    memories = [make_memory("omega_window", window=1, **OPTIONS),
                make_memory("meta_nlms", **OPTIONS)]
    assert memories[0].state["past_keys"].shape == (1, 0, 1024, 4)
    for x in chunks([5, 3, 6]):
        for memory in memories:
            memory.update(x)
    torch.testing.assert_close(memories[0].fast_weights, memories[1].fast_weights)


@pytest.mark.parametrize("scope", ["shared", "per_sequence"])
def test_the_first_chunk_of_every_sequence_is_fitted_on_its_own_rows(scope):
    """After start_sequences (per-sequence scope) or reset() (shared), the window is empty: the
    first update is meta_nlms's on the chunk alone, though the memory saw other chunks before."""
    slots = 2 if scope == "per_sequence" else 1
    omega, meta = (make_memory(name, **OPTIONS) for name in ("omega_window", "meta_nlms"))
    earlier, (first,) = chunks([5, 3], slots), chunks([4], slots, seed=3)
    omega.start_sequences(slots)
    for x in earlier:
        omega.update(x)
    assert omega.state["past_weight"].sum() > 0
    for memory in (omega, meta):
        if scope == "per_sequence":
            memory.start_sequences(slots)
        else:
            memory.reset()
    assert omega.state["past_weight"].shape == (slots, 1, 1024)
    assert not omega.state["past_weight"].any()
    for memory in (omega, meta):
        memory.update(first)
    torch.testing.assert_close(omega.fast_weights, meta.fast_weights)


def test_state_shapes_stay_fixed_as_the_rows_change():
    """m = 4 rows per past chunk: 3 rows are stored padded (weights 1, 1, 1, 0), 6 rows as the
    strided rows 0, 1, 3, 4 of weight 6/4 each; the surprise of the next update counts them so;
    a checkpoint of a 3-slot memory loads into a fresh one."""
    memory = make_memory("omega_window", max_rows=4, **OPTIONS)
    shapes = {n: (1, 1, 4, 4) for n in ("past_keys", "past_values")} | {"past_weight": (1, 1, 4)}
    short, long, last = chunks([3, 6, 2])
    memory.update(short)
    keys, values = keys_values(memory, short)
    assert memory.state["past_weight"].tolist() == [[[1.0, 1.0, 1.0, 0.0]]]
    torch.testing.assert_close(memory.state["past_keys"][0, 0, :3], keys[0])
    assert not memory.state["past_keys"][0, 0, 3].any()
    memory.update(long)
    keys, values = keys_values(memory, long)
    assert memory.state["past_weight"].tolist() == [[[1.5] * 4]]
    torch.testing.assert_close(memory.state["past_values"][0, 0], values[0, [0, 1, 3, 4]])
    w = {n: t.detach() for n, t in memory.weights.items()}
    err = lambda k, v: (recall(w, k) - v).pow(2).sum(-1).sum()  # noqa: E731
    now = keys_values(memory, last)
    expected = (err(*now) + 1.5 * err(keys[:, [0, 1, 3, 4]], values[:, [0, 1, 3, 4]])) / (2 + 6)
    torch.testing.assert_close(memory.update(last).detach(), expected.reshape(1))
    assert {n: tuple(memory.state[n].shape) for n in shapes} == shapes

    memory.start_sequences(3)
    for x in chunks([6, 2], slots=3):
        memory.update(x)
    assert {n: tuple(memory.state[n].shape) for n in shapes} == {
        n: (3, *shape[1:]) for n, shape in shapes.items()}
    fresh = make_memory("omega_window", max_rows=4, **OPTIONS)
    fresh.load_state_dict(memory.state_dict())
    for name in shapes:
        torch.testing.assert_close(fresh.state[name], memory.state[name].detach())


@pytest.mark.parametrize("name", ["key_proj", "value_proj", "initial_weights"])
def test_outer_gradient_is_exact_through_the_stored_chunk(name):
    """The second update's window holds the first chunk's keys and values with their graph to
    K and V: detaching them would drop part of the gradient and fail here."""
    assert_outer_gradient_is_exact(make_memory("omega_window"), name)


def test_evaluation_takes_the_steps_training_takes_and_keeps_no_graph():
    trained, evaluated = (make_memory("omega_window", **OPTIONS) for _ in range(2))
    for memory in (trained, evaluated):
        memory.start_sequences(2)
    for x in chunks([5, 3, 4], slots=2):
        trained.update(x)
        with torch.no_grad():
            evaluated.update(x)
    assert trained.state["past_keys"].requires_grad
    assert not any(evaluated.state[n].requires_grad for n in omega_window.PAST)
    torch.testing.assert_close(trained.fast_weights.detach(), evaluated.fast_weights)


def test_a_skipped_update_leaves_the_slots_window_as_it_was():
    """A non-finite chunk in slot 1 (as test_memory provokes a skip): that slot keeps its weights
    and its stored chunk, the other slots store the new one."""
    memory = make_memory("omega_window", **OPTIONS)
    memory.start_sequences(3)
    first, second = chunks([5, 3], slots=3)
    memory.update(first)
    before = {n: memory.state[n].detach().clone() for n in omega_window.PAST}
    weights = memory.fast_weights.detach().clone()
    second[1, 0, 0] = float("nan")
    memory.update(second)
    assert int(memory.skipped_updates) == 1
    torch.testing.assert_close(memory.fast_weights[1].detach(), weights[1])
    for name in omega_window.PAST:
        after = memory.state[name].detach()
        assert torch.equal(after[1], before[name][1]), name
        assert not torch.equal(after[0], before[name][0]), name
    assert memory.state["past_weight"][:, 0].sum(1).tolist() == [3.0, 5.0, 3.0]


@pytest.mark.parametrize("option", ["window", "max_rows"])
@pytest.mark.parametrize("value", [0, 1.5])
def test_window_and_rows_must_be_whole_numbers(option, value):
    # 1.5 is refused by the option check (not a whole number), 0 by the rule itself
    with pytest.raises(ValueError, match="whole number"):
        make_memory("omega_window", **{option: value})


def test_loads_with_the_probe():
    assert_loads_with_the_probe("omega_window")
    assert_loads_with_the_probe("omega_window", window=3, max_rows=2)  # the probe's R is 3


@pytest.mark.parametrize("num_layers", [2, 1])
def test_works_in_both_scopes(num_layers):
    assert_works_in_both_scopes("omega_window", num_layers)


@pytest.mark.parametrize("mac_order", ["reference", "causal"])
@pytest.mark.parametrize("scope", ["shared", "per_sequence"])
def test_a_tiny_mac_model_trains_with_it(scope, mac_order):
    """Two forward + backward passes (the shared window runs into the second forward, cut from
    the first one's graph); the last group of each forward is shorter (37 windows, groups of 4)."""
    torch.manual_seed(0)
    model = MACTitan(dim_feedforward=16, context_window=4, strategy="omega_window",
                     memory_scope=scope, mac_order=mac_order)
    x = torch.randn(2, 40, 1)
    slots = 2 if scope == "per_sequence" else 1
    for _ in range(2):
        model.zero_grad()
        preds, valid = model(x)
        assert torch.isfinite(preds).all()
        loss = (preds[:, :-1][:, valid[:-1]] - x[:, 1:][:, valid[:-1]]).pow(2).mean()
        loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    for memory in model.memories:
        assert memory.strategy_state.key_proj.grad.abs().sum() > 0
        assert int(memory.skipped_updates) == 0 and int(memory.num_updates) == 2 * 10
        assert memory.state["past_keys"].shape == (slots, 1, 1024, 16)
        # the last group holds one window of 4 rows per sequence, in either scope
        assert memory.state["past_weight"][:, 0].sum().item() == 2 * 4
