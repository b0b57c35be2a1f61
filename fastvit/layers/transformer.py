"""The pre-norm transformer encoder of vit-pytorch's ViT family."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from .attention import Attention
from .mlp import FeedForward

__all__ = ["Transformer"]


class Transformer(nn.Module):
    """``depth`` x (attention + MLP, each residual, norm inside), then a final LayerNorm.

    Keys: ``layers.{i}.0`` (Attention), ``layers.{i}.1`` (FeedForward), ``norm``. SimpleViT's variant
    is ``dropout=None, out_bias=False`` (no dropout layers, bias-free output projection); MobileViT's is
``final_norm=False, activation=nn.SiLU``.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: Optional[float] = 0.0,
                 final_norm: bool = True, out_bias: bool = True, activation: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout or 0.0, out_bias=out_bias),
                FeedForward(dim, mlp_dim, dropout=dropout, activation=activation),
            ])
            for _ in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)
