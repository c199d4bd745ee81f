"""What each memory update did, kept as device tensors and turned into statistics only on demand.

Shape legend
    U  updates since the log was last read      S  memory slots      n  weights per slot

Recording an update stores references to tensors the update made anyway (no copy, no host
synchronisation); :meth:`UpdateLog.pop` computes the statistics of all of a forward's updates at
once, when a callback asks.
"""
from __future__ import annotations

import torch
from torch import Tensor

STAT_NAMES = ("surprise", "grad_norm", "update_norm", "weight_norm", "gate_rate", "skipped")


class UpdateLog:
    """Per-update records: the surprise (S,), gradients, old and kept weights (S, n), which slots
    were finite (``ok``, S) and the gate the rule reported (None: it applied all of its step)."""

    def __init__(self):
        self.entries: list[dict[str, Tensor | None]] = []

    def record(self, surprise: Tensor, grads: Tensor, old: Tensor, new: Tensor, ok: Tensor,
               gate: Tensor | None) -> None:
        self.entries.append({"surprise": surprise.detach(), "grads": grads.detach(),
                             "old": old.detach(), "new": new.detach(), "ok": ok,
                             "gate": None if gate is None else gate.detach()})

    def pop(self) -> dict[str, Tensor]:
        """Statistics of the updates recorded since the last call, ``{name: (U, S)}`` for each of
        :data:`STAT_NAMES`, and clear the log (``{}`` when nothing was recorded)."""
        entries, self.entries = self.entries, []
        if not entries:
            return {}
        with torch.no_grad():
            surprise = torch.stack([e["surprise"] for e in entries])  # (U, S)
            new = torch.stack([e["new"] for e in entries])  # (U, S, n)
            skipped = ~torch.stack([e["ok"] for e in entries])  # (U, S)
            ones = surprise.new_ones(())  # ungated updates apply all of their step
            gate = torch.stack([(ones if e["gate"] is None else e["gate"].to(surprise.dtype))
                                .expand_as(e["surprise"]) for e in entries])
            return {
                "surprise": surprise,
                "grad_norm": torch.stack([e["grads"] for e in entries]).norm(dim=-1),
                "update_norm": (new - torch.stack([e["old"] for e in entries])).norm(dim=-1),
                "weight_norm": new.norm(dim=-1),
                "gate_rate": gate.masked_fill(skipped, 0.0),
                "skipped": skipped.to(surprise.dtype),
            }
