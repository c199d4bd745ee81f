"""MACTitan: the Memory-as-Context Titans model (Behrouz et al., 2024, Sec. 4.1) for forecasting.

Shape legend
    B  sequences in the batch          T  time steps per sequence
    C  context window (tokens per window)   G  windows in one group (<= C)
    N  windows in one model call (B * G)    P  persistent-memory tokens
    d  hidden width (16)               S  memory slots (1 shared, or B per-sequence)

A sequence is cut into one window per end position t >= C-1. Windows are processed in groups
of C consecutive end positions, in time order, so each layer's memory is updated once per
group, after it has seen the earlier groups only (causal), as in the reference
implementation whose seed table the benchmarks reproduce.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .encoder import EncoderLayer
from .memory import NeuralMemory
from .strategy import load_strategy

SCOPES = ("shared", "per_sequence")
ORDERS = ("reference", "causal")


def check_arguments(**v: Any) -> None:
    """Refuse an impossible setting before anything is built, in one line that names it as the
    CLI spells it (``--model.<name>``), its value and what is allowed.

    Left to the layers, these surface as torch errors that name neither (a negative size in
    ``randn``, a division by zero in an initialiser), or not at all (a zero-width layer trains).
    """
    d = v["hidden_dim"]
    divisors = _divisors(d)
    rules = (  # in order: the first broken one is reported
        ("context_window", v["context_window"] >= 1, "at least 1"),
        ("hidden_dim", d >= 1, "at least 1"),
        ("nhead", v["nhead"] in divisors, f"a divisor of --model.hidden_dim={d}: {divisors}"),
        ("pm_len", v["pm_len"] >= 0, "at least 0 (0: no persistent-memory tokens)"),
        ("num_layers", v["num_layers"] >= 1, "at least 1"),
        ("memory_layers", v["memory_layers"] in (1, 2), "1 or 2"),
        ("memory_hidden", v["memory_hidden"] >= 1, "at least 1"),
        ("dim_feedforward", v["dim_feedforward"] >= 1, "at least 1"),
        ("memory_scope", v["memory_scope"] in SCOPES, f"one of {SCOPES}"),
        ("mac_order", v["mac_order"] in ORDERS, f"one of {ORDERS}"),
    )
    for name, ok, allowed in rules:
        if not ok:
            raise ValueError(f"--model.{name}={v[name]!r} is not allowed: it must be {allowed}")


def _divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (none for n < 1)."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0] if n >= 1 else []
    return sorted(set(small + [n // k for k in small]))


class MACLayer(nn.Module):
    """One Memory-as-Context block: retrieve, attend over [persistent, memory, input], store."""

    def __init__(self, hidden_dim: int, context_window: int, pm_len: int, memory: NeuralMemory,
                 nhead: int = 2, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.C, self.P = context_window, pm_len
        self.memory = memory
        self.persistent = nn.Parameter(torch.randn(pm_len, hidden_dim))
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.attention = EncoderLayer(hidden_dim, nhead, dim_feedforward, dropout)
        self.project = nn.Linear((pm_len + 2 * context_window) * hidden_dim,
                                 context_window * hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        N, C, d = x.shape  # (N, C, d)
        y = self.retrieve_attend_project(x).reshape(self.memory.n_slots, -1, d)  # (S, N*C/S, d)
        self.memory.update(y)
        z = self.read_memory(y, then_silu=False)  # (S, N*C/S, d), with M'
        return (y * torch.sigmoid(z)).reshape(N, C, d)

    def read_memory(self, x: Tensor, then_silu: bool) -> Tensor:
        """The memory's answer ``M(memory_query(x))`` for rows x (S, R, d)."""
        return self.memory.retrieve(self.memory_query(x, then_silu))

    def memory_query(self, x: Tensor, then_silu: bool) -> Tensor:
        """The memory query ``normalize(Q x)`` (then silu, step 1) of rows x (..., d)."""
        return kernels.mac_query(x, self.query, then_silu)

    def retrieve_attend_project(self, x: Tensor) -> Tensor:
        """Steps 1-4: retrieve with the current memory, attend over [persistent, retrieved,
        input], project -> y (N, C*d)."""
        N, C, d = x.shape
        h = self.read_memory(x.reshape(self.memory.n_slots, -1, d), then_silu=True)
        h = h.reshape(N, C, d)
        ctx = torch.cat([self.persistent.expand(N, -1, -1), h, x], dim=1)  # (N, P+2C, d)
        return self.project(F.silu(self.attention(ctx)).flatten(1))  # (N, C*d)


class CausalMACLayer(MACLayer):
    """MAC block that gates with the memory *before* storing the group (retrieve, then store).

    In the reference order the gate of step 6 uses M', which has already seen every window of
    the group, so a prediction at t can depend on inputs up to t + C - 1 of its own group.
    Gating with M first makes every prediction depend on inputs up to t only.
    """

    def forward(self, x: Tensor) -> Tensor:
        N, C, d = x.shape  # (N, C, d)
        y = self.retrieve_attend_project(x).reshape(self.memory.n_slots, -1, d)  # (S, N*C/S, d)
        z = self.read_memory(y, then_silu=False)  # with M, before storing
        self.memory.update(y)
        return (y * torch.sigmoid(z)).reshape(N, C, d)


class MACTitan(nn.Module):
    """Embedding, MAC layers with residual ``x + silu(layer(x))``, and a linear head.

    ``forward(inputs)`` maps (B, T, input_dim) to predictions (B, T, output_dim) for the target at
    t+1, and a (T,) mask that is False where no full window exists (t < C-1).

    ``mac_order="reference"`` is the published model (causal per window group: the gate uses the
    memory after storing the group); ``"causal"`` gates before storing (causal per step).
    """

    def __init__(self, input_dim: int = 1, output_dim: int = 1, context_window: int = 16,
                 hidden_dim: int = 16, pm_len: int = 4, num_layers: int = 2,
                 memory_layers: int = 2, memory_hidden: int = 32,
                 strategy: Any = "titans_default", strategy_options: dict | None = None,
                 memory_scope: str = "shared", mac_order: str = "reference", nhead: int = 2,
                 dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        check_arguments(context_window=context_window, hidden_dim=hidden_dim, pm_len=pm_len,
                        num_layers=num_layers, memory_layers=memory_layers,
                        memory_hidden=memory_hidden, nhead=nhead,
                        dim_feedforward=dim_feedforward, memory_scope=memory_scope,
                        mac_order=mac_order)
        self.C, self.memory_scope = context_window, memory_scope
        self.emb = nn.Linear(input_dim, hidden_dim)
        layer_class = MACLayer if mac_order == "reference" else CausalMACLayer
        rule = load_strategy(strategy, options=strategy_options)  # resolved and probed once
        self.layers = nn.ModuleList(
            layer_class(hidden_dim, context_window, pm_len,
                        NeuralMemory(hidden_dim, memory_hidden, memory_layers, rule,
                                     strategy_options),
                        nhead, dim_feedforward, dropout)
            for _ in range(num_layers))
        self.head = nn.Linear(context_window * hidden_dim, output_dim)

    @property
    def memories(self) -> list[NeuralMemory]:
        return [layer.memory for layer in self.layers]

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        B, T, _ = inputs.shape
        C = self.C
        if T < C:
            raise ValueError(f"sequences of {T} steps are shorter than the context window {C}")
        for memory in self.memories:
            memory.history.clear()  # statistics describe the latest forward only
            memory.detach_()  # a differentiable rule's graph never spans two forwards
            if self.memory_scope == "per_sequence":
                memory.start_sequences(B)
        x = self.emb(inputs)  # (B, T, d)
        # each group unfolds its own 2C-1 steps: the gradient of a slice of x is x-sized, where
        # that of a slice of all windows would be C times larger (and zero-filled per group)
        preds = [self.forward_group(x[:, g:g + 2 * C - 1].unfold(1, C, 1).transpose(2, 3))
                 for g in range(0, T - C + 1, C)]  # groups of (B, G, C, d) windows
        preds = torch.cat(preds, dim=1)  # (B, T-C+1, out)
        preds = F.pad(preds, (0, 0, C - 1, 0))  # (B, T, out): no prediction before t = C-1
        valid = torch.arange(T, device=inputs.device) >= C - 1
        return preds, valid

    def forward_group(self, windows: Tensor) -> Tensor:
        """One model call on the windows of one group (B, G, C, d) -> predictions (B, G, out)."""
        B, G, C, d = windows.shape
        x = windows.reshape(B * G, C, d)  # (N, C, d)
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return self.head(x.flatten(1)).reshape(B, G, -1)
