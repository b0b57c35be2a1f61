"""T2T-ViT: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet"
(Yuan et al., arXiv 2101.11986).

The image is tokenised by soft splits: each ``(kernel, stride)`` of ``t2t_layers`` unfolds
overlapping patches (``nn.Unfold``, padding ``stride // 2``), and between two splits a one-block,
single-head transformer runs over the tokens, which are folded back into an image for the next
split. The stage transformers' head dim is the token width ``channels * prod(k**2)`` (147 then 1323
for the defaults): they call ``attend()`` like everything else, and dispatch falls back to a backend
without a head-dim limit where a fused one has one.

vit-pytorch 1.26.x layout and numerics: ``to_patch_embedding`` is one ``Sequential`` whose indices
are the checkpoint keys (``to_patch_embedding.3`` is the first stage transformer, the last index the
``Linear(layer_dim, dim)``); the stage transformers are vit-pytorch's ``vit.Transformer`` with
``heads=1, dim_head=layer_dim`` (so no ``to_out``) and a final norm; 3-D ``pos_embedding (1, N + 1,
dim)`` and ``cls_token (1, 1, dim)``; ``mlp_head`` a plain Linear. ``transformer=`` replaces the main
transformer by any module mapping ``(b, n, dim) -> (b, n, dim)``.

Deliberate differences from vit-pytorch:

- Non-square images work: ``image_size`` may be ``(h, w)``, and the token grid is tracked through the
  soft splits (vit-pytorch refolds tokens into a square of side ``sqrt(n)``, so a 224x160 image
  raises an ``EinopsError``).
- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid; vit-pytorch slices the flat table (``pos_embedding[:, :n + 1]``), which gives a smaller image
  the positions of the wrong grid cells. ``legacy_pos_slicing=True`` restores vit-pytorch's behaviour.
- Wrong channel counts and too-large or too-small images raise ``ValueError`` up front; so does a
  missing ``depth`` / ``heads`` / ``mlp_dim`` without ``transformer=`` (an assert in vit-pytorch).
- ``num_classes=0`` returns the pooled features ``(b, dim)`` (``mlp_head`` an ``nn.Identity``); vit-pytorch's
  ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.
"""

from __future__ import annotations

import math
from typing import Optional

from einops.layers.torch import Rearrange
from torch import Tensor, nn

from fastvit.layers import DistillTokenMixin, Linear, Transformer, ViTStem, conv_output_size, pair

from .base import VisionModel
from .registry import register_model

__all__ = ["T2TViT", "DistillableT2TViT", "TokensToToken", "RearrangeImage", "conv_output_size"]


class RearrangeImage(nn.Module):
    """Tokens back to an image, ``(b, h*w, c) -> (b, c, h, w)``, for a known ``(h, w)`` grid (a view)."""

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return x.transpose(1, 2).unflatten(2, (h, w))


class TokensToToken(nn.Sequential):
    """The soft-split stem; a ``Sequential`` so its indices are vit-pytorch's keys.

    Per ``(kernel, stride)``: ``[RearrangeImage | Identity, Unfold, Rearrange('b c n -> b n c'),
    Transformer | Identity]``, then ``Linear(layer_dim, dim)``. ``forward`` tracks the token grid so
    non-square images refold correctly.
    """

    def __init__(self, t2t_layers, channels: int, dim: int, dropout: float = 0.0):
        layers = []
        layer_dim = channels
        for i, (kernel_size, stride) in enumerate(t2t_layers):
            layer_dim *= kernel_size ** 2
            is_first, is_last = i == 0, i == len(t2t_layers) - 1
            layers += [
                nn.Identity() if is_first else RearrangeImage(),
                nn.Unfold(kernel_size=kernel_size, stride=stride, padding=stride // 2),
                Rearrange("b c n -> b n c"),
                nn.Identity() if is_last else Transformer(dim=layer_dim, heads=1, depth=1, dim_head=layer_dim,
                                                         mlp_dim=layer_dim, dropout=dropout),
            ]
        layers.append(Linear(layer_dim, dim))
        super().__init__(*layers)
        self.t2t_layers = tuple((int(k), int(s)) for k, s in t2t_layers)

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        """The token grid ``(h, w)`` the stem produces for an ``h x w`` image."""
        for kernel_size, stride in self.t2t_layers:
            h = conv_output_size(h, kernel_size, stride, stride // 2)
            w = conv_output_size(w, kernel_size, stride, stride // 2)
        return h, w

    def forward(self, img: Tensor) -> Tensor:
        x, (h, w) = img, img.shape[-2:]
        for layer in self:
            x = layer(x, h, w) if isinstance(layer, RearrangeImage) else layer(x)
            if isinstance(layer, nn.Unfold):
                h = conv_output_size(h, layer.kernel_size, layer.stride, layer.padding)
                w = conv_output_size(w, layer.kernel_size, layer.stride, layer.padding)
        return x  # (b, h*w, dim)


class T2TViT(ViTStem, VisionModel):
    """T2T-ViT with vit-pytorch's constructor.

    Args:
        image_size: int or (h, w); the largest input size.
        num_classes: classifier width.
        dim: token width of the main transformer.
        depth, heads, mlp_dim, dim_head: the main transformer (needed unless ``transformer`` is given).
        pool: ``"cls"`` (CLS token) or ``"mean"`` (mean over all tokens, CLS included, as vit-pytorch).
        channels: input channels.
        dropout: attention/MLP dropout (stage and main transformers). emb_dropout: after the positions.
        transformer: a module ``(b, n, dim) -> (b, n, dim)`` replacing the main transformer.
        t2t_layers: ``(kernel_size, stride)`` of each soft split.
        legacy_pos_slicing: slice the flat position table for smaller inputs, as vit-pytorch does.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    final_norm_path = "transformer.norm"
    intermediates_from = "transformer"

    def __init__(self, *, image_size, num_classes, dim, depth=None, heads=None, mlp_dim=None, pool="cls",
                 channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0,
                 transformer: Optional[nn.Module] = None, t2t_layers=((7, 4), (3, 2), (3, 2)),
                 legacy_pos_slicing=False, legacy_num_classes_zero=False):
        super().__init__()
        if transformer is None:
            missing = [n for n, v in (("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim)) if v is None]
            if missing:
                raise ValueError(f"{', '.join(missing)} must be given when no transformer= is passed")
        elif not isinstance(transformer, nn.Module):
            raise ValueError(f"transformer must be an nn.Module mapping (b, n, dim) -> (b, n, dim), "
                             f"got {transformer!r}")
        if not t2t_layers:
            raise ValueError("t2t_layers must hold at least one (kernel_size, stride) pair")
        tokens_to_token = TokensToToken(t2t_layers, channels, dim, dropout)
        grid = tokens_to_token.output_grid(*pair(image_size))
        if min(grid) < 1:
            raise ValueError(f"image size {pair(image_size)} is too small for t2t_layers {tuple(t2t_layers)}")
        self.build_stem(image_size=image_size, patch_size=None, channels=channels, dim=dim, pool=pool,
                        emb_dropout=emb_dropout, legacy_pos_slicing=legacy_pos_slicing,
                        patch_embedding=tokens_to_token, grid=grid)
        if transformer is None:
            transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.transformer = transformer
        self.to_latent = nn.Identity()
        self.mlp_head = Linear(dim, num_classes)
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        reduction = math.prod(stride for _, stride in tokens_to_token.t2t_layers)
        depth = len(getattr(transformer, "layers", ()))  # a module without fastvit's blocks: no intermediates
        self.set_feature_info([dim] * depth, [reduction] * depth, "transformer.layers")

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The token grid of the soft splits for an ``h x w`` image; too small an image is a ValueError."""
        grid = self.to_patch_embedding.output_grid(h, w)
        if min(grid) < 1:
            raise ValueError(f"image size {(h, w)} is too small for t2t_layers {self.to_patch_embedding.t2t_layers}")
        return grid

    def forward_features(self, img: Tensor) -> Tensor:
        """The main transformer's tokens ``(b, 1 + n, dim)``, CLS first (normed by a fastvit Transformer)."""
        return self.transformer(self.dropout(self.embed(img)))

    def pool_features(self, x: Tensor) -> Tensor:
        return self.to_latent(self.pool_tokens(x))


class DistillableT2TViT(DistillTokenMixin, T2TViT):
    """``T2TViT`` whose forward also accepts ``distill_token (1, dim)``; same constructor as ``T2TViT``.
    vit-pytorch 1.26.x's ``DistillMixin`` fails on T2T's 3-D ``cls_token``; this one works (embedding
    dropout after the token is appended, as the mixin means)."""

    plain_class = T2TViT


_SMALL = dict(image_size=32, num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
              t2t_layers=((3, 2), (3, 2)))

# The paper's T2T-ViT-14/19/24 backbones (MLP ratio 3) with vit-pytorch's stem (no 64-wide token
# projection in the soft-split stages, plain attention in them rather than Performer).
for _name, _kw in {
    "t2t_vit_14": dict(dim=384, depth=14, heads=6, mlp_dim=1152),
    "t2t_vit_19": dict(dim=448, depth=19, heads=7, mlp_dim=1344),
    "t2t_vit_24": dict(dim=512, depth=24, heads=8, mlp_dim=1536),
}.items():
    register_model(_name, T2TViT, vit_pytorch="vit_pytorch.t2t:T2TViT", test_overrides=_SMALL,
                   description="Tokens-to-Token ViT", image_size=224, num_classes=1000, **_kw)
