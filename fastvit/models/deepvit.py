"""DeepViT: "DeepViT: Towards Deeper Vision Transformer" (Zhou et al., arXiv 2103.11886).

Re-attention: the post-softmax attention maps are mixed across heads by a learned ``(h, h)`` matrix
and normalised with a LayerNorm over the head axis before they weight the values. fastvit declares
this to ``attend()`` as ``HeadMix(post=reattn_weights, post_norm=LayerNorm over heads)``; dispatch
routes it to a backend that materialises the probabilities.

vit-pytorch 1.26.x layout and numerics: dual-patchnorm embedding, 3-D ``cls_token (1, 1, dim)`` and
``pos_embedding (1, N + 1, dim)``, pre-norm blocks with the norm inside, no final norm in the
transformer, ``mlp_head = LayerNorm + Linear``. Keys: ``transformer.layers.{i}.0.{norm, to_qkv,
reattn_weights, reattn_norm.1, to_out.0}``, ``transformer.layers.{i}.1.net.{0,1,4}``.

Deliberate differences from vit-pytorch:

- ``image_size`` and ``patch_size`` may be ``(h, w)`` pairs (vit-pytorch takes ints only).
- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid; vit-pytorch slices the flat table (``pos_embedding[:, :n + 1]``), which gives a non-square or
  narrower image the positions of the wrong grid cells. Same-size inputs are unaffected;
  ``legacy_pos_slicing=True`` restores vit-pytorch's behaviour.
- Wrong channel counts, non-divisible or too-large images raise ``ValueError`` up front.
"""

from __future__ import annotations

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from fastvit.attention import HeadMix
from fastvit.layers import (
    AttentionBase,
    FeedForward,
    Linear,
    PatchEmbed,
    check_image,
    crop_positions,
    merge_heads,
    pair,
    patch_grid,
)

from .base import VisionModel
from .registry import register_model

__all__ = ["DeepViT", "ReAttention", "Transformer"]


class ReAttention(AttentionBase):
    """Multi-head self-attention with re-attention (vit-pytorch's ``deepvit.Attention``).

    Args:
        dim: token width. heads: attention heads. dim_head: width per head.
        dropout: dropout on the probabilities (before the head mixing) and on the output projection.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__(attn_dropout=dropout)
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = Linear(dim, inner_dim * 3, bias=False)
        self.reattn_weights = nn.Parameter(torch.randn(heads, heads))
        # Kept as vit-pytorch's Sequential (keys reattn_norm.1.*, and it still works standalone on
        # (b, h, i, j) maps); attend() applies its LayerNorm to the (b, i, j, h) view itself.
        self.reattn_norm = nn.Sequential(
            Rearrange("b h i j -> b i j h"),
            nn.LayerNorm(heads),
            Rearrange("b i j h -> b h i j"),
        )
        self.to_out = nn.Sequential(Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        b, n, _ = x.shape
        # (b, n, 3*h*d) -> three (b, h, n, d) views; heads are the outer factor as in vit-pytorch.
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        mix = HeadMix(post=self.reattn_weights, post_norm=self.reattn_norm[1])
        out = self.attend(q, k, v, scale=self.scale, head_mix=mix)  # (b, h, n, d)
        return self.to_out(merge_heads(out))


class Transformer(nn.Module):
    """``depth`` x (re-attention + MLP, each residual, norm inside); no final norm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                ReAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                FeedForward(dim, mlp_dim, dropout=dropout),
            ])
            for _ in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class DeepViT(VisionModel):
    """DeepViT with vit-pytorch's constructor.

    Args:
        image_size: int or (h, w); the largest input size.
        patch_size: int or (ph, pw).
        num_classes: classifier width.
        dim: token width. depth: number of blocks. heads: attention heads. mlp_dim: MLP hidden width.
        pool: ``"cls"`` (CLS token) or ``"mean"`` (mean over all tokens, CLS included, as vit-pytorch).
        channels: input channels. dim_head: width per head. dropout: attention/MLP dropout.
        emb_dropout: dropout after the position embedding.
        legacy_pos_slicing: slice the flat position table for smaller inputs, as vit-pytorch does.
    """

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool="cls",
                 channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0, legacy_pos_slicing=False):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.image_size = pair(image_size)
        self.patch_size = pair(patch_size)
        self.grid = patch_grid(image_size, patch_size)
        self.channels = channels
        self.pool = pool
        self.num_classes = num_classes
        self.dim = dim
        self.legacy_pos_slicing = legacy_pos_slicing
        num_patches = self.grid[0] * self.grid[1]

        self.to_patch_embedding = PatchEmbed(self.patch_size, channels, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))

    def position_embedding(self, h: int, w: int) -> Tensor:
        """Positions for an ``h x w`` patch grid: ``(1, 1 + h*w, dim)``."""
        return crop_positions(self.pos_embedding, self.grid, h, w, num_prefix=1, legacy=self.legacy_pos_slicing)

    def embed(self, img: Tensor) -> Tensor:
        """Patch embedding, CLS token and positions: ``(b, 1 + n, dim)`` (before emb dropout)."""
        check_image(img, channels=self.channels, max_size=self.image_size, patch_size=self.patch_size)
        h, w = img.shape[-2] // self.patch_size[0], img.shape[-1] // self.patch_size[1]
        x = self.to_patch_embedding(img)  # (b, n, dim)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (b, 1 + n, dim)
        return x + self.position_embedding(h, w)

    def forward_features(self, img: Tensor) -> Tensor:
        return self.transformer(self.dropout(self.embed(img)))  # (b, 1 + n, dim), not normed

    def forward_head(self, x: Tensor) -> Tensor:
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))


_SMALL = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=4, dim_head=8, mlp_dim=64, num_classes=10)

# Widths after the paper's DeepViT-S / DeepViT-L (Table 6: 12 heads, MLP ratio 3); unlike the paper,
# which keeps plain attention in the first blocks, vit-pytorch uses re-attention in every block.
for _name, _kw in {
    "deepvit_small_patch16_224": dict(dim=396, depth=16, heads=12, dim_head=33, mlp_dim=1188),
    "deepvit_large_patch16_224": dict(dim=420, depth=32, heads=12, dim_head=35, mlp_dim=1260),
}.items():
    register_model(_name, DeepViT, vit_pytorch="vit_pytorch.deepvit:DeepViT", test_overrides=_SMALL,
                   description="DeepViT (re-attention in every block)",
                   image_size=224, patch_size=16, num_classes=1000, **_kw)
