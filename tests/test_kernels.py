"""The CPU kernels compute what their PyTorch implementation (the specification) computes, to
float rounding, forward and backward, and the layers and the memory run on them."""
import math
import platform
import warnings

import pytest
import torch
import torch.nn.functional as F

from titans_lightning import encoder as enc
from titans_lightning import kernels
from titans_lightning.kernels import build, cpu, reference

from test_encoder import assert_same_gradients

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the kernels")


def weights(f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(f, 16, generator=g) * 0.3, torch.randn(f, generator=g) * 0.3
    w2, b2 = torch.randn(16, f, generator=g) * 0.1, torch.randn(16, generator=g)
    return [t.requires_grad_(True) for t in (w1, b1, w2, b2)]


def explicit(x, w1, b1, w2, b2, keep, p):
    """The same function with a dense 0/1 mask, in float64."""
    h = F.silu(F.linear(x.double(), w1.double(), b1.double())) * keep.double() / (1.0 - p)
    return F.linear(h, w2.double(), b2.double())


@pytest.mark.parametrize("rows", [1, 5, 13, 24, 100])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_forward_and_backward_equal_the_explicit_mask(rows, p):
    torch.manual_seed(rows)
    x = torch.randn(rows, 16, requires_grad=True)
    params = weights(f=96)
    seed = 12345 + rows
    out = cpu._FeedForward.apply(x, *params, p, seed)
    keep = cpu.keep_mask(seed, p, rows, 96) if p > 0 else torch.ones(rows, 96, dtype=torch.bool)
    ref = explicit(x, *params, keep, p)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(rows, 16)
    got = torch.autograd.grad(out, [x, *params], g)
    want = torch.autograd.grad(ref, [x, *params], g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_keep_mask_is_a_bernoulli_process():
    p, rows, f = 0.1, 2000, 2048
    keep = cpu.keep_mask(7, p, rows, f)
    n = keep.numel()
    dropped = (~keep).double()
    rate = dropped.mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    # neighbours along a row, along a column and at the vector-lane boundary are independent
    for a, b in [(dropped[:, 1:], dropped[:, :-1]), (dropped[1:], dropped[:-1]),
                 (dropped[:, 16::16], dropped[:, 15:-1:16])]:
        both = (a * b).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / a.numel())
    # each row's and each unit's drop count has the binomial spread (no row or lane is special)
    for counts, trials in [(dropped.sum(1), f), (dropped.sum(0), rows)]:
        var = counts.var().item()
        assert 0.8 < var / (trials * p * (1 - p)) < 1.2


def test_keep_mask_follows_the_seed():
    a, b = cpu.keep_mask(1, 0.3, 40, 64), cpu.keep_mask(1, 0.3, 40, 64)
    c = cpu.keep_mask(2, 0.3, 40, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows draw differently
    assert cpu.keep_mask(3, 0.0, 10, 32).all()


def test_dropout_draws_from_the_torch_generator():
    x = torch.randn(30, 16)
    params = weights()
    torch.manual_seed(5)
    a = cpu.feed_forward(x, *params, 0.2)
    b = cpu.feed_forward(x, *params, 0.2)
    torch.manual_seed(5)
    assert torch.equal(cpu.feed_forward(x, *params, 0.2), a) and not torch.equal(a, b)


def test_same_result_on_one_and_two_threads():
    x = torch.randn(300, 16, requires_grad=True)
    params = weights(f=128)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = cpu._FeedForward.apply(x, *params, 0.1, 99)
            results.append((out, torch.autograd.grad(out.sum(), [x, *params])))
    finally:
        torch.set_num_threads(before)
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)  # each row is computed by one thread, whatever the split
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # summation order


def test_silu_is_accurate_to_a_few_ulp_over_the_float_range():
    """Unit j of row r is silu(x_r) itself (w1 = ones in column 0, w2 = identity)."""
    v = torch.cat([torch.linspace(-100.0, 90.0, 200_001), torch.linspace(-8.0, 8.0, 200_001)])
    x = torch.zeros(v.numel(), 16)
    x[:, 0] = v
    w1, w2 = torch.zeros(16, 16), torch.eye(16)
    w1[:, 0] = 1.0
    out = cpu.feed_forward(x, w1, torch.zeros(16), w2, torch.zeros(16), 0.0)
    ref = F.silu(v.double())
    tiny = ref.abs() > 1e-30  # below that, units in the last place are subnormal
    ulp = torch.nextafter(ref.float().abs(), torch.tensor(math.inf)).double() - ref.float().abs()
    assert ((out.double() - ref[:, None]).abs()[tiny] / ulp[tiny, None]).max() <= 4.0


def test_non_finite_input_stays_in_its_row():
    x = torch.randn(20, 16)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    out = cpu.feed_forward(x, *weights(), 0.0)
    bad = ~torch.isfinite(out).all(1)
    assert bad[3] and bad.sum() <= 2 and torch.isfinite(out[[0, 1, 2, 4, 5, 6]]).all()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Which CPU kernels ran: {name: calls}."""
    calls = {}
    for name in ("attention", "add_layer_norm", "project_add_layer_norm", "feed_forward",
                 "feed_forward_add_norm", "dropout", "mac_query", "keys_values",
                 "memory_forward", "memory_backward", "recall_error", "commit_update"):
        real = getattr(cpu, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu, name, counted)
    return calls


def layer_pair(scaled_norms=False):
    """The library's encoder layer and the package's, with the same weights, in eval mode;
    ``scaled_norms``: norms that are not the identity they start as."""
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(16, 2, 256, 0.1, activation=F.silu, batch_first=True)
    mine = enc.EncoderLayer(16, 2, 256, 0.1)
    if scaled_norms:
        with torch.no_grad():
            for norm in (ref.norm1, ref.norm2):
                norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    mine.load_state_dict(ref.state_dict())
    return ref.eval(), mine.eval()


def test_encoder_layer_uses_the_kernels_and_equals_the_library_layer(kernel_calls):
    ref, mine = layer_pair()
    x = torch.randn(6, 20, 16, requires_grad=True)
    a, b = ref(x), mine(x)
    assert kernel_calls == {"attention": 1, "add_layer_norm": 2, "feed_forward": 1}
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert_same_gradients(ref, mine, x, a, b, rtol=1e-4, atol=1e-5)


def test_encoder_layer_without_grad_is_three_kernel_calls_and_equals_the_library_layer(
        kernel_calls):
    ref, mine = layer_pair(scaled_norms=True)
    x = torch.randn(6, 20, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
        # the norms folded into the output projection and into the feed-forward
        assert kernel_calls == {"attention": 1, "project_add_layer_norm": 1,
                                "feed_forward_add_norm": 1}
        kernel_calls.clear()
        mine.train()(x)  # dropout on: the residual dropouts and norms are calls of their own
        assert kernel_calls == {"attention": 1, "dropout": 2, "add_layer_norm": 2,
                                "feed_forward": 1}


def test_single_pass_residual_norms_equal_their_operators():
    torch.manual_seed(0)
    x, r = torch.randn(300, 16), torch.randn(300, 16)
    project, norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
    w1, b1, w2, b2 = (t.detach() for t in weights(f=64))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
        torch.testing.assert_close(cpu.project_add_layer_norm(x, r, project, norm),
                                   norm(x + project(r)), rtol=1e-5, atol=1e-5)
        ffn = F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)
        torch.testing.assert_close(cpu.feed_forward_add_norm(x, w1, b1, w2, b2, norm),
                                   norm(x + ffn), rtol=1e-5, atol=1e-5)


def test_model_under_cpu_autocast_runs_on_the_library_operators():
    """Autocast hands the layers bfloat16 tensors the kernels cannot read: they step aside."""
    from titans_lightning import MACTitan
    torch.manual_seed(0)
    model = MACTitan(context_window=4, dim_feedforward=32).eval()
    x = torch.randn(2, 12, 1)
    with torch.no_grad():
        want = model(x)[0]
        for memory in model.memories:  # the second pass starts from the same memory
            memory.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.why_not("mac_query", torch.randn(3, 16), model.layers[0].query,
                                   False) == ["CPU autocast is on"]
            got = model(x)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_recall_error_of_values_the_kernel_cannot_take_uses_the_operators():
    from titans_lightning.memory import NeuralMemory
    torch.manual_seed(0)
    memory = NeuralMemory(16, 32)
    keys = torch.randn(1, 50, 16)
    for values, reason in ((torch.randn(1, 50, 1), "values (1, 50, 1) of another shape"),
                           (torch.randn(1, 50, 16, dtype=torch.float64), "float64 tensor")):
        assert any(r.startswith(reason) for r in kernels.why_not(
            "recall_error", keys, values, memory.fast_weights))
        want = (memory.retrieve(keys) - values).pow(2).sum((1, 2)) / 50
        torch.testing.assert_close(memory.recall_error(keys, values), want)
    with pytest.raises(TypeError, match="float32 CPU tensors"):  # the kernel's own guard
        cpu.surprise_and_gradient(keys, keys.double(), memory.fast_weights, 32)


def test_dropout_kernel_applies_the_reported_mask_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(4000, 16, requires_grad=True)
    torch.manual_seed(5)
    out = cpu.dropout(x, 0.25)
    torch.manual_seed(5)
    seed = cpu.dropout_seed(0.25)  # the seed the call above drew
    keep = cpu.keep_mask(seed, 0.25, 4000, 16)
    torch.testing.assert_close(out, x.detach() * keep / 0.75)
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g * keep / 0.75)
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / keep.numel())


def test_training_layer_drops_at_rate_p_in_the_feed_forward():
    """The kernel's dropout in a training layer: outputs differ per call, match in expectation."""
    torch.manual_seed(0)
    layer = enc.EncoderLayer(16, 2, 512, 0.1)
    x = torch.randn(4000, 16)
    params = (layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
    with torch.no_grad():
        dense = cpu.feed_forward(x, *params, 0.0)
        runs = torch.stack([cpu.feed_forward(x, *params, 0.1) for _ in range(20)])
    assert not torch.equal(runs[0], runs[1])
    # inverted dropout keeps the mean: the average over draws approaches the dense output
    err = (runs.mean(0) - dense).abs().mean() / dense.abs().mean()
    single = (runs[0] - dense).abs().mean() / dense.abs().mean()
    assert err < single / 3


def test_bad_dropout_probability_is_rejected():
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        cpu.feed_forward(torch.randn(2, 16), *weights(), 1.0)


@pytest.mark.parametrize("slots, rows, d, h", [(1, 1024, 16, 32), (3, 7, 16, 32), (2, 5, 32, 16)])
def test_memory_kernel_equals_the_library_products(slots, rows, d, h):
    torch.manual_seed(slots)
    q = torch.randn(slots, rows, d, dtype=torch.float64)
    flat = torch.randn(slots, 2 * h * d + h + d, dtype=torch.float64) * 0.3
    assert kernels.why_not("memory_mlp", q.float(), flat.float()) == []
    out, a, s = cpu.memory_forward(q.float(), flat.float(), h, keep=True)
    qr, fr = q.clone().requires_grad_(True), flat.clone().requires_grad_(True)
    ref, ref_a, ref_s = reference.two_layer(qr, *reference.two_layer_weights(fr, d))
    for got, want in [(out, ref), (a, ref_a), (s, ref_s)]:
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    gq, gflat = cpu.memory_backward(q.float(), flat.float(), a, s, g.float(), True, True)
    want_q, want_flat = torch.autograd.grad(ref, [qr, fr], g)
    torch.testing.assert_close(gq.double(), want_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gflat.double(), want_flat, rtol=1e-4, atol=1e-4)


def test_memory_uses_the_kernel_only_where_it_applies():
    q = torch.randn(1, 4, 16)
    assert kernels.why_not("memory_mlp", q, torch.zeros(1, 2 * 32 * 16 + 48)) == []
    assert kernels.why_not("memory_mlp", q, torch.zeros(1, 2 * 24 * 16 + 40)) == [
        "hidden width 24 not among the kernel's (16, 32, 64)"]
    assert kernels.why_not("memory_mlp", q.double(), torch.zeros(1, 1072).double()) == [
        "float64 tensor"]


def test_neural_memory_update_is_the_same_with_and_without_the_kernel(monkeypatch):
    """A float32 update through the kernels equals one through the library's operators."""
    from titans_lightning.memory import NeuralMemory
    torch.manual_seed(0)
    a = NeuralMemory(16, 32, 2, "titans_default")
    b = NeuralMemory(16, 32, 2, "titans_default")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 200, 16)
    q = torch.randn(1, 50, 16, requires_grad=True)
    for _ in range(3):
        a.update(x)
    monkeypatch.setenv(build.SWITCH, "0")  # every operation on PyTorch's
    for _ in range(3):
        b.update(x)
    torch.testing.assert_close(a.fast_weights, b.fast_weights, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(b.retrieve(q).sum(), q)[0]
    monkeypatch.undo()
    gb = torch.autograd.grad(a.retrieve(q).sum(), q)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slots, rows, d, h", [(1, 1024, 16, 32), (3, 7, 16, 64), (2, 5, 32, 16)])
def test_recall_kernel_gives_the_surprise_and_its_gradient(slots, rows, d, h):
    torch.manual_seed(rows)
    keys, values = torch.randn(slots, rows, d), torch.randn(slots, rows, d)
    flat = torch.randn(slots, 2 * h * d + h + d) * 0.3
    surprise, gflat = cpu.surprise_and_gradient(keys, values, flat, h)
    fr = flat.double().requires_grad_(True)
    ref = (reference.two_layer(keys.double(), *reference.two_layer_weights(fr, d))[0]
           - values.double())
    ref = ref.pow(2).sum((1, 2)) / rows
    torch.testing.assert_close(surprise.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    weights = torch.arange(1.0, slots + 1, dtype=torch.float64)  # slot i's loss weighted i + 1
    (want,) = torch.autograd.grad((ref * weights).sum(), fr)
    torch.testing.assert_close(gflat.double() * weights[:, None], want, rtol=1e-4, atol=1e-5)


def test_recall_kernel_gives_the_same_bits_on_one_and_two_threads():
    torch.manual_seed(0)
    keys, values, flat = torch.randn(2, 1000, 16), torch.randn(2, 1000, 16), torch.randn(2, 1072)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(cpu.surprise_and_gradient(keys, values, flat * 0.3, 32))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_strategys_fused_update_is_no_part_of_the_contract(tmp_path):
    """The harness calls the four functions only: a rule's fused_update, even one defined next to
    its three functions, is never called."""
    from titans_lightning.memory import NeuralMemory
    rule = tmp_path / "with_fused_update.py"
    rule.write_text(
        "from titans_lightning.strategies import titans_default as base\n\n"
        "init_memory_state = base.init_memory_state\n\n\n"
        "def compute_keys_values(memory, x):\n"
        "    return base.compute_keys_values(memory, x)\n\n\n"
        "def compute_surprise(memory, keys, values):\n"
        "    return base.compute_surprise(memory, keys, values)\n\n\n"
        "def apply_update(memory, grads, surprise):\n"
        "    return base.apply_update(memory, grads, surprise)\n\n\n"
        "def fused_update(memory, x):\n"
        "    raise AssertionError('fused_update was called')\n")
    torch.manual_seed(0)
    memory = NeuralMemory(16, 32, 2, str(rule))
    torch.manual_seed(0)
    default = NeuralMemory(16, 32, 2, "titans_default")
    x = torch.randn(1, 50, 16)
    memory.update(x)
    default.update(x)
    assert torch.equal(memory.fast_weights, default.fast_weights)


class _ScaledSurprise:
    """titans_default, but the surprise is twice recall_error: the gradient must double."""

    def __init__(self, scale):
        from titans_lightning.strategies import titans_default
        self.rule, self.scale = titans_default, scale
        self.init_memory_state = titans_default.init_memory_state
        self.compute_keys_values = titans_default.compute_keys_values
        self.apply_update = titans_default.apply_update

    def compute_surprise(self, memory, keys, values):
        return memory.recall_error(keys, values) * self.scale


def test_the_surprise_gradient_comes_from_the_recall_kernel_and_scales_with_the_surprise(
        monkeypatch):
    """recall_error's kernel computes the weights' gradient with the surprise: the update's
    backward pass only scales it (no memory backward pass), so a surprise that is a multiple of
    recall_error gets that multiple of the gradient, and all three agree."""
    from titans_lightning.kernels import cpu
    from titans_lightning.memory import NeuralMemory
    backward_passes = []
    real = cpu.memory_backward
    monkeypatch.setattr(cpu, "memory_backward",
                        lambda *a, **k: backward_passes.append(1) or real(*a, **k))
    torch.manual_seed(0)
    direct = NeuralMemory(16, 32, 2, "titans_default")
    scaled = NeuralMemory(16, 32, 2, _ScaledSurprise(2.0))
    unscaled = NeuralMemory(16, 32, 2, _ScaledSurprise(1.0))
    scaled.load_state_dict(direct.state_dict())
    unscaled.load_state_dict(direct.state_dict())
    x = torch.randn(1, 300, 16)
    for memory in (direct, scaled, unscaled):
        memory.update(x)
    assert not backward_passes
    g_direct, g_unscaled = direct.history[-1]["grads"], unscaled.history[-1]["grads"]
    torch.testing.assert_close(g_direct, g_unscaled)
    torch.testing.assert_close(scaled.history[-1]["grads"], 2 * g_direct)
    with torch.no_grad():  # and the gradient is the operators' own
        flat = direct.initial_weights.clone().requires_grad_(True)
        keys, values = direct.strategy.compute_keys_values(direct, x)
    with torch.enable_grad():
        want = kernels.reference.two_layer(keys, *kernels.reference.two_layer_weights(flat, 16))[0]
        (g_want,) = torch.autograd.grad((want - values).pow(2).sum() / 300, [flat])
    torch.testing.assert_close(g_direct, g_want, rtol=1e-4, atol=1e-5)


def test_commit_kernel_keeps_the_old_weights_of_exactly_the_non_finite_slots():
    torch.manual_seed(0)
    S, n = 6, 1072
    surprise, grads = torch.rand(S), torch.randn(S, n)
    new, old = torch.randn(S, n), torch.randn(S, n)
    surprise[1] = float("nan")
    grads[2, 7] = float("inf")
    new[3, n - 1] = -float("inf")
    new[4] = 3e38  # finite, though a sum of the entries would overflow
    updates, skipped = torch.tensor(5), torch.tensor(2)
    assert kernels.why_not("commit_update", surprise, grads, new, old, updates, skipped) == []
    ok, weights = cpu.commit_update(surprise, grads, new, old, updates, skipped)
    want = kernels.all_finite(surprise[:, None], grads, new)
    assert ok.tolist() == want.tolist() == [True, False, False, False, True, True]
    assert torch.equal(weights, torch.where(want[:, None], new, old))
    assert int(updates) == 6 and int(skipped) == 5
    assert kernels.why_not("commit_update", surprise, grads, new.requires_grad_(True), old,
                           updates, skipped) == ["a gradient is needed (the kernel has no "
                                                 "backward pass)"]


def test_momentum_step_kernel_is_the_rules_operators_to_the_bit_and_rolls_back_per_slot():
    torch.manual_seed(0)
    S, n = 6, 1073  # not a multiple of the vector width: the tail is compared too
    surprise, grads = torch.rand(S), torch.randn(S, n)
    old, momentum = torch.randn(S, n), torch.randn(S, n)
    surprise[1] = float("nan")
    grads[2, 7] = float("inf")
    momentum[3, 0] = float("nan")
    old[4] = 3e38  # finite, and alpha * 3e38 stays finite
    counters = {k: (torch.tensor(5), torch.tensor(2)) for k in ("kernel", "operators")}
    args = (surprise, grads, old, momentum)
    assert kernels.why_not("momentum_step", *args, 0.999, 0.9, 0.01, *counters["kernel"]) == []
    ok, weights, kept = cpu.momentum_step(*args, 0.999, 0.9, 0.01, *counters["kernel"])
    want = reference.momentum_step(*args, 0.999, 0.9, 0.01, *counters["operators"])
    assert ok.tolist() == want[0].tolist() == [True, False, False, False, True, True]
    exactly = dict(rtol=0, atol=0, equal_nan=True)  # bit for bit: no fused multiply-add
    torch.testing.assert_close(weights, want[1], **exactly)
    torch.testing.assert_close(kept, want[2], **exactly)
    step = 0.9 * momentum[0] - 0.01 * grads[0]  # titans_default's apply_update, slot 0
    assert torch.equal(kept[0], step) and torch.equal(weights[0], 0.999 * old[0] + step)
    assert torch.equal(weights[1], old[1]) and torch.equal(weights[3], old[3])
    torch.testing.assert_close(kept[3], momentum[3], **exactly)  # its NaN kept, not spread
    assert [int(c) for c in counters["kernel"]] == [int(c) for c in counters["operators"]] \
        == [6, 5]
    assert kernels.why_not("momentum_step", surprise, grads, old, momentum[:, :9], 0.999, 0.9,
                           0.01, *counters["kernel"])[0].startswith("a momentum (6, 9) of another")
    assert kernels.why_not("momentum_step", *args, 0.999, 0.9, torch.tensor(0.01),
                           *counters["kernel"]) == ["theta a Tensor, the kernel takes a number"]


@pytest.mark.parametrize("windows, L, e", [(128, 36, 8), (3, 5, 4), (2, 68, 8), (4, 17, 16)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_attention_equals_softmax_with_the_explicit_mask(windows, L, e, p):
    """One head per window here; the heads of a window are covered through the encoder layer."""
    torch.manual_seed(L)
    q, k, v = (torch.randn(windows, L, e, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    seed = 1000 + L
    out = cpu._Attention.apply(torch.cat([q, k, v], -1).float(), 1, p, seed)  # one head
    keep = (cpu.keep_mask(seed, p, windows * L, L).view(windows, L, L) if p > 0
            else torch.ones(windows, L, L, dtype=torch.bool))
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(e), dim=-1)
    ref = (weights * keep / (1.0 - p)) @ v
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(windows, L, e, dtype=torch.float64)
    qkv = torch.cat([q, k, v], -1).detach().float().requires_grad_(True)
    got = torch.autograd.grad(cpu._Attention.apply(qkv, 1, p, seed), qkv, g.float())[0]
    got = got.split(e, dim=-1)
    want = torch.autograd.grad(ref, [q, k, v], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    if p == 0.0:  # without a gradient: the evaluation kernel (queries across the lanes for e <= 8)
        with torch.no_grad():
            out = cpu.attention(torch.cat([q, k, v], -1).float(), 1, 0.0)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, e", [(2, 8), (4, 4), (2, 16)])
def test_attention_without_grad_keeps_the_heads_apart(heads, e):
    torch.manual_seed(e)
    N, L = 5, 37
    qkv = torch.randn(N, L, 3, heads, e)
    with torch.no_grad():
        out = cpu.attention(qkv.view(N, L, -1), heads, 0.0)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, heads, L, e) each
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e), -1) @ v
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(N, L, heads * e), rtol=1e-5,
                               atol=1e-5)


def test_encoder_layer_runs_its_attention_on_the_kernel(monkeypatch):
    calls = []
    original = cpu.attention
    monkeypatch.setattr(cpu, "attention", lambda *a: calls.append(a[2]) or original(*a))
    layer = enc.EncoderLayer(16, 2, 64, 0.1)
    x = torch.randn(5, 12, 16, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    assert calls == [0.1] and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    layer.eval()
    layer(x)
    assert calls == [0.1, 0.0]  # evaluation: no dropout


@pytest.mark.parametrize("windows", [7, 64])  # 252 rows on one thread, 2304 split over threads
def test_add_layer_norm_equals_the_library_layer_norm(windows):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(windows, 36, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(windows, 36, 16, dtype=torch.float64, requires_grad=True) * 3
    assert kernels.why_not("add_norm", x.float(), r.float(), norm, 0.0) == []
    xf, rf = x.detach().float().requires_grad_(True), r.detach().float().requires_grad_(True)
    out = cpu.add_layer_norm(xf, rf, norm)
    ref = F.layer_norm(x + r, (16,), norm.weight.double(), norm.bias.double(), norm.eps)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [xf, rf, norm.weight, norm.bias], g.float())
    w = norm.weight.detach().double().requires_grad_(True)
    b = norm.bias.detach().double().requires_grad_(True)
    ref = F.layer_norm(x + r, (16,), w, b, norm.eps)
    want = torch.autograd.grad(ref, [x, r, w, b], g)
    for a, bb in zip(got, want):
        torch.testing.assert_close(a.double(), bb, rtol=1e-4, atol=1e-4)
    assert kernels.why_not("add_norm", x.float(), r.float(), torch.nn.LayerNorm(8), 0.0) == [
        "a layer norm other than an affine one over 16 features"]


@pytest.mark.parametrize("then_silu", [False, True])
def test_query_kernel_equals_linear_normalize_silu(then_silu):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 16)
    x = torch.randn(5, 37, 16)
    x[0, 0] = 0.0  # the query of a zero row: the bias, normalised
    with torch.no_grad():
        linear.weight[:, :] = linear.weight * 3
        assert kernels.why_not("mac_query", x, linear, then_silu) == []
        got = cpu.mac_query(x, linear, then_silu)
        want = F.normalize(linear(x), dim=-1)
        want = F.silu(want) if then_silu else want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert kernels.why_not("mac_query", x, linear, then_silu) == [  # with a gradient
        "a gradient is needed (the kernel has no backward pass)"]


@pytest.mark.parametrize("hidden", [16, 32, 64])
@pytest.mark.parametrize("then_silu", [False, True])
def test_mac_recall_on_the_kernels_equals_the_operators(hidden, then_silu, kernel_calls,
                                                        monkeypatch):
    from titans_lightning.memory import NeuralMemory
    from titans_lightning.model import MACLayer
    torch.manual_seed(hidden)
    layer = MACLayer(16, 4, 2, NeuralMemory(16, hidden), dim_feedforward=32)
    layer.memory.fast_weights = torch.randn(2, layer.memory.fast_weights.shape[1]) * 0.3
    x = torch.randn(2, 613, 16)  # two slots; rows not a multiple of the kernel's blocks
    with torch.no_grad():
        got = layer.read_memory(x, then_silu)
        assert kernel_calls == {"mac_query": 1, "memory_forward": 1}
        monkeypatch.setenv(build.SWITCH, "0")
        want = layer.read_memory(x, then_silu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_keys_values_kernel_equals_the_reference_formulas():
    from titans_lightning.memory import NeuralMemory
    from titans_lightning.strategies import titans_default
    torch.manual_seed(0)
    memory = NeuralMemory(16, 32, 2, "titans_default")
    x = torch.randn(2, 300, 16)
    x[0, 0] = 0.0  # a zero row: keys of norm 0, kept finite by F.normalize's eps
    K, V = memory.state["key_proj"], memory.state["value_proj"]
    assert kernels.why_not("keys_values", x, K, V) == []
    keys, values = titans_default.compute_keys_values(memory, x)
    want_keys, want_values = reference.keys_values(x, K, V)
    torch.testing.assert_close(keys, want_keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-6)
    K = K.clone().requires_grad_(True)
    assert kernels.why_not("keys_values", x, K, V) == [  # learnable projections: autograd's
        "a gradient is needed (the kernel has no backward pass)"]
    assert kernels.why_not("keys_values", x.double(), K.detach().double(), V.double()) == [
        "float64 tensor"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 compiler flag")
def test_portable_vector_code_computes_the_same(monkeypatch):
    """The build without AVX-512 (what a machine without it compiles) matches the references."""
    monkeypatch.setenv("TITANS_LIGHTNING_CXXFLAGS", "-mno-avx512f")  # its own cache key: built
    build._load.cache_clear()                                          # once per machine
    try:
        assert build.library() is not None
        test_forward_and_backward_equal_the_explicit_mask(13, 0.1)
        test_attention_equals_softmax_with_the_explicit_mask(3, 5, 4, 0.1)
        test_memory_kernel_equals_the_library_products(3, 7, 16, 32)
        test_add_layer_norm_equals_the_library_layer_norm(64)
        test_query_kernel_equals_linear_normalize_silu(True)
        test_silu_is_accurate_to_a_few_ulp_over_the_float_range()
        test_recall_kernel_gives_the_surprise_and_its_gradient(3, 7, 16, 64)
        test_commit_kernel_keeps_the_old_weights_of_exactly_the_non_finite_slots()
        test_dropout_kernel_applies_the_reported_mask_forward_and_backward()
        test_single_pass_residual_norms_equal_their_operators()
        test_keys_values_kernel_equals_the_reference_formulas()
    finally:
        build._load.cache_clear()
