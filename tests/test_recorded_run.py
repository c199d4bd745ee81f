"""A seeded short training run whose losses match recorded values: a change that alters the
numerics (a refactor of the model, the memory or a rule) fails here, loudly.

Double precision, so the run takes PyTorch's operators (the CPU kernels are float32-only) and
gives the same numbers on any machine. If a change is meant to alter the numerics, say so in
its commit and record the new values.
"""
import pytest
import torch

from datamodules.sinwave import make_sinwave_splits
from titans_lightning import MACTitan
from titans_lightning.module import forecast_loss

RECORDED = {  # four training losses, then the validation MSE after them
    ("titans_default", "shared"): [0.42907910545507877, 0.3985859367937841, 0.3696704922691326,
                                   0.3251769781904649, 0.255522204953304],
    ("meta_nlms", "per_sequence"): [0.41288636468610346, 0.3925452694773664, 0.3582491652783364,
                                    0.31630309598878253, 0.23720676882353628],
}


def short_run(strategy: str, scope: str) -> list[float]:
    torch.manual_seed(0)
    model = MACTitan(context_window=4, dim_feedforward=32, strategy=strategy,
                     memory_scope=scope).double()
    splits = make_sinwave_splits(20, 40, seed=0)
    train = torch.as_tensor(splits["train"], dtype=torch.double)  # (16, 40, 1)
    valid = torch.as_tensor(splits["valid"], dtype=torch.double)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(4):
        batch = train[4 * step:4 * step + 4]
        preds, _ = model(batch)
        loss = forecast_loss(preds, batch, first=3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        preds, _ = model(valid)
    return losses + [forecast_loss(preds, valid, first=3).item()]


@pytest.mark.parametrize("strategy, scope", list(RECORDED))
def test_a_short_run_matches_its_recorded_losses(strategy, scope):
    assert short_run(strategy, scope) == pytest.approx(RECORDED[strategy, scope], rel=1e-9)
