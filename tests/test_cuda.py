"""On a GPU: the model runs PyTorch's operators there, agrees with the CPU, fits in float32 and
in bf16-mixed, and a training batch never waits for the device. Skipped without CUDA."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from titans_lightning.cli import TitansCLI
from titans_lightning.module import TitansForecaster, forecast_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def module(strategy: str = "titans_default", scope: str = "shared", **kw) -> TitansForecaster:
    torch.manual_seed(0)
    return TitansForecaster(strategy=strategy, memory_scope=scope, context_window=4,
                            dim_feedforward=16, **kw)


def batch_loss(model: TitansForecaster, batch: torch.Tensor) -> torch.Tensor:
    preds, _ = model.run_model({"inputs": batch})
    return forecast_loss(preds, batch, model.hparams.context_window - 1)


@pytest.mark.parametrize("strategy,scope", [("titans_default", "shared"),
                                            ("meta_nlms", "per_sequence")])
def test_cuda_agrees_with_the_cpu_in_double_precision(strategy, scope):
    cpu = module(strategy, scope, dropout=0.0).double()
    gpu = module(strategy, scope, dropout=0.0).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    batch = torch.randn(2, 20, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second batch starts from the memory the first one left
        want, got = batch_loss(cpu, batch), batch_loss(gpu, batch.cuda())
        want.backward(), got.backward()
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-7, atol=1e-10, msg=name)
    for a, b in zip(cpu.model.memories, gpu.model.memories):
        assert b.fast_weights.is_cuda
        torch.testing.assert_close(b.fast_weights.cpu(), a.fast_weights, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy,scope", [("titans_default", "shared"),
                                            ("titans_default", "per_sequence"),
                                            ("adam_gated", "shared")])
def test_a_training_batch_never_waits_for_the_gpu(strategy, scope):
    model = module(strategy, scope).cuda().train()
    batch = torch.randn(2, 20, 1, device="cuda")
    batch_loss(model, batch).backward()  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = batch_loss(model, batch)
        model.note_nonfinite(loss)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_tiny_fit_on_the_gpu(tiny_sinwave, in_tmp, precision):
    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "2", "--trainer.accelerator", "gpu",
                     "--trainer.devices", "1", "--trainer.precision", precision])
    result = json.loads((Path(cli.trainer.log_dir) / "result.json").read_text())
    assert result["status"] == "ok" and math.isfinite(result["test_mse"])
    assert "cuda" in result["device"].lower() or "nvidia" in result["device"].lower()
    for memory in cli.model.model.memories:
        assert memory.fast_weights.is_cuda and memory.fast_weights.dtype == torch.float32
