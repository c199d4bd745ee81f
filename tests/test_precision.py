"""The memory learns in float32 whatever the trainer's precision (``*-mixed`` and ``*-true``).

In bfloat16, ``0.999 * w == w`` for every weight, so a half-precision memory would never apply
its retention; under autocast the surprise's gradient would run in half precision. The memory
therefore keeps float32 buffers when the model is cast to half, and its updates and retrievals
run with autocast off and float32 as the default dtype.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from titans_lightning.cli import TitansCLI
from titans_lightning.memory import NeuralMemory, full_precision
from titans_lightning.model import MACTitan

HALF = (torch.float16, torch.bfloat16)


def chunk(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 12, 8, generator=torch.Generator().manual_seed(seed))


def updated(memory: NeuralMemory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    surprise = memory.update(x)
    return surprise, memory.fast_weights.clone()


@pytest.mark.parametrize("strategy", ["titans_default", "meta_nlms"])
@pytest.mark.parametrize("half", HALF)
def test_an_update_under_autocast_equals_the_float32_update(strategy, half):
    torch.manual_seed(0)
    plain = NeuralMemory(8, 16, strategy=strategy)
    mixed = NeuralMemory(8, 16, strategy=strategy)
    mixed.load_state_dict(plain.state_dict())
    x = chunk()
    want = updated(plain, x)
    with torch.autocast("cpu", dtype=half):
        got = updated(mixed, x)
        query = mixed.retrieve(x)
    for w, g in zip(want, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert query.dtype == torch.float32  # retrieve answers in the dtype of its queries
    torch.testing.assert_close(query, plain.retrieve(x), rtol=0, atol=0)


@pytest.mark.parametrize("half", HALF)
def test_a_model_cast_to_half_keeps_a_float32_memory_that_still_retains(half):
    torch.manual_seed(0)
    model = MACTitan(context_window=4, dim_feedforward=8)
    before = {k: v.clone() for k, v in model.memories[0].state_dict().items()}
    model = model.to(half)
    assert model.emb.weight.dtype == half  # the outer model is half ...
    for memory in model.memories:  # ... the memory is not
        assert {t.dtype for t in (*memory.buffers(), *memory.parameters())
                if t.is_floating_point()} == {torch.float32}
    memory = model.memories[0]
    for name, value in memory.state_dict().items():  # not rounded through half and back
        assert torch.equal(value, before[name]), name
    reference = NeuralMemory(16, 32)  # the same memory, never cast
    reference.load_state_dict(memory.state_dict())
    x = torch.randn(1, 4, 16).to(half)
    default = torch.get_default_dtype()
    torch.set_default_dtype(half)  # as Lightning's *-true precision does around the forward
    try:
        memory.update(x)
        answer = memory.retrieve(x)
    finally:
        torch.set_default_dtype(default)
    reference.update(x.float())
    assert answer.dtype == half
    assert memory.fast_weights.dtype == torch.float32
    torch.testing.assert_close(memory.fast_weights, reference.fast_weights, rtol=0, atol=0)
    # what a bfloat16 memory would lose: its retention (alpha = 1e-3) rounds away
    w = reference.initial_weights.to(torch.bfloat16)
    assert torch.equal(w * (1 - 1e-3), w) and not torch.equal(reference.fast_weights,
                                                               reference.initial_weights)
    preds, _ = model(torch.randn(2, 12, 1, dtype=half))
    assert preds.dtype == half and torch.isfinite(preds).all()


def test_full_precision_restores_what_it_changed():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with full_precision("cpu"):
                assert torch.get_default_dtype() == torch.float32
                assert not torch.is_autocast_enabled("cpu")
            assert torch.is_autocast_enabled("cpu")
        assert torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(default)
    with full_precision("cpu"):  # nothing to change: nothing changes
        assert torch.get_default_dtype() == default

@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("strategy", ["titans_default", "meta_nlms"])
def test_a_fit_in_half_precision_learns_with_a_float32_memory(tiny_sinwave, in_tmp, precision,
                                                              strategy):
    args = ["fit", *tiny_sinwave, "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.precision", precision,
            "--model.strategy", strategy]
    if strategy == "meta_nlms":  # differentiable: the outer gradient flows through the updates
        args += ["--model.memory_scope", "per_sequence"]
    cli = TitansCLI(args)
    result = json.loads((Path(cli.trainer.log_dir) / "result.json").read_text())
    assert result["status"] == "ok"
    assert math.isfinite(result["val_mse"]) and math.isfinite(result["test_mse"])
    assert result["memory_updates"]["fit"]["skipped_slots"] == 0
    for memory in cli.model.model.memories:
        assert memory.fast_weights.dtype == torch.float32
        assert memory.num_updates > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all()
               for p in cli.model.parameters())


def test_float16_weights_are_refused_naming_what_works(tiny_sinwave, in_tmp):
    with pytest.raises(ValueError, match="16-true is not supported: with float16 weights, Adam"):
        TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1",
                   "--trainer.precision", "16-true"])
    assert not list(in_tmp.glob("logs/**/*.ckpt"))
