"""NesT: "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and Interpretable Visual
Understanding" (Zhang et al., arXiv 2105.12723).

Patches are embedded into a feature map ``(b, c, h, w)``; hierarchy level ``l`` (from
``num_hierarchies - 1`` down to 0) divides the map into ``2^l x 2^l`` blocks and runs a transformer
inside every block (attention among the tokens of one block only: ``b * 4^l`` windows of the same
length at every level), then aggregates (3x3 conv, channel LayerNorm, 3x3 stride-2 max
pool), so the next level has 4x fewer blocks of the same size and twice the width and heads.
Head: channel LayerNorm, global average pool, Linear.

vit-pytorch 1.26.x layout and numerics: ``to_patch_embedding`` (flatten ``(p1 p2 c)``, channel
LayerNorm, 1x1 conv, channel LayerNorm), ``layers.{level}.0`` a transformer with a position
embedding ``pos_emb`` of one scalar per block position (shared by all channels), pre-norm
attention with 1x1-conv projections (``norm``, ``to_qkv`` without bias, ``to_out.0``, heads of width
``dim // heads``), conv MLPs, ``layers.{level}.1`` the aggregation, ``mlp_head.{0,2}``.

Deliberate differences from vit-pytorch:

- Inputs smaller than ``image_size`` take the position embeddings of the top-left crop of the
  block's 2-D position grid; vit-pytorch slices the flat vector, which gives a token of row ``r`` the
  position of flat index ``r * w' + c``. ``legacy_pos_slicing=True`` restores vit-pytorch's behaviour.
- ``image_size`` and ``patch_size`` may be ``(h, w)`` pairs.
- Sizes are checked up front (divisible by the patch, the feature map by ``2^(num_hierarchies-1)``,
  at most ``image_size``) with ``ValueError``s; vit-pytorch asserts or fails inside a rearrange.
- ``dim_head`` is accepted and unused, as in vit-pytorch (heads are ``dim // heads`` wide).
- The map is never cut into blocks (vit-pytorch rearranges it into a batch of blocks and back at every
  level): the position embedding is added per block by broadcasting, the MLP is per pixel, and the
  attention is one ``attend(..., window=Window(grid, size=block))`` call on the whole map
  (``fastvit.layers.WindowAttention``); a backend with a window kernel reads the blocks in place.
- The channel LayerNorm uses two means (``fastvit.layers.ChanLayerNorm``) instead of ``torch.var``: rounding
  differences only (~1e-6 in fp32).
"""

from __future__ import annotations

import torch
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn

from fastvit.attention import Window
from fastvit.layers import (
    ChanLayerNorm,
    FeedForward,
    Linear,
    ResidualBlocks,
    WindowAttention,
    check_image,
    crop_positions,
    pair,
)

from .base import VisionModel
from .registry import register_model

__all__ = ["NesT", "Attention", "Transformer", "Aggregate"]


class Attention(WindowAttention):
    """Self-attention inside each of the ``blocks x blocks`` blocks of a map: one ``attend(window=...)``
    call on the whole map, windows of ``(h / blocks, w / blocks)`` tokens. Keys ``norm``, ``to_qkv``,
    ``to_out.0``."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.0, blocks: int = 1):
        dim_head = dim // heads
        super().__init__(dim, heads=heads, dim_head=dim_head, window_size=1, conv=True, attn_dropout=dropout,
                         proj_dropout=dropout)
        self.blocks = blocks

    def window(self, grid: tuple) -> Window:
        win = self._windows.get(grid)
        if win is None:
            win = self._windows[grid] = Window(grid=grid, size=(grid[0] // self.blocks, grid[1] // self.blocks))
        return win


def Aggregate(dim: int, dim_out: int) -> nn.Sequential:  # noqa: N802 - vit-pytorch's name
    """3x3 conv -> channel LayerNorm -> 3x3 stride-2 max pool (halves the map). Keys ``0``, ``1``."""
    return nn.Sequential(nn.Conv2d(dim, dim_out, 3, padding=1), ChanLayerNorm(dim_out),
                         nn.MaxPool2d(3, stride=2, padding=1))


class Transformer(ResidualBlocks):
    """Position embedding (one scalar per block position), then ``depth`` x (attention + MLP), residual,
    on the whole map of ``blocks x blocks`` blocks (the attention stays inside each block; the rest is
    per pixel).

    Args:
        grid: the ``(h, w)`` block grid ``pos_emb`` is laid out for (``seq_len = h * w``).
        blocks: blocks per side of the map.
        legacy_pos_slicing: smaller blocks slice the flat ``pos_emb`` (vit-pytorch) instead of cropping it.
    """

    def __init__(self, dim: int, grid: tuple, depth: int, heads: int, mlp_mult: int, dropout: float = 0.0,
                 legacy_pos_slicing: bool = False, blocks: int = 1):
        super().__init__()
        self.grid = tuple(grid)
        self.blocks = blocks
        self.legacy_pos_slicing = legacy_pos_slicing
        self.pos_emb = nn.Parameter(torch.randn(self.grid[0] * self.grid[1]))
        self.set_blocks(
            (Attention(dim, heads=heads, dropout=dropout, blocks=blocks),
             FeedForward(dim, dim * mlp_mult, dropout=dropout, conv=True))
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        s = self.blocks
        h, w = height // s, width // s  # tokens per block side
        pos = crop_positions(self.pos_emb[:, None], self.grid, h, w, num_prefix=0, legacy=self.legacy_pos_slicing)
        # one position scalar per token of a block, shared by channels and blocks
        x = (x.view(b, c, s, h, s, w) + pos.view(1, 1, 1, h, 1, w)).view(b, c, height, width)
        return super().forward(x)


class NesT(VisionModel):
    """NesT with vit-pytorch's constructor (``vit_pytorch.nest.NesT``).

    Args:
        image_size: int or (h, w), the largest input. patch_size: int or (ph, pw).
        num_classes: classifier width. dim: width of the first level (doubles per level).
        heads: heads of the first level (double per level). num_hierarchies: levels.
        block_repeats: transformer blocks per level, from the bottom (an int for all levels).
        mlp_mult: MLP expansion. channels: input channels. dim_head: unused (vit-pytorch's signature).
        dropout: attention / MLP dropout. legacy_pos_slicing: vit-pytorch's position slicing for smaller inputs.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)`` (``(b, 0)`` out);
            by default the classifier is an ``nn.Identity`` and the model returns the pooled, normed features.

    Intermediates (``forward_intermediates``, ``features_only``): each level's map after its transformer
    (before the aggregation), strides ``patch_size`` times 1, 2, 4, ...
    """

    classifier_path = "mlp_head.2"

    def __init__(self, *, image_size, patch_size, num_classes, dim, heads, num_hierarchies, block_repeats,
                 mlp_mult=4, channels=3, dim_head=64, dropout=0.0, legacy_pos_slicing=False,
                 legacy_num_classes_zero=False):
        super().__init__()
        self.image_size, self.patch_size = pair(image_size), pair(patch_size)
        (ih, iw), (ph, pw) = self.image_size, self.patch_size
        if ih % ph or iw % pw:
            raise ValueError(f"image size {self.image_size} must be divisible by the patch size {self.patch_size}")
        if num_hierarchies < 1:
            raise ValueError(f"num_hierarchies must be at least 1, got {num_hierarchies}")
        blocks = 2 ** (num_hierarchies - 1)
        fh, fw = ih // ph, iw // pw
        if fh % blocks or fw % blocks:
            raise ValueError(f"the {fh}x{fw} patch grid must divide into {blocks}x{blocks} blocks "
                             f"(num_hierarchies={num_hierarchies})")
        block_repeats = block_repeats if isinstance(block_repeats, tuple) else (block_repeats,) * num_hierarchies
        if len(block_repeats) != num_hierarchies:
            raise ValueError(f"block_repeats must have one entry per hierarchy ({num_hierarchies}), "
                             f"got {block_repeats}")
        self.channels = channels
        self.num_hierarchies = num_hierarchies
        grid = (fh // blocks, fw // blocks)  # tokens per block side, the same at every level

        mults = [2 ** i for i in range(num_hierarchies)]
        layer_dims = [m * dim for m in mults]
        last_dim = layer_dims[-1]
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (p1 p2 c) h w", p1=ph, p2=pw),
            ChanLayerNorm(channels * ph * pw),
            nn.Conv2d(channels * ph * pw, layer_dims[0], 1),
            ChanLayerNorm(layer_dims[0]),
        )
        self.layers = nn.ModuleList()
        for i, (mult, depth) in enumerate(zip(mults, block_repeats)):
            is_last = i == num_hierarchies - 1
            dim_in, dim_out = layer_dims[i], layer_dims[min(i + 1, num_hierarchies - 1)]
            level = num_hierarchies - 1 - i
            self.layers.append(nn.ModuleList([
                Transformer(dim_in, grid, depth, mult * heads, mlp_mult, dropout, legacy_pos_slicing,
                            blocks=2 ** level),
                nn.Identity() if is_last else Aggregate(dim_in, dim_out),
            ]))
        self.mlp_head = nn.Sequential(ChanLayerNorm(last_dim), Reduce("b c h w -> b c", "mean"),
                                      Linear(last_dim, num_classes))
        self.set_head(last_dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info(layer_dims, [ph * m for m in mults], [f"layers.{i}.0" for i in range(num_hierarchies)])

    def forward_features(self, img: Tensor) -> Tensor:
        """The top level's feature map ``(b, dim * 2^(L-1), h', w')`` before the head."""
        check_image(img, channels=self.channels, max_size=self.image_size, patch_size=self.patch_size)
        x = self.to_patch_embedding(img)
        blocks = 2 ** (self.num_hierarchies - 1)
        if x.shape[-2] % blocks or x.shape[-1] % blocks:
            raise ValueError(f"image size {tuple(img.shape[-2:])}: its {x.shape[-2]}x{x.shape[-1]} patch grid "
                             f"does not divide into {blocks}x{blocks} blocks")
        for transformer, aggregate in self.layers:  # 2^level blocks per side, attended as windows in place
            x = aggregate(self.tap(transformer(x)))
        return x

    def pool_features(self, x: Tensor) -> Tensor:
        return self.mlp_head[:2](x)


_SMALL = dict(image_size=32, patch_size=4, num_classes=10, dim=16, heads=2, num_hierarchies=3, block_repeats=(2, 1, 1))

# The seed README's "NesT-T" example (224 px, 4x4 patches, three levels, 8/4/1 blocks from the bottom).
register_model("nest_tiny_224", NesT, vit_pytorch="vit_pytorch.nest:NesT", test_overrides=_SMALL, image_size=224,
               patch_size=4, num_classes=1000, dim=96, heads=3, num_hierarchies=3, block_repeats=(8, 4, 1))
