"""What the harness checks at run time, after the construction probe passed: a rule that breaks
the contract only sometimes is stopped with a StrategyError naming the rule, the function and
what was wrong; a non-finite strategy state is rolled back with the rest of the update."""
from __future__ import annotations

import types

import pytest
import torch

from titans_lightning import NeuralMemory, StrategyError
from titans_lightning.memory import MemoryAt
from titans_lightning.strategies import titans_default

FUNCTIONS = ("init_memory_state", "compute_keys_values", "compute_surprise", "apply_update")


def rule(**breakages):
    """The default rule, where each given function misbehaves once ``rule.broken`` is set (after
    the probe): ``breakages[name](memory, *args, fine=<the default function>)``."""
    funcs = {name: getattr(titans_default, name) for name in FUNCTIONS}
    module = types.SimpleNamespace(__name__="flaky_rule", broken=False)

    def sometimes(name, broken):
        fine = funcs[name]
        return lambda memory, *args: (broken(memory, *args, fine=fine) if module.broken
                                      else fine(memory, *args))

    for name, broken in breakages.items():
        funcs[name] = sometimes(name, broken)
    vars(module).update(funcs)
    return module


def broken_memory(slots: int = 1, **breakages) -> NeuralMemory:
    torch.manual_seed(0)
    strategy = rule(**breakages)
    memory = NeuralMemory(strategy=strategy)
    if slots > 1:
        memory.start_sequences(slots)
    memory.update(torch.randn(slots, 8, 16))  # fine
    strategy.broken = True
    return memory


def snapshot(memory: NeuralMemory) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in memory.state_dict().items()}


def test_a_non_finite_per_slot_state_rolls_back_only_its_slot():
    def inf_momentum_in_slot_1(memory, grads, surprise, fine):
        new = fine(memory, grads, surprise)
        momentum = memory.state["momentum"].clone()
        momentum[1] = float("inf")
        memory.state["momentum"] = momentum
        return new

    memory = broken_memory(slots=3, apply_update=inf_momentum_in_slot_1)
    before = snapshot(memory)
    memory.update(torch.randn(3, 8, 16))
    after = memory.state_dict()
    moved = (after["fast_weights"] != before["fast_weights"]).any(dim=1)
    assert moved.tolist() == [True, False, True]
    momentum = after["strategy_state.momentum"]
    assert torch.isfinite(momentum).all()
    assert torch.equal(momentum[1], before["strategy_state.momentum"][1])
    assert int(memory.skipped_updates) == 1


def test_a_non_finite_shared_state_rolls_back_every_slot():
    def inf_counter(memory, grads, surprise, fine):
        memory.state["steps"] = torch.tensor(float("inf"))
        return fine(memory, grads, surprise)

    def with_counter(memory, emb_dim, fine=titans_default.init_memory_state):
        fine(memory, emb_dim)
        memory.register_state("steps", torch.tensor(0.0))  # one value for all slots

    strategy = rule(apply_update=inf_counter)
    strategy.init_memory_state = with_counter
    torch.manual_seed(0)
    memory = NeuralMemory(strategy=strategy)
    memory.start_sequences(2)
    strategy.broken = True
    before = snapshot(memory)
    memory.update(torch.randn(2, 8, 16))
    after = memory.state_dict()
    for name in ("fast_weights", "strategy_state.momentum", "strategy_state.steps"):
        assert torch.equal(after[name], before[name]), name
    assert int(memory.skipped_updates) == 2


def expect_broken(memory: NeuralMemory, function: str, message: str, slots: int = 1) -> None:
    with pytest.raises(StrategyError) as info:
        memory.update(torch.randn(slots, 8, 16))
    text = str(info.value)
    assert "flaky_rule" in text and f"contract in {function}" in text, text
    assert message in text, text


def test_editing_grads_in_place_is_refused():
    def scales_grads(memory, grads, surprise, fine):
        grads["w1"].mul_(2)
        return fine(memory, grads, surprise)

    expect_broken(broken_memory(apply_update=scales_grads), "apply_update",
                  "changed `grads` in place")


def test_editing_the_weights_in_place_is_refused_also_without_a_gradient():
    def edits_weights(memory, grads, surprise, fine):
        memory.weights["w2"].add_(1.0)
        return fine(memory, grads, surprise)

    memory = broken_memory(apply_update=edits_weights)
    with torch.no_grad(), pytest.raises(StrategyError, match="in place"):
        memory.update(torch.randn(1, 8, 16))


def test_a_transposed_weight_of_the_same_size_is_refused():
    def transposes(memory, grads, surprise, fine):
        new = dict(fine(memory, grads, surprise))
        new["w1"] = new["w1"].transpose(1, 2)  # (1, 16, 32): as many numbers as (1, 32, 16)
        return new

    expect_broken(broken_memory(apply_update=transposes), "apply_update",
                  "returned 'w1' of shape (1, 16, 32), expected (1, 32, 16)")


def test_a_wrong_slot_count_some_of_the_time_is_refused():
    def one_slot(memory, grads, surprise, fine):
        return {n: w[:1] for n, w in fine(memory, grads, surprise).items()}

    expect_broken(broken_memory(slots=2, apply_update=one_slot), "apply_update",
                  "expected (2, 32, 16)", slots=2)


def test_a_missing_weight_is_named():
    def drops_b2(memory, grads, surprise, fine):
        new = dict(fine(memory, grads, surprise))
        del new["b2"]
        return new

    expect_broken(broken_memory(apply_update=drops_b2), "apply_update", "returned no weight(s) "
                  "['b2']")


def test_a_surprise_without_a_gradient_is_explained():
    def detached(memory, keys, values, fine):
        return fine(memory, keys, values).detach()

    expect_broken(broken_memory(compute_surprise=detached), "compute_surprise",
                  "does not depend on the fast weights")


def test_setting_the_viewed_weights_is_refused_and_the_memorys_own_are_kept():
    def overwrites(memory, keys, values, fine):
        memory.fast_weights = torch.zeros_like(memory.fast_weights)  # memory is memory.at(leaf)
        return fine(memory, keys, values)

    memory = broken_memory(compute_surprise=overwrites)
    before = memory.fast_weights.clone()
    with pytest.raises(StrategyError, match="compute_surprise") as info:
        memory.update(torch.randn(1, 8, 16))
    assert "cannot be set" in str(info.value.__cause__ or info.value)
    assert torch.equal(memory.fast_weights, before)
    with pytest.raises(AttributeError, match="set_weights is not available on a view"):
        memory.at(before).set_weights(memory.weights)


# What a compute_surprise might try through its view; each would persist on the memory itself.
MEDDLING = {
    "not available on a view": [
        "memory.start_sequences(3)", "memory.reset()", "memory.detach_()", "memory.pop_history()",
        "memory.update(torch.randn(1, 8, 16))", "memory.learn_initial_weights()",
        "memory.register_state('late', torch.zeros(1))", "memory.warn_if_skipped()",
        "memory.memory.reset()", "memory.memory.start_sequences(3)", "memory.history.clear()",
        "memory.update_log.pop()", "memory.initial_state.momentum.fill_(5)",
        "memory.strategy_state.momentum.fill_(5)", "memory.initial_weights.fill_(5)",
        "memory.to(torch.float64)", "memory.double()", "memory.train(False)",
        "memory.load_state_dict({})", "memory.set_weights(memory.weights)",
        "memory.layout.sizes.reverse()", "memory._gate"],
    "cannot be set": [
        "memory.num_updates = torch.tensor(99)", "memory.skipped_updates = torch.tensor(9)",
        "memory.fast_weights = torch.zeros_like(memory.fast_weights)", "memory.options = {}",
        "memory.reduce = print", "memory._gate = torch.zeros(1)", "memory._building = True",
        "memory._memory = None", "memory.__class__ = object"],
    "cannot be deleted": ["del memory._warned_skips", "del memory.fast_weights"],
}


def everything(memory: NeuralMemory) -> dict[str, object]:
    """All a refused meddling could have changed: the saved tensors with their dtypes, the
    update records, the slot count, the training flag."""
    dtypes = {k: v.dtype for k, v in memory.state_dict().items()}
    return {"state": snapshot(memory), "dtypes": dtypes, "history": list(memory.history),
            "slots": memory.n_slots, "training": memory.training}


def assert_unchanged(before: dict[str, object], after: dict[str, object]) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert before["dtypes"] == after["dtypes"]
    assert len(before["history"]) == len(after["history"])
    assert all(a is b for a, b in zip(before["history"], after["history"]))
    assert (before["slots"], before["training"]) == (after["slots"], after["training"])


@pytest.mark.parametrize("refused, code", [(refused, code) for refused, codes in MEDDLING.items()
                                           for code in codes])
def test_a_view_refuses_what_acts_on_the_memory_itself(refused, code):
    def meddles(memory, keys, values, fine):
        exec(code, {"memory": memory, "torch": torch})  # memory is memory.at(leaf)
        return fine(memory, keys, values)

    memory = broken_memory(compute_surprise=meddles)  # after one clean update
    before = everything(memory)
    with pytest.raises(StrategyError, match="compute_surprise") as info:
        memory.update(torch.randn(1, 8, 16))
    cause = info.value.__cause__
    assert isinstance(cause, AttributeError)
    assert refused in str(cause) and "a view only computes a surprise" in str(cause)
    assert_unchanged(before, everything(memory))
    memory.strategy.broken = False
    memory.update(torch.randn(1, 8, 16))  # the memory still learns
    assert len(memory.history) == len(before["history"]) + 1


def test_a_view_offers_only_what_a_surprise_reads():
    offered = {name for name in dir(MemoryAt) if not name.startswith("_")}
    assert offered == {"fast_weights", "weights", "n_slots", "retrieve", "recall_error", "at",
                       "state", "options", "dim", "hidden", "num_layers", "weight_names",
                       "flatten", "unflatten", "differentiable", "training", "reduce"}
    torch.manual_seed(0)
    memory = NeuralMemory(strategy="titans_default")
    flat = torch.randn(3, memory.fast_weights.shape[1])  # (3, n): other weights, three slots
    view = memory.at(flat)
    q = torch.randn(3, 5, 16)
    assert view.fast_weights is flat and view.n_slots == 3 and memory.n_slots == 1
    assert torch.equal(view.retrieve(q), memory.at(flat).at(flat).retrieve(q))
    assert not torch.equal(view.retrieve(q)[:1], memory.retrieve(q[:1]))  # not its own weights
    assert torch.equal(view.flatten(view.weights), flat)
    assert (view.dim, view.hidden, view.num_layers, view.weight_names) == (
        memory.dim, memory.hidden, memory.num_layers, memory.weight_names)
    memory.eval()
    assert view.training is False  # read from the memory, never set through the view
    assert view.state["momentum"] is memory.state["momentum"]
    with pytest.raises(TypeError):
        view.options["theta"] = 5.0  # read-only
    assert "theta" not in memory.options


def test_a_refusal_says_what_why_and_what_instead():
    memory = NeuralMemory()
    with pytest.raises(AttributeError) as info:
        memory.at(memory.fast_weights).history
    message = str(info.value)
    assert message.startswith("memory.at(...).history is not available on a view of the memory")
    assert "a view only computes a surprise, and the harness owns the memory itself" in message
    assert "A view offers fast_weights, weights, n_slots, retrieve, recall_error, at" in message
    assert "returning them from apply_update" in message
    assert "assigning memory.state[name] = tensor" in message


def test_a_rules_own_private_attribute_is_set_on_the_memory_for_apply_update():
    """As multi_step's keys and values: set on the view in compute_surprise, read (and popped)
    from the memory in apply_update; a plain attribute, never a parameter."""
    memory = NeuralMemory()
    view = memory.at(memory.fast_weights)
    view._my_rule_value = torch.nn.Parameter(torch.ones(2))
    assert vars(memory)["_my_rule_value"] is view._my_rule_value
    assert "_my_rule_value" not in dict(memory.named_parameters())
    view._my_rule_value = (1, 2)  # the rule's own: it may replace it
    del view._my_rule_value
    assert "_my_rule_value" not in vars(memory)
    with pytest.raises(AttributeError, match="_my_rule_value is not available on a view"):
        view._my_rule_value


def test_editing_the_state_in_place_through_a_view_is_caught_by_the_harness():
    """What the view hands out is the memory's own tensor; the harness catches the edit."""
    def edits(memory, keys, values, fine):
        memory.state["momentum"].add_(1.0)
        return fine(memory, keys, values)

    expect_broken(broken_memory(compute_surprise=edits), "the update",
                  "changed the fast weights or the strategy state in place")


def test_a_surprise_of_the_wrong_shape_is_refused():
    def summed(memory, keys, values, fine):
        return fine(memory, keys, values).sum()

    expect_broken(broken_memory(compute_surprise=summed), "compute_surprise",
                  "returned (), expected one loss per slot, shape (1,)")


def test_keys_of_the_wrong_shape_are_refused():
    def flat_keys(memory, x, fine):
        keys, values = fine(memory, x)
        return keys.reshape(-1, keys.shape[-1]), values

    expect_broken(broken_memory(compute_keys_values=flat_keys), "compute_keys_values",
                  "both must be (1, 8, width)")


def test_an_error_inside_a_function_names_the_rule_and_the_function():
    def fails(memory, x, fine):
        raise IndexError("index 9 is out of bounds")

    expect_broken(broken_memory(compute_keys_values=fails), "compute_keys_values",
                  "raised IndexError: index 9 is out of bounds")


@pytest.mark.parametrize("late", ["learn_initial_weights", "register_state"])
def test_parameters_and_state_made_after_construction_are_refused(late):
    def makes_it_late(memory, grads, surprise, fine):
        if late == "learn_initial_weights":
            memory.learn_initial_weights()  # a parameter neither Adam nor DDP would know
        else:
            memory.register_state("late", torch.zeros(1))
        return fine(memory, grads, surprise)

    memory = broken_memory(apply_update=makes_it_late)
    with pytest.raises(StrategyError, match=f"called memory.{late}.* outside init_memory_state"):
        memory.update(torch.randn(1, 8, 16))


@pytest.mark.parametrize("fault", ["overflow", "inf input"])
def test_a_skipped_slot_of_a_differentiable_rule_leaves_the_outer_gradients_exact(fault):
    """meta_nlms, two slots, slot 1's update overflows: it is skipped, and a loss that reads
    slot 0 only gets the outer gradients of a memory that held slot 0 alone (not NaN from the
    discarded branch)."""
    def outer_gradients(slots: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        memory = NeuralMemory(strategy="meta_nlms")
        x = torch.randn(2, 8, 16)
        if fault == "overflow":
            x[1] *= 1e38  # finite, but the surprise and its gradient overflow
        else:
            x[1, 0, 0] = float("inf")
        memory.start_sequences(slots)
        memory.update(x[:slots])
        assert int(memory.skipped_updates) == (1 if slots == 2 else 0)
        loss = memory.retrieve(torch.randn(slots, 3, 16))[0].pow(2).sum()
        learned = dict(memory.strategy_state.named_parameters(), start=memory.initial_weights)
        return dict(zip(learned, torch.autograd.grad(loss, list(learned.values()))))

    alone, with_skipped = outer_gradients(1), outer_gradients(2)
    for name, grad in with_skipped.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, alone[name], rtol=1e-5, atol=1e-7, msg=name)
