"""PiT: "Rethinking Spatial Dimensions of Vision Transformers" (Heo et al., arXiv 2103.16302).

Pooling-based ViT: overlapping patches (``Unfold`` with stride ``patch_size // 2``, then a Linear),
a CLS token and positions, then stages of plain pre-norm transformer blocks separated by a pooling
layer that halves the token grid with a depthwise 3x3 stride-2 convolution (then a 1x1) and doubles
the width; the CLS token is carried through each pool by a Linear ``dim -> 2 dim``. Head:
LayerNorm + Linear on the CLS token.

vit-pytorch 1.26.x layout and numerics: 3-D ``pos_embedding (1, N + 1, dim)`` / ``cls_token
(1, 1, dim)``, stage transformers without a final norm, ``layers`` a Sequential alternating
transformers and pools (keys ``layers.{i}``), ``heads`` an int or a per-stage tuple, ``channels``.

Deliberate differences from vit-pytorch:

- ``image_size`` and ``patch_size`` accept ``(h, w)`` pairs; the pools track the ``(h, w)`` token
  grid (vit-pytorch recovers it with ``sqrt(n)``, so it fails on non-square grids, #148).
- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid. vit-pytorch slices the flat table (``pos_embedding[:, :n + 1]``), which gives a smaller
  image the positions of the wrong grid cells. Same-size inputs are unaffected;
  ``legacy_pos_slicing=True`` restores vit-pytorch's behaviour.
- ``depth`` may be a list as well as a tuple; ``heads`` given as a tuple must have one entry per
  stage (vit-pytorch silently drops the stages ``zip`` cannot pair). Bad sizes, channel counts and
  these arguments raise ``ValueError`` up front.
- ``num_classes=0`` returns the normed CLS token ``(b, dim_last)`` (``mlp_head.1`` an ``nn.Identity``);
  vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.

Intermediates (``forward_intermediates``, ``features_only``): each stage's patch tokens as a map,
strides ``patch_size // 2`` times 1, 2, 4.
"""

from __future__ import annotations

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from fastvit.layers import DepthWiseConv2d, Linear, Transformer, ViTStem, conv_output_size, pair, patch_grid

from .base import VisionModel
from .registry import register_model

__all__ = ["PiT", "Pool", "DepthWiseConv2d"]


class Pool(nn.Module):
    """Halve the token grid and double the width; the CLS token goes through a Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.downsample = DepthWiseConv2d(dim, dim * 2, kernel_size=3, stride=2, padding=1, batch_norm=False)
        self.cls_ff = Linear(dim, dim * 2)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """``x (b, 1 + h*w, dim)`` on an ``(h, w)`` grid -> ``(b, 1 + h'*w', 2 dim)`` and ``(h', w')``."""
        cls_token, tokens = x[:, :1], x[:, 1:]
        cls_token = self.cls_ff(cls_token)  # (b, 1, 2 dim)
        b, _, c = tokens.shape
        tokens = tokens.transpose(1, 2).reshape(b, c, *grid)  # (b, dim, h, w)
        tokens = self.downsample(tokens)  # (b, 2 dim, h', w')
        new_grid = (tokens.shape[-2], tokens.shape[-1])
        tokens = tokens.flatten(2).transpose(1, 2)  # (b, h'*w', 2 dim)
        return torch.cat((cls_token, tokens), dim=1), new_grid


class PiT(ViTStem, VisionModel):
    """Pooling-based Vision Transformer with vit-pytorch's constructor.

    Args:
        image_size: int or (h, w); the largest input size, divisible by ``patch_size``.
        patch_size: int or (ph, pw) (>= 2); patches overlap by half (stride ``patch_size // 2``).
        num_classes: classifier width.
        dim: width of the first stage (doubled by every pool).
        depth: tuple of blocks per stage, one pool between consecutive stages.
        heads: int, or a tuple with one entry per stage.
        mlp_dim: MLP hidden width (the same in every stage, as vit-pytorch).
        dim_head: width per head. dropout: attention/MLP dropout. emb_dropout: after the positions.
        channels: input channels.
        legacy_pos_slicing: slice the flat position table for smaller inputs, as vit-pytorch does.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = "mlp_head.1"

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, dim_head=64,
                 dropout=0.0, emb_dropout=0.0, channels=3, legacy_pos_slicing=False, legacy_num_classes_zero=False):
        super().__init__()
        if not isinstance(depth, (tuple, list)) or not depth:
            raise ValueError(f"depth must be a tuple of integers, the number of blocks before each "
                             f"downsizing, got {depth!r}")
        depth = tuple(depth)
        if isinstance(heads, (tuple, list)):
            if len(heads) != len(depth):
                raise ValueError(f"heads {tuple(heads)} must have one entry per stage of depth {depth}")
            heads = tuple(heads)
        else:
            heads = (heads,) * len(depth)
        patch_size = pair(patch_size)
        if min(patch_size) < 2:
            raise ValueError(f"patch_size {patch_size} must be at least 2 (the unfold stride is patch_size // 2)")
        patch_grid(image_size, patch_size)  # raises if not divisible, as vit-pytorch asserts
        self.stride = (patch_size[0] // 2, patch_size[1] // 2)
        # Unfold flattens each patch as (c, ph, pw); vit-pytorch's layout, keys to_patch_embedding.2.
        unfold = nn.Sequential(
            nn.Unfold(kernel_size=patch_size, stride=self.stride),
            Rearrange("b c n -> b n c"),
            Linear(channels * patch_size[0] * patch_size[1], dim),
        )
        self.patch_size = patch_size  # token_grid reads it
        self.build_stem(image_size=image_size, patch_size=patch_size, channels=channels, dim=dim,
                        emb_dropout=emb_dropout, legacy_pos_slicing=legacy_pos_slicing, patch_embedding=unfold,
                        grid=self.token_grid(*pair(image_size)))

        layers, widths = [], []
        for ind, (layer_depth, layer_heads) in enumerate(zip(depth, heads)):
            layers.append(Transformer(dim, layer_depth, layer_heads, dim_head, mlp_dim, dropout,
                                      final_norm=False))
            widths.append(dim)
            if ind < len(depth) - 1:
                layers.append(Pool(dim))
                dim *= 2
        self.layers = nn.Sequential(*layers)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info(widths, [self.stride[0] * 2 ** i for i in range(len(depth))],
                              [f"layers.{2 * i}" for i in range(len(depth))])

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h, w)`` grid of overlapping patches of an ``h x w`` image."""
        return (conv_output_size(h, self.patch_size[0], self.stride[0]),
                conv_output_size(w, self.patch_size[1], self.stride[1]))

    def forward_features(self, img: Tensor) -> Tensor:
        """CLS token and tokens of the last stage: ``(b, 1 + n_last, dim_last)``."""
        grid = self.token_grid(img.shape[-2], img.shape[-1])
        x = self.dropout(self.embed(img))  # (b, 1 + h*w, dim)
        for layer in self.layers:
            if isinstance(layer, Pool):
                x, grid = layer(x, grid)
            else:
                x = layer(x)
                if self.taps is not None:  # the stage's patch tokens as a map (b, dim, h, w), a view
                    self.tap(x[:, 1:].transpose(1, 2).unflatten(2, grid))
        return x

    def pool_features(self, x: Tensor) -> Tensor:
        return self.mlp_head[0](x[:, 0])


# Paper configs (timm's pit_*): patch 16 / stride 8, base head width 32 (ti) or 48 (xs, s); PiT-B uses
# patch 14 / stride 7 and head width 64. vit-pytorch has one mlp_dim for all stages: 4x the width of the
# middle stage, the deepest one (6 blocks), whose MLP ratio is then the paper's 4.
_SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=(1, 1), heads=2, dim_head=16,
              mlp_dim=64)

for _name, _kw in {
    "pit_ti_224": dict(patch_size=16, dim=64, depth=(2, 6, 4), heads=(2, 4, 8), dim_head=32, mlp_dim=512),
    "pit_xs_224": dict(patch_size=16, dim=96, depth=(2, 6, 4), heads=(2, 4, 8), dim_head=48, mlp_dim=768),
    "pit_s_224": dict(patch_size=16, dim=144, depth=(2, 6, 4), heads=(3, 6, 12), dim_head=48, mlp_dim=1152),
    "pit_b_224": dict(patch_size=14, dim=256, depth=(3, 6, 4), heads=(4, 8, 16), dim_head=64, mlp_dim=2048),
}.items():
    register_model(_name, PiT, vit_pytorch="vit_pytorch.pit:PiT", timm=_name, test_overrides=_SMALL, image_size=224,
                   num_classes=1000, **_kw)
