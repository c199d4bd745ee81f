"""MemoryProfile: the memory's dynamics within a sequence, over the position in it.

Shape legend
    U  memory updates per sequence (update u stores window group u, so u is time in the sequence)
    S  memory slots of a batch (1 for the shared memory, one per sequence for per-sequence memory)
    K  statistics drawn: surprise, gate rate, update norm
    N  values at one update in one epoch (slots over all batches; over all ranks for
       per-sequence training, whose ranks hold different slots)
    k  sequences drawn one by one     W  processes (ranks)

The epoch averages (:mod:`callbacks.memory_statistics`) mix the first update of a sequence with
its last. This callback keeps each batch's ``{stat: (U, S)}`` as it is, on the device, and at the
epoch's end reduces it over the slots, per update: the mean and the 10-90% band. With
per-sequence memory a slot is one sequence, so a few fixed sequences are also drawn one by one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from .forecast_figure import figure_class
from .memory_statistics import SPLITS, MemoryCallback, differs_across_ranks, gather_columns
from .tensorboard import epoch_step

STATS = ("surprise", "gate_rate", "update_norm")
LABELS = {"surprise": "surprise", "gate_rate": "gate rate", "update_norm": "update norm"}
BAND = (0.1, 0.9)  # the quantiles drawn around the mean; tags p10, p90


def figure_tag(layer: int, split: str) -> str:
    return f"memory/layer{layer}/profile/{split}"


def scalar_tag(layer: int, stat: str, split: str, series: str) -> str:
    """``series`` is ``mean``, ``p10`` or ``p90``; the step of these scalars is the update u."""
    return f"memory/layer{layer}/profile/{stat}/{split}/{series}"


def pad_updates(values: Tensor, updates: int, fill: float) -> Tensor:
    """Pad the update dimension (the last) of ``(..., u)`` values to ``updates``."""
    return F.pad(values, (0, updates - values.shape[-1]), value=fill)


@dataclass
class Profile:
    """One layer's epoch, on the CPU: per statistic (K) and update (U)."""

    mean: Tensor  # (K, U)
    low: Tensor  # (K, U): the 10% quantile
    high: Tensor  # (K, U): the 90% quantile
    count: Tensor  # (K, U): finite values at each update
    sequences: dict[int, Tensor]  # sequence index -> (K, U), for the sequences seen


class EpochProfile:
    """One split's per-update values over an epoch, per layer, kept on the device."""

    def __init__(self, sequences: Sequence[int]):
        self.sequences = list(sequences)
        self.batches: dict[int, list[Tensor]] = {}  # per layer: (K, S, U) per batch
        self.picked: dict[int, list[tuple[Tensor, Tensor]]] = {}  # (k, K, U) sums, (k, U) counts
        self._wanted: Tensor | None = None  # (k,): the sequences, on the batches' device

    def clear(self) -> None:
        self.batches.clear()
        self.picked.clear()

    def add(self, memory_stats: Sequence[dict[str, Tensor]], index: Tensor | None) -> None:
        """Keep one batch's ``[{stat: (U, S)}]``; ``index`` (S,) names the sequence in each slot
        (per-sequence memory only, else None)."""
        for layer, stats in enumerate(memory_stats):
            if not stats:
                continue
            kept = torch.stack([stats[name].detach().T for name in STATS])  # (K, S, U)
            self.batches.setdefault(layer, []).append(kept)
            if index is None or not self.sequences or index.numel() != kept.shape[1]:
                continue
            if self._wanted is None or self._wanted.device != index.device:  # copied once
                self._wanted = torch.as_tensor(self.sequences, device=index.device)  # (k,)
            match = index[None, :] == self._wanted[:, None]  # (k, S)
            # where, not a product: a NaN in another sequence must not reach the chosen ones
            sums = torch.where(match[:, None, :, None], kept[None], 0.0).sum(2)  # (k, K, U)
            counts = match.sum(1, keepdim=True).expand(-1, kept.shape[2])  # (k, U)
            self.picked.setdefault(layer, []).append((sums, counts))

    def reduce(self, pl_module: L.LightningModule, n_layers: int,
               across_ranks: bool) -> list[Profile | None]:
        """The epoch's profile per layer (None for a layer without updates), then clears. Every
        rank calls it; ``across_ranks`` gathers the ranks' slots."""
        profiles = [self.reduce_layer(pl_module, layer, across_ranks) for layer in range(n_layers)]
        self.clear()
        return profiles

    def reduce_layer(self, pl_module: L.LightningModule, layer: int,
                     across_ranks: bool) -> Profile | None:
        parts, device = self.batches.get(layer, []), pl_module.device
        updates = max((p.shape[2] for p in parts), default=0)
        if across_ranks:  # one host synchronisation per epoch and layer
            updates = int(pl_module.all_gather(torch.tensor(updates, device=device)).max())
        if updates == 0:
            return None
        values = torch.cat([pad_updates(p, updates, float("nan")) for p in parts], dim=1) \
            if parts else torch.empty(len(STATS), 0, updates, device=device)  # (K, n, U)
        if across_ranks:
            columns = gather_columns(pl_module, values.transpose(1, 2).reshape(-1, values.shape[1]))
            values = columns.reshape(len(STATS), updates, -1).transpose(1, 2)  # (K, N, U)
        values = torch.where(torch.isfinite(values), values, float("nan"))  # non-finite: left out
        band = torch.nanquantile(values, torch.tensor(BAND, dtype=values.dtype, device=device),
                                 dim=1)  # (2, K, U)
        sums, counts = self.picked_sums(layer, updates, values)
        if across_ranks:
            sums, counts = pl_module.all_gather(sums).sum(0), pl_module.all_gather(counts).sum(0)
        picked = (sums / counts[:, None, :]).cpu()  # (k, K, U): NaN where not seen
        seen = (counts > 0).any(1).tolist()
        return Profile(mean=values.nanmean(1).cpu(), low=band[0].cpu(), high=band[1].cpu(),
                       count=torch.isfinite(values).sum(1).cpu(),
                       sequences={s: picked[j] for j, s in enumerate(self.sequences) if seen[j]})

    def picked_sums(self, layer: int, updates: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The chosen sequences' values summed over their copies, (k, K, U), and the copies
        seen at each update, (k, U)."""
        k = len(self.sequences)
        sums = like.new_zeros(k, len(STATS), updates)
        counts = torch.zeros(k, updates, dtype=torch.long, device=like.device)
        for part_sums, part_counts in self.picked.get(layer, []):
            sums += pad_updates(part_sums, updates, 0.0)
            counts += pad_updates(part_counts, updates, 0)
        return sums, counts


class MemoryProfile(MemoryCallback):
    """Per memory layer and split, the surprise, gate rate and update norm over the position in
    the sequence (the update index u: update u stores window group u).

    - A figure every epoch, ``memory/layer{i}/profile/{split}``: the mean over the epoch's
      slots at each update, with the band between the 10% and 90% quantiles; with per-sequence
      memory also the chosen ``sequences``, one line each (needs matplotlib).
    - The profile as scalars whose step is the update u, ``memory/layer{i}/profile/{stat}/
      {split}/{mean,p10,p90}``, through every logger of the run (so two runs share a chart):
      a test's (or a validate's) at its end, and a fit's training and validation profiles of
      the last epoch at the fit's end.

    Args:
        sequences: indices in each split of sequences drawn one by one (per-sequence memory
            only; shared memory has one slot for the whole batch). Empty: none.
    """

    MEDIA = "within-sequence figures"

    def __init__(self, sequences: Sequence[int] = (0, 1, 2)):
        super().__init__()
        if any(s < 0 for s in sequences):
            raise ValueError(f"sequences must be non-negative indices, got {list(sequences)}")
        self.sequences = list(sequences)
        self.values = {split: EpochProfile(self.sequences) for split in SPLITS}
        self.latest: dict[str, list[Profile | None]] = {}  # a fit's last epoch, per split
        self.draws = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.draws = self.tensorboard and figure_class() is not None
        if self.tensorboard and not self.draws:
            self.warn_once("MemoryProfile needs matplotlib for its figures (pip install "
                           "'titans-lightning[plots]'): only the profile's scalars are logged")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.latest.clear()

    def start(self, split: str) -> None:
        self.values[split].clear()

    def collect(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule,
                batch: Any) -> None:
        per_sequence = getattr(pl_module.hparams, "memory_scope", "shared") == "per_sequence"
        index = batch.get("index") if per_sequence and isinstance(batch, dict) else None
        self.values[split].add(getattr(pl_module, "memory_stats", []), index)

    def write(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        profiles = self.values[split].reduce(pl_module, len(pl_module.model.memories),
                                             differs_across_ranks(split, pl_module))
        if not trainer.is_global_zero:
            return
        if trainer.state.fn == TrainerFn.FITTING:  # logged once, at the fit's end
            self.latest[split] = profiles
        else:
            self.log_scalars(trainer, split, profiles)
        if self.draws:
            writer, step = self.writer(trainer), epoch_step(trainer, pl_module)
            for layer, profile in enumerate(profiles):
                if profile is not None:
                    writer.add_figure(figure_tag(layer, split), self.draw(profile, layer, split),
                                      step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for split, profiles in self.latest.items():
            self.log_scalars(trainer, split, profiles)
        self.latest.clear()

    def log_scalars(self, trainer: L.Trainer, split: str,
                    profiles: list[Profile | None]) -> None:
        """The profiles as scalars at steps u = 0..U-1, to every logger (rank 0 only)."""
        rows: dict[int, dict[str, float]] = {}
        for layer, profile in enumerate(profiles):
            if profile is None:
                continue
            for j, stat in enumerate(STATS):
                for series, line in (("mean", profile.mean), ("p10", profile.low),
                                     ("p90", profile.high)):
                    for u, value in enumerate(line[j].tolist()):
                        if value == value:  # not NaN: no finite value at that update
                            rows.setdefault(u, {})[scalar_tag(layer, stat, split, series)] = value
        for logger in trainer.loggers:
            for u in sorted(rows):
                logger.log_metrics(rows[u], step=u)
            logger.save()

    def draw(self, profile: Profile, layer: int, split: str) -> Any:
        """One panel per statistic against the update index: band, mean, chosen sequences."""
        updates = profile.mean.shape[1]
        u = torch.arange(updates).numpy()
        figure = figure_class()(figsize=(8, 2.0 * len(STATS)), layout="constrained")
        axes = figure.subplots(len(STATS), 1, sharex=True, squeeze=False)[:, 0]
        for j, (ax, stat) in enumerate(zip(axes, STATS)):
            ax.fill_between(u, profile.low[j].numpy(), profile.high[j].numpy(), alpha=0.3,
                            linewidth=0, label="10-90%")
            ax.plot(u, profile.mean[j].numpy(), linewidth=1.5, label="mean")
            for sequence, values in profile.sequences.items():
                ax.plot(u, values[j].numpy(), linewidth=0.8, label=f"sequence {sequence}")
            ax.set_ylabel(LABELS[stat], fontsize=9)
        most = int(profile.count.max())
        axes[0].set_title(f"memory layer {layer}, {split}: over the sequence "
                          f"(up to {most} values per update)", fontsize=9)
        axes[0].legend(loc="upper right", fontsize=7)
        axes[-1].set_xlabel("memory update u in the sequence (window group)")
        return figure
