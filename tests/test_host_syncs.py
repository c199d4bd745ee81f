"""A training step reads nothing back to the host: no ``.item()``, ``bool(tensor)``, ``.tolist()``
per memory update. On a GPU each such read waits for the device, once per window group and layer.

Counted on the CPU by wrapping the Tensor methods that copy a value to the host, during the
forward, the loss and the backward of one training batch, on PyTorch's operators (float64, no
kernel). Each read is charged to the innermost function of the package that made it. The CPU's
own feed-forward and dropout (``kernels.reference``: ``_chunks``, ``drop_positions``,
``_draw_together``) cut rows and draw positions on the host, which costs nothing there; a GPU
never runs them (it takes ``F.dropout`` and one matrix product). Everything else may not read.
The documented exception: a ``DIFFERENTIABLE`` rule while training reads once per update
whether a slot was skipped.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from titans_lightning.module import TitansForecaster, forecast_loss

READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
PACKAGE = Path(__import__("titans_lightning").__file__).parent
CPU_ONLY = {("reference.py", name) for name in ("_chunks", "drop_positions", "_draw_together")}


def reader() -> tuple[str, str]:
    """(file, function) of the innermost frame of the package on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if PACKAGE in path.parents:
            return path.name, frame.f_code.co_name
        frame = frame.f_back
    return "outside the package", ""


@contextlib.contextmanager
def counted_host_reads(monkeypatch: pytest.MonkeyPatch):
    counts: Counter[tuple[str, str, str]] = Counter()

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            counts[(name, *reader())] += 1
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, counting(name))
        yield counts


def training_batch(module: TitansForecaster, batch: torch.Tensor) -> None:
    preds, _ = module.run_model({"inputs": batch})
    loss = forecast_loss(preds, batch, module.hparams.context_window - 1)
    module.note_nonfinite(loss)
    loss.backward()


@pytest.mark.parametrize("strategy,scope", [("titans_default", "shared"),
                                            ("titans_default", "per_sequence"),
                                            ("adam_gated", "shared")])
def test_a_training_batch_reads_nothing_back_to_the_host(monkeypatch, strategy, scope):
    torch.manual_seed(0)
    module = TitansForecaster(strategy=strategy, memory_scope=scope, context_window=4,
                              dim_feedforward=16, dropout=0.0).double().train()
    batch = torch.randn(2, 20, 1, dtype=torch.float64)
    training_batch(module, batch)  # the first batch may build things (kernels, per-slot state)
    with counted_host_reads(monkeypatch) as counts:
        training_batch(module, batch)
    assert sum(m.num_updates for m in module.model.memories) == 2 * 2 * 5  # it did update
    reads = {key: n for key, n in counts.items() if tuple(key[1:]) not in CPU_ONLY}
    assert not reads, f"host reads in a training batch: {reads}"


def test_the_count_sees_a_read(monkeypatch):
    """The wrapper catches what it must: a differentiable rule reads once per update."""
    torch.manual_seed(0)
    module = TitansForecaster(strategy="meta_nlms", memory_scope="per_sequence",
                              context_window=4, dim_feedforward=16, dropout=0.0).double().train()
    batch = torch.randn(2, 20, 1, dtype=torch.float64)
    training_batch(module, batch)
    with counted_host_reads(monkeypatch) as counts:
        training_batch(module, batch)
    reads = {key: n for key, n in counts.items() if tuple(key[1:]) not in CPU_ONLY}
    assert reads == {("__bool__", "memory_update.py", "update_memory"): 2 * 5}  # layers x updates
