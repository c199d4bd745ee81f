"""The memory harness: safety, state ownership, statistics."""
import types
import warnings

import pytest
import torch

from titans_lightning import NeuralMemory, StrategyError, kernels, load_strategy
from titans_lightning.kernels import cpu
from titans_lightning.strategies import titans_default


def strategy_module(**overrides):
    """A copy of the default rule with some functions replaced."""
    funcs = {name: getattr(titans_default, name) for name in
             ("init_memory_state", "compute_keys_values", "compute_surprise", "apply_update")}
    funcs.update(overrides)
    return types.SimpleNamespace(__name__="test_rule", **funcs)


def nan_update(memory, grads, surprise):
    new = titans_default.apply_update(memory, grads, surprise)
    return {n: w * float("nan") for n, w in new.items()}


def test_nan_update_is_skipped_counted_and_warned_once():
    torch.manual_seed(0)
    rule = strategy_module(apply_update=nan_update)
    with pytest.warns(RuntimeWarning, match="non-finite"):  # the probe says so too
        load_strategy(rule)
    memory = NeuralMemory(strategy=rule)
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    for _ in range(3):
        memory.update(torch.randn(1, 8, 16))
    after = memory.state_dict()
    for name in ("fast_weights", "strategy_state.momentum"):
        assert torch.equal(after[name], before[name]), name
    assert int(memory.skipped_updates) == 3 and int(memory.num_updates) == 3
    stats = memory.pop_history()
    assert stats["skipped"].tolist() == [[1.0]] * 3
    assert stats["gate_rate"].tolist() == [[0.0]] * 3
    with pytest.warns(RuntimeWarning, match="3 memory update"):
        memory.warn_if_skipped()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.update(torch.randn(1, 8, 16))
        assert memory.warn_if_skipped() == 4  # counted, not warned again


def test_non_finite_input_leaves_memory_untouched():
    memory = NeuralMemory()
    before = memory.fast_weights.clone()
    x = torch.randn(1, 8, 16)
    x[0, 3, 5] = float("inf")
    memory.update(x)
    assert torch.equal(memory.fast_weights, before)
    assert int(memory.skipped_updates) == 1


def test_rollback_is_per_slot():
    torch.manual_seed(0)
    memory = NeuralMemory()
    memory.fast_weights = memory.fast_weights.expand(3, -1).clone()
    memory.state["momentum"] = memory.state["momentum"].expand(3, -1).clone()
    before = memory.fast_weights.clone()
    x = torch.randn(3, 8, 16)
    x[1, 0, 0] = float("nan")
    memory.update(x)
    changed = (memory.fast_weights != before).any(dim=1)
    assert changed.tolist() == [True, False, True]
    assert torch.equal(memory.state["momentum"][1], torch.zeros_like(before[1]))
    assert int(memory.skipped_updates) == 1


def test_missing_function_is_rejected_with_its_name():
    rule = strategy_module()
    del rule.apply_update
    with pytest.raises(StrategyError, match=r"no function `apply_update`.*apply_update\(memory, grads, surprise\)"):
        NeuralMemory(strategy=rule)


def test_wrong_signature_is_rejected_with_expected_signature():
    rule = strategy_module(compute_surprise=lambda memory, keys: keys.sum())
    with pytest.raises(StrategyError, match=r"compute_surprise.*expected compute_surprise\(memory, keys, values\)"):
        NeuralMemory(strategy=rule)


def test_state_dict_round_trip_is_bit_exact():
    torch.manual_seed(0)
    memory = NeuralMemory()
    for _ in range(3):
        memory.update(torch.randn(1, 32, 16))
    copy = NeuralMemory()  # different random K, V and initial weights
    copy.load_state_dict(memory.state_dict())
    for name, value in memory.state_dict().items():
        assert torch.equal(copy.state_dict()[name], value), name
    x = torch.randn(1, 32, 16)
    assert torch.equal(memory.update(x), copy.update(x))
    assert torch.equal(memory.fast_weights, copy.fast_weights)


def test_reset_restores_initial_weights_and_state_even_after_loading():
    memory = NeuralMemory()
    other = NeuralMemory()
    other.load_state_dict(memory.state_dict())
    for _ in range(2):
        other.update(torch.randn(1, 8, 16))
    other.reset()
    for name, value in memory.state_dict().items():
        assert torch.equal(other.state_dict()[name][...], value) or "updates" in name, name


def test_statistics_match_the_update():
    torch.manual_seed(0)
    memory = NeuralMemory()
    old = memory.fast_weights.clone()
    surprise = memory.update(torch.randn(1, 16, 16))
    stats = memory.pop_history()
    assert set(stats) == {"surprise", "grad_norm", "update_norm", "weight_norm", "gate_rate",
                          "skipped"}
    assert torch.equal(stats["surprise"][0], surprise)
    torch.testing.assert_close(stats["update_norm"][0], (memory.fast_weights - old).norm(dim=1))
    torch.testing.assert_close(stats["weight_norm"][0], memory.fast_weights.norm(dim=1))
    # the default rule's first step is alpha * w - theta * g, so |g| follows from the update
    grad = (memory.fast_weights - 0.999 * old) / -0.01
    torch.testing.assert_close(stats["grad_norm"][0], grad.norm(dim=1), rtol=1e-4, atol=1e-6)
    assert stats["gate_rate"].item() == 1.0 and stats["skipped"].item() == 0.0
    assert memory.pop_history() == {}


def test_update_refuses_inference_mode_with_advice():
    memory = NeuralMemory()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        memory.update(torch.randn(1, 4, 16))


def test_update_works_under_no_grad_and_keeps_no_graph():
    memory = NeuralMemory()
    with torch.no_grad():
        memory.update(torch.randn(1, 4, 16, requires_grad=True))
    assert not memory.fast_weights.requires_grad and memory.fast_weights.grad_fn is None


def test_one_layer_memory():
    memory = NeuralMemory(num_layers=1)
    assert memory.weight_names == ("w", "b")
    x = torch.randn(1, 8, 16)
    assert memory.retrieve(x).shape == (1, 8, 16)
    first = memory.update(x)
    for _ in range(5):
        last = memory.update(x)
    assert last < first


def test_checkpoint_with_another_slot_count_loads():
    memory = NeuralMemory()
    memory.start_sequences(3)
    memory.update(torch.randn(3, 8, 16))
    fresh = NeuralMemory()
    fresh.load_state_dict(memory.state_dict())
    assert torch.equal(fresh.fast_weights, memory.fast_weights)
    assert torch.equal(fresh.state["momentum"], memory.state["momentum"])


def test_differentiable_rule_passes_outer_gradients_to_learnable_state():
    step = torch.nn.Parameter(torch.tensor(0.1))

    def init(memory, emb_dim):
        titans_default.init_memory_state(memory, emb_dim)
        memory.register_state("step", step.data.clone(), learnable=True)
        memory.learn_initial_weights()

    def update(memory, grads, surprise):
        return memory.unflatten(memory.fast_weights - memory.state["step"] * memory.flatten(grads))

    rule = strategy_module(init_memory_state=init, apply_update=update)
    rule.DIFFERENTIABLE = True
    memory = NeuralMemory(strategy=rule)
    memory.start_sequences(2)
    x = torch.randn(2, 8, 16)
    memory.update(x)
    out = memory.retrieve(torch.randn(2, 4, 16)).pow(2).sum()
    out.backward()
    assert memory.state["step"].grad is not None and memory.state["step"].grad != 0
    assert memory.initial_weights.grad is not None and memory.initial_weights.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation keeps no graph
        memory.update(x)
    assert memory.fast_weights.grad_fn is None


def test_memory_pickles_and_deep_copies_with_its_strategy():
    import copy
    import pickle

    memory = NeuralMemory(strategy="titans_default")
    memory.update(torch.randn(1, 8, 16))
    clones = [copy.deepcopy(memory), pickle.loads(pickle.dumps(memory))]
    x = torch.randn(1, 8, 16)
    expected = memory.update(x)
    for clone in clones:
        assert clone.strategy is titans_default
        assert torch.equal(clone.update(x), expected)
        assert torch.equal(clone.fast_weights, memory.fast_weights)


@pytest.mark.parametrize("slots", [1, 3])
def test_retrieval_node_has_the_gradients_of_the_plain_mlp(slots):
    """The two-layer memory's hand-written backward, and its double backward (differentiable
    rules), equal autograd through the plain MLP; without autograd it is the same function."""
    from titans_lightning.kernels import _TwoLayerMemory  # retrieve's node (kernels.memory_mlp)

    torch.manual_seed(0)
    memory = NeuralMemory(dim=4, hidden=6).double()
    memory.fast_weights = torch.randn(slots, memory.fast_weights.shape[1], dtype=torch.double)
    q = torch.randn(slots, 5, 4, dtype=torch.double, requires_grad=True)
    flat = memory.fast_weights.clone().requires_grad_(True)
    torch.autograd.gradcheck(_TwoLayerMemory.apply, (q, flat))
    torch.autograd.gradgradcheck(_TwoLayerMemory.apply, (q, flat))

    w = memory.unflatten(flat)
    h = torch.nn.functional.silu(q @ w["w1"].transpose(1, 2) + w["b1"][:, None])
    plain = h @ w["w2"].transpose(1, 2) + w["b2"][:, None]
    torch.testing.assert_close(_TwoLayerMemory.apply(q, flat), plain)
    with torch.no_grad():
        torch.testing.assert_close(memory.retrieve(q), plain)


def test_flatten_of_unflattened_views_is_the_flat_tensor_and_edits_are_seen():
    memory = NeuralMemory()
    flat = torch.randn(2, memory.fast_weights.shape[1])
    views = memory.unflatten(flat)
    assert list(views) == list(memory.weight_names) and views["b1"].shape == (2, 32)
    assert views["w1"].data_ptr() == flat.data_ptr()  # views, not copies
    assert torch.equal(memory.flatten(views), flat)
    views["b2"] = views["b2"] * 2  # a rule that replaces an entry gets a fresh, correct copy
    expected = flat.clone()
    expected[:, -16:] *= 2
    assert torch.equal(memory.flatten(views), expected)


def test_any_non_finite_entry_marks_only_its_slot():
    from titans_lightning.kernels import all_finite as _all_finite

    big = torch.full((3, 5), 3e38)  # finite, though their sum would overflow
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[1, 2] = bad
        assert _all_finite(torch.zeros(3), x).tolist() == [True, False, True]
        assert _all_finite(torch.tensor([bad, 0.0, 0.0]), big).tolist() == [False, True, True]


@pytest.mark.parametrize("kernels_on", ["1", "0"])
@pytest.mark.parametrize("slots, options", [(1, {}), (3, {"theta": 0.3, "eta": 0.7,
                                                          "alpha": 0.95})])
def test_the_default_rules_own_path_is_its_four_functions_to_the_bit(monkeypatch, kernels_on,
                                                                      slots, options):
    """The harness runs the built-in titans_default without the contract's round trips; a copy
    of its functions (another object) takes the general path, and every number agrees."""
    monkeypatch.setenv("TITANS_LIGHTNING_KERNELS", kernels_on)
    if kernels_on == "1" and not kernels.available():
        pytest.skip("no C++ compiler for the kernels")
    steps = []
    real_step = cpu.momentum_step
    monkeypatch.setattr(cpu, "momentum_step", lambda *a: steps.append(1) or real_step(*a))
    memories = []
    for rule in (titans_default, strategy_module()):
        torch.manual_seed(0)
        memories.append(NeuralMemory(16, 32, 2, rule, options))
        if slots > 1:
            memories[-1].start_sequences(slots)
    torch.manual_seed(1)
    for i in range(12):
        x = torch.randn(slots, 16, 16)
        if i == 4:
            x[slots - 1, 3, 2] = float("nan")  # that slot skips this update
        own, general = (m.update(x) for m in memories)
        assert torch.equal(own.nan_to_num(-1.0), general.nan_to_num(-1.0))
    assert len(steps) == (12 if kernels_on == "1" else 0)  # the own path ran, on the kernel
    own, general = memories
    assert torch.equal(own.fast_weights, general.fast_weights)
    assert torch.equal(own.state["momentum"], general.state["momentum"])
    assert int(own.skipped_updates) == int(general.skipped_updates) == 1
    assert int(own.num_updates) == int(general.num_updates) == 12
    own_stats, general_stats = own.pop_history(), general.pop_history()
    assert set(own_stats) == set(general_stats)
    for name, value in own_stats.items():
        assert torch.equal(value.nan_to_num(-1.0), general_stats[name].nan_to_num(-1.0)), name


def test_the_default_rule_with_a_function_replaced_or_a_bad_momentum_takes_the_general_path(
        monkeypatch):
    torch.manual_seed(0)
    memory = NeuralMemory()
    calls, original = [], titans_default.apply_update

    def nan_step(memory, grads, surprise):
        calls.append(1)
        return {n: w * float("nan") for n, w in original(memory, grads, surprise).items()}

    monkeypatch.setattr(titans_default, "apply_update", nan_step)
    memory.update(torch.randn(1, 16, 16))
    assert calls == [1] and int(memory.skipped_updates) == 1  # the replacement ran
    monkeypatch.undo()
    memory.strategy_state.momentum = torch.zeros(1, 1, memory.fast_weights.shape[1])
    before = memory.fast_weights.clone()
    with pytest.raises(StrategyError, match="titans_default' broke the contract in apply_update"):
        memory.update(torch.randn(1, 16, 16))
    assert torch.equal(memory.fast_weights, before)  # refused, not committed in a wrong shape
