"""The pluggable-transformer ViT (vit-pytorch ``efficient.ViT``).

``transformer`` is any module mapping ``(b, n, dim) -> (b, n, dim)`` (Nystromformer, an x-transformers
``Encoder``, or a fastvit ``Transformer``). vit-pytorch 1.26.x layout: 3-D ``pos_embedding
(1, N + 1, dim)`` and ``cls_token (1, 1, dim)``, no embedding dropout, head ``LayerNorm + Linear``.

Deliberate difference: ``patch_size`` may be an ``(h, w)`` pair (vit-pytorch takes an int only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastvit.layers import Linear, PatchEmbed, Transformer, check_image, pair, patch_grid

from .base import VisionModel
from .registry import register_model

__all__ = ["ViT"]


class ViT(VisionModel):
    """Args: image_size, patch_size, num_classes, dim, transformer, pool ("cls" | "mean"), channels."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, transformer: nn.Module, pool="cls", channels=3):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if not isinstance(transformer, nn.Module):
            raise ValueError(
                f"transformer must be an nn.Module mapping (b, n, dim) -> (b, n, dim), got {transformer!r}"
            )
        self.image_size = pair(image_size)
        self.patch_size = pair(patch_size)
        gh, gw = patch_grid(image_size, patch_size)
        self.channels = channels
        self.pool = pool
        self.num_classes = num_classes
        self.dim = dim
        self.to_patch_embedding = PatchEmbed(self.patch_size, channels, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, gh * gw + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = transformer
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))

    def embed(self, img: Tensor) -> Tensor:
        check_image(img, channels=self.channels, max_size=self.image_size, patch_size=self.patch_size)
        x = self.to_patch_embedding(img)  # (b, n, dim)
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        return x + self.pos_embedding[:, : n + 1]

    def forward_features(self, img: Tensor) -> Tensor:
        return self.transformer(self.embed(img))

    def forward_head(self, x: Tensor) -> Tensor:
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))


def _efficient_vit(*, dim, depth, heads, mlp_dim, dim_head=64, **kwargs) -> ViT:
    """A preset: the pluggable ViT around fastvit's own Transformer."""
    return ViT(dim=dim, transformer=Transformer(dim, depth, heads, dim_head, mlp_dim), **kwargs)


register_model("efficient_vit_small_patch16_224", _efficient_vit,
               test_overrides=dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
                                   num_classes=10),
               image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536)
