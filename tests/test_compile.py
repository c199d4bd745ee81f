"""``--model.compile encoder``: the encoder layers run through torch.compile (inductor) and the
model computes what it computes eagerly; its state dict keeps its keys.

Inductor compiles a training step's graphs and an evaluation's in about 20 s of CPU time (a few
minutes of wall time on a busy 2-core machine); ``-k "not compile"`` leaves these tests out.
"""
from __future__ import annotations

import io
import os
import shutil
import warnings

import pytest
import torch

from titans_lightning.encoder import EncoderLayer
from titans_lightning.module import TitansForecaster, forecast_loss

C = 4
# Compiled and eager float32 results differ only where inductor's generated code sums in
# another order (the bias gradients, the fused residual additions): a few units in the last
# place (measured on the CPU: predictions identical, gradients within 8e-7 relative). A wrong
# graph differs by orders of magnitude more. On CUDA the fused layer norms reduce in another
# order too, and four window groups of memory updates carry those differences on.
TOLERANCE = {"cpu": {"rtol": 1e-5, "atol": 1e-6}, "cuda": {"rtol": 1e-4, "atol": 1e-5}}

needs_a_compiler = pytest.mark.skipif(
    not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
         or shutil.which("clang++")), reason="inductor needs a C++ compiler on the CPU")
DEVICES = [pytest.param("cpu", marks=needs_a_compiler),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device"))]


def forecaster(compile: str) -> TitansForecaster:
    torch.manual_seed(0)
    return TitansForecaster(context_window=C, dim_feedforward=32, dropout=0.0, compile=compile)


def sequences(device: str) -> torch.Tensor:
    """(2, 19, 1): 16 windows, four full groups of C, so one shape reaches the encoder."""
    noise = torch.randn(2, 19, 1, generator=torch.Generator().manual_seed(1))
    return (torch.sin(torch.linspace(0, 6, 19))[None, :, None] + 0.1 * noise).to(device)


def training_step_and_evaluation(module: TitansForecaster, batch: torch.Tensor) -> dict:
    """Predictions, loss and gradients of a training step, then an evaluation's predictions
    (eval mode, no outer gradient; the memory still learns), and the memory after both."""
    preds, _ = module.run_model({"inputs": batch})  # (B, T, 1)
    loss = forecast_loss(preds, batch, C - 1)
    loss.backward()
    module.eval()
    with torch.no_grad():
        evaluated, _ = module.run_model({"inputs": batch})
    return {"preds": preds.detach(), "loss": loss.detach(), "evaluated": evaluated,
            "grads": {n: p.grad for n, p in module.named_parameters()},
            "buffers": {n: b.clone() for n, b in module.model.named_buffers()}}


@pytest.fixture(scope="module", params=DEVICES)
def runs(request):
    """(device, eager results, compiled results, the compiled module after its runs). The
    compiled module compiles its encoder layers twice: training, then evaluation."""
    device = request.param
    eager, compiled = forecaster("none").to(device), forecaster("encoder").to(device)
    compiled.load_state_dict(eager.state_dict())
    batch = sequences(device)
    torch._dynamo.reset()
    # one process compiles: a pool of workers costs more than it saves on a small machine
    with torch._inductor.config.patch(compile_threads=1), warnings.catch_warnings():
        # dynamo meeting the CPU kernels: the graph breaks that compile_encoders describes
        warnings.filterwarnings("ignore", message=".*Dynamo does not know how to trace.*")
        warnings.filterwarnings("ignore", message=".*lru_cache.*")
        results = training_step_and_evaluation(eager, batch), \
            training_step_and_evaluation(compiled, batch)
    yield device, *results, compiled
    torch._dynamo.reset()


def test_the_compiled_encoder_trains_and_evaluates_as_the_eager_one(runs):
    device, eager, compiled, _ = runs
    tolerance = TOLERANCE[device]
    for key in ("preds", "loss", "evaluated"):
        torch.testing.assert_close(compiled[key], eager[key], **tolerance, msg=key)
    assert eager["grads"].keys() == compiled["grads"].keys()
    for name, grad in eager["grads"].items():
        assert grad is not None, name  # every parameter takes part in the step
        torch.testing.assert_close(compiled["grads"][name], grad, **tolerance, msg=name)
    for name, buffer in eager["buffers"].items():  # the memory learned the same
        torch.testing.assert_close(compiled["buffers"][name], buffer, **tolerance, msg=name)


def test_the_encoder_layers_were_compiled(runs):
    *_, compiled = runs
    layers = [m for m in compiled.modules() if isinstance(m, EncoderLayer)]
    assert len(layers) == compiled.hparams.num_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert compiled.hparams.compile == "encoder"  # recorded with the other settings


def test_a_state_dict_saved_with_compile_loads_without_it(runs):
    device, _, _, compiled = runs
    saved = io.BytesIO()
    torch.save(compiled.state_dict(), saved)
    saved.seek(0)
    eager = forecaster("none")
    assert list(eager.state_dict()) == list(compiled.state_dict())  # no _orig_mod. prefix
    eager.load_state_dict(torch.load(saved, map_location="cpu"))  # strict
    for name, value in compiled.state_dict().items():
        torch.testing.assert_close(eager.state_dict()[name], value.cpu(), rtol=0, atol=0)


def test_an_unknown_compile_target_is_rejected():
    with pytest.raises(ValueError, match="compile must be one of"):
        forecaster("everything")
