"""Norms that ``torch.nn`` lacks: a LayerNorm without a bias, and the per-head RMS norm of queries
and keys (ViT-22B's "QK norm"), both in vit-pytorch's key layout (NaViT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BiasFreeLayerNorm", "HeadRMSNorm"]


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm with a learned scale and no learned shift. Keys ``gamma`` (a parameter) and ``beta``
    (a zero buffer, kept in the state dict as vit-pytorch keeps it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class HeadRMSNorm(nn.Module):
    """``normalize(x) * sqrt(dim) * gamma`` per head on ``(b, heads, n, dim)``: unit RMS, a learned scale
    per head and channel (key ``gamma (heads, 1, dim)``). Queries and keys normed so carry the softmax
    scale themselves: attend with ``scale=1``."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma
