"""The memory network: an MLP ``d -> h -> d`` (or one ``d -> d`` layer) whose weights, one set per
memory slot, live in a single flat tensor.

Shape legend
    S  memory slots      R  rows (tokens) per slot      d  width      h  hidden width
    n  weights per slot: ``[W1 (h, d) | b1 (h) | W2 (d, h) | b2 (d)]`` (two layers) or
       ``[W (d, d) | b (d)]`` (one)

The functions here take the weights explicitly, so the harness can differentiate the surprise
with respect to any weights (a leaf it made) without touching the memory's own.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels


class FlatLayout:
    """Where each weight sits in the flat (S, n) tensor: names, shapes and sizes, in order."""

    def __init__(self, dim: int, hidden: int, num_layers: int):
        if num_layers not in (1, 2):
            raise ValueError(f"num_layers must be 1 or 2, got {num_layers}")
        self.dim, self.hidden, self.num_layers = dim, hidden, num_layers
        dims = [dim, dim] if num_layers == 1 else [dim, hidden, dim]
        self.names = ("w", "b") if num_layers == 1 else ("w1", "b1", "w2", "b2")
        self.shapes: list[tuple[int, ...]] = []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            self.shapes += [(fan_out, fan_in), (fan_out,)]
        self.sizes = [int(torch.Size(shape).numel()) for shape in self.shapes]

    def initial_weights(self) -> Tensor:
        """Fresh weights, one slot (1, n): the reference's default ``nn.Linear`` init
        (Kaiming-uniform), drawn layer by layer, weight before bias."""
        tensors = []
        for shape in self.shapes[::2]:
            layer = nn.Linear(shape[1], shape[0])
            tensors += [layer.weight.detach(), layer.bias.detach()]
        return torch.cat([t.reshape(1, -1) for t in tensors], dim=1)  # (1, n)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(S, n) -> ``{name: (S, ...)}`` views, in ``names`` order."""
        parts = flat.split(self.sizes, dim=1)
        return {n: p.view(flat.shape[0], *shape)
                for n, p, shape in zip(self.names, parts, self.shapes)}

    def flatten(self, weights: dict[str, Tensor]) -> Tensor:
        """``{name: (S, ...)}`` -> one (S, n) tensor (a rule can then work on it whole)."""
        return torch.cat([weights[n].reshape(weights[n].shape[0], -1)
                          for n in self.names], dim=1)  # (S, n)


def forward(q: Tensor, flat: Tensor, layout: FlatLayout) -> Tensor:
    """``M(q)``: queries (S, R, d) through the memory with weights ``flat`` (S, n) -> (S, R, d)."""
    if layout.num_layers == 1:
        w = layout.unflatten(flat)
        return _linear(q, w["w"], w["b"])
    return kernels.memory_mlp(q, flat)


def recall_error(keys: Tensor, values: Tensor, flat: Tensor, layout: FlatLayout,
                 twice_differentiable: bool) -> Tensor:
    """Per slot (S,), the sum over features of the mean over rows of ``(M(keys) - values)^2``,
    differentiable with respect to ``flat``: the reference's surprise (Eq. 12)."""
    if layout.num_layers == 2:
        return kernels.recall_error(keys, values, flat, twice_differentiable)
    return (forward(keys, flat, layout) - values).pow(2).sum((1, 2)) / values.shape[1]  # (S,)


def recall_error_and_gradient(keys: Tensor, values: Tensor, flat: Tensor, layout: FlatLayout
                              ) -> tuple[Tensor, Tensor]:
    """:func:`recall_error` (S,) and its gradient with respect to ``flat`` (S, n), without a
    graph (for an update whose outer gradient is not needed)."""
    if layout.num_layers == 2:
        return kernels.recall_error_and_gradient(keys, values, flat)
    keys, values = keys.detach(), values.detach()
    return kernels.reference.value_and_gradient(
        lambda w: recall_error(keys, values, w, layout, False), flat)


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per-slot ``x @ w.T + b``: (S, R, i), (S, o, i), (S, o) -> (S, R, o)."""
    if x.shape[0] == 1:  # one shared slot: a plain matrix product is cheaper
        return torch.addmm(b[0], x[0], w[0].T).unsqueeze(0)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
