"""The MAC block's transformer encoder layer.

Shape legend
    N  windows    L  tokens per window (P + 2C)    d  model width    f  feed-forward width

``EncoderLayer`` computes exactly what ``nn.TransformerEncoderLayer(d, nhead, f, dropout,
activation=silu, batch_first=True)`` computes (post-norm, same parameter names, so the two
load each other's state dicts), as three operations of :mod:`titans_lightning.kernels`: the
attention core, the output projection with its dropout, residual connection and norm, and the
feed-forward with its dropouts, residual connection and norm. Each runs on a CPU kernel or on
PyTorch's operators, whichever applies; on the CPU, either way, the 2048-wide feed-forward
activation is recomputed in the backward pass instead of stored, and dropout costs far less than
one random number per element (see :mod:`titans_lightning.kernels.reference`).
"""
from __future__ import annotations

from torch import Tensor, nn
import torch.nn.functional as F

from . import kernels


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with SiLU feed-forward (batch first)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, layer_norm_eps: float = 1e-5):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead, self.p = nhead, dropout
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        N, L, d = x.shape
        p = self.p if self.training else 0.0
        # where the PyTorch path drops: the attention weights, its output, the feed-forward's
        weights_drops, output_drops, feed_forward_drops = kernels.dropout_draws(
            p, [N * self.nhead * L * L, N * L * d, N * L * d])
        attn = self.self_attn
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3d)
        heads = kernels.attention(qkv, self.nhead, p, weights_drops)  # (N, L, d)
        x = kernels.add_norm(x, heads, self.norm1, p, output_drops, project=attn.out_proj)
        return kernels.feed_forward_add_norm(x, self.linear1, self.linear2, self.norm2, p,
                                             feed_forward_drops)  # (N, L, d)
