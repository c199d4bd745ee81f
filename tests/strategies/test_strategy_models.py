"""Every built-in strategy, and the template, runs inside a small MAC model."""
from pathlib import Path

import pytest
import torch

from titans_lightning import MACTitan
from titans_lightning.strategy import builtin_strategies

TEMPLATE = str(Path(__file__).resolve().parents[2] / "examples" / "custom_memory.py")


@pytest.mark.parametrize("memory_layers", [2, 1])
@pytest.mark.parametrize("strategy", [*builtin_strategies(), TEMPLATE],
                         ids=[*builtin_strategies(), "template"])
def test_forward_backward_with_no_skipped_updates(strategy, memory_layers):
    torch.manual_seed(0)
    model = MACTitan(context_window=4, dim_feedforward=16, memory_layers=memory_layers,
                     strategy=strategy)
    start = [m.fast_weights.clone() for m in model.memories]
    x = torch.randn(2, 20, 1)
    for _ in range(2):
        preds, valid = model(x)
        loss = (preds[:, :-1][:, valid[:-1]] - x[:, 1:][:, valid[:-1]]).pow(2).mean()
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in (model.emb.weight, model.head.weight))
    for memory, before in zip(model.memories, start):
        assert int(memory.skipped_updates) == 0
        assert int(memory.num_updates) == 2 * 5  # (20 - 4 + 1) windows in groups of 4
        assert torch.isfinite(memory.fast_weights).all()
        assert not torch.equal(memory.fast_weights, before)


def test_the_three_published_strategies_are_built_in():
    assert {"titans_default", "adam_gated", "contrastive_ema"} <= set(builtin_strategies())
