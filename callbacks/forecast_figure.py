"""ForecastFigure: prediction against target over time for a few fixed validation sequences.

Shape legend
    B  sequences in the batch     T  time steps per sequence     k  sequences drawn
    W  processes (ranks)

The module does not return its predictions from ``validation_step``; a forward hook on
``pl_module.model`` keeps the latest ``(preds (B, T, O), valid (T,))`` it returned, so nothing is
computed twice. ``preds[:, t]`` forecasts ``targets[:, t+1]`` for valid t; the first output
channel is drawn. The chosen sequences are picked out of each batch on the device (no host
synchronisation per batch) and drawn once per validation epoch.
"""
from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor

from .tensorboard import TensorBoardCallback, epoch_step

TAG = "forecast/val"


def figure_class() -> type | None:
    """matplotlib's ``Figure`` (no pyplot state, no display needed), or None if not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


class ForecastFigure(TensorBoardCallback):
    """Logs a figure (tag ``forecast/val``) of prediction and target over time for fixed
    validation sequences, every validation epoch. Needs matplotlib (the ``plots`` extra);
    without it the callback warns once and does nothing.

    Args:
        sequences: indices in the validation split of the sequences to draw; one panel each.
        max_steps: draw only the first this many time steps (None: all).
    """

    MEDIA = "forecast figures"

    def __init__(self, sequences: Sequence[int] = (0, 1, 2), max_steps: int | None = None):
        super().__init__()
        if not sequences or min(sequences) < 0:
            raise ValueError(f"sequences must be non-negative indices, got {list(sequences)}")
        if max_steps is not None and max_steps < 2:
            raise ValueError(f"max_steps must be >= 2 or None, got {max_steps}")
        self.sequences, self.max_steps = list(sequences), max_steps
        self.enabled = False  # a TensorBoard writer and matplotlib
        self._hook: Any = None
        self._latest: tuple[Tensor, Tensor] | None = None
        self._sums: Tensor | None = None  # (k, 2, T): prediction and target, summed over copies
        self._counts: Tensor | None = None  # (k,): copies seen (DDP may repeat a sequence)
        self._valid: Tensor | None = None  # (T,)
        self._wanted: Tensor | None = None  # (k,): the sequences, on the batches' device

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.enabled = self.tensorboard
        if self.enabled and figure_class() is None:
            self.enabled = False
            self.warn_once("ForecastFigure needs matplotlib (pip install 'titans-lightning[plots]'):"
                           " no forecast figures are logged")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_watching()

    # -- collecting ----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and not trainer.sanity_checking:
            self._sums = self._counts = self._valid = None
            self._stop_watching()
            self._hook = pl_module.model.register_forward_hook(self._keep_output)

    def _keep_output(self, module: Any, inputs: Any, output: tuple[Tensor, Tensor]) -> None:
        self._latest = output

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._hook is None or self._latest is None:
            return
        (preds, valid), self._latest = self._latest, None
        self.add(batch["index"], preds.detach(), batch["targets"], valid)

    def add(self, index: Tensor, preds: Tensor, targets: Tensor, valid: Tensor) -> None:
        """Keep the chosen sequences of one batch: ``index`` (B,), ``preds``/``targets`` (B, T, O)."""
        if self._sums is None:  # the epoch's first batch
            k, T = len(self.sequences), preds.shape[1]
            self._wanted = torch.as_tensor(self.sequences, device=index.device)  # (k,)
            self._sums = preds.new_zeros(k, 2, T)
            self._counts = torch.zeros(k, dtype=torch.long, device=index.device)
            self._valid = valid
        match = index[None, :] == self._wanted[:, None]  # (k, B)
        series = torch.stack([preds[..., 0], targets[..., 0].to(preds.dtype)], dim=1)  # (B, 2, T)
        # where, not a product: a NaN in another sequence must not reach the chosen ones
        self._sums += torch.where(match[:, :, None, None], series, 0.0).sum(1)  # (k, 2, T)
        self._counts += match.sum(1)

    def _stop_watching(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._latest = None, None

    # -- drawing -------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is None:
            return
        self._stop_watching()
        if self._sums is None:
            return
        sums, counts = self._sums, self._counts
        if trainer.world_size > 1:
            sums, counts = pl_module.all_gather(sums).sum(0), pl_module.all_gather(counts).sum(0)
        if not trainer.is_global_zero:
            return
        counts = counts.tolist()
        missing = [s for s, n in zip(self.sequences, counts) if n == 0]
        if missing:
            self.warn_once(f"ForecastFigure: validation sequences {missing} were not seen "
                           "(indices beyond the split, or batches limited)")
        figure = self.draw(sums.float().cpu(), counts, self._valid.cpu())
        if figure is not None:
            self.writer(trainer).add_figure(TAG, figure, epoch_step(trainer, pl_module))

    def draw(self, sums: Tensor, counts: list[int], valid: Tensor) -> Any:
        """One panel per seen sequence: the target at every step, the prediction made at t
        drawn at t+1 (the step it forecasts). None when no chosen sequence was seen."""
        shown = [(s, sums[j] / n) for j, (s, n) in enumerate(zip(self.sequences, counts)) if n]
        if not shown:
            return None
        T = valid.numel()
        steps = T if self.max_steps is None else min(T, self.max_steps)
        time = torch.arange(T)
        forecast_time = time[1:][valid[:-1]]  # (n,): steps that have a prediction
        drawn = forecast_time < steps
        figure = figure_class()(figsize=(8, 2.2 * len(shown)), layout="constrained")
        axes = figure.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (sequence, (pred, target)) in zip(axes, shown):
            ax.plot(time[:steps], target[:steps], label="target", linewidth=1)
            ax.plot(forecast_time[drawn], pred[:-1][valid[:-1]][drawn], label="prediction",
                    linewidth=1)
            ax.set_title(f"validation sequence {sequence}", fontsize=9)
        axes[0].legend(loc="upper right", fontsize=8)
        axes[-1].set_xlabel("time step")
        return figure
