"""The benchmark-width model (feed-forward 2048) on the CPU kernels, with two threads, against the
same model on PyTorch's float64 operators: predictions, memory and outer gradients agree to
float32 accuracy, and the kernels did run (their calls are counted)."""
import copy
from collections import Counter

import pytest
import torch

from titans_lightning import MACTitan, kernels
from titans_lightning.kernels import cpu

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the kernels")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls: Counter = Counter()
    for name in ("feed_forward", "feed_forward_add_norm", "attention", "memory_forward",
                 "surprise_and_gradient", "keys_values", "momentum_step"):
        real = getattr(cpu, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu, name, counted)
    return calls


def test_width_2048_on_two_threads_matches_float64_operators(two_threads, kernel_calls):
    torch.manual_seed(0)
    model = MACTitan(context_window=16, dim_feedforward=2048, dropout=0.0)
    reference = copy.deepcopy(model).double()  # float64: PyTorch's operators only
    x = torch.randn(2, 64, 1)
    kernel_calls.clear()  # the strategy probe's updates, at construction

    for net in (model, reference):
        net.train()  # with an outer gradient (the kernels' backward passes)
    preds, _ = model(x)
    expected, _ = reference(x.double())
    preds.pow(2).mean().backward()
    expected.pow(2).mean().backward()

    assert kernel_calls["feed_forward"] + kernel_calls["feed_forward_add_norm"] > 0
    # the default rule's update: keys and values, the surprise with its gradient, the step with
    # the check
    assert kernel_calls["keys_values"] == kernel_calls["surprise_and_gradient"] == \
        kernel_calls["momentum_step"] > 0
    torch.testing.assert_close(preds.double(), expected, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=2e-3, atol=2e-5, msg=name)
    for mine, theirs in zip(model.memories, reference.memories):
        torch.testing.assert_close(mine.fast_weights.double(), theirs.fast_weights,
                                   rtol=1e-4, atol=1e-6)

    kernel_calls.clear()
    model.eval()
    reference.eval()
    with torch.no_grad():
        preds, _ = model(x)
        expected, _ = reference(x.double())
    assert kernel_calls["feed_forward_add_norm"] > 0 and kernel_calls["attention"] > 0
    torch.testing.assert_close(preds.double(), expected, rtol=1e-4, atol=1e-5)
