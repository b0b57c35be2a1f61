"""CaiT: "Going deeper with Image Transformers" (Touvron et al., arXiv 2103.17239).

Two ideas on top of ViT: LayerScale (each residual branch is multiplied by a learned per-channel
scale initialised to a small epsilon) and class attention (the CLS token joins only in the last
``cls_depth`` blocks, where it alone queries ``[cls; patches]``). As in vit-pytorch, every attention
also uses talking heads (mixing across heads before and after the softmax), declared to ``attend()``
as ``HeadMix(pre=..., post=...)``.

vit-pytorch 1.26.x layout and numerics: dual-patchnorm embedding, ``pos_embedding (1, N, dim)`` with
no CLS slot, 3-D ``cls_token (1, 1, dim)``, separate ``to_q`` / ``to_kv`` projections, blocks wrapped
as ``LayerScale`` (keys ``{patch,cls}_transformer.layers.{i}.{0,1}.scale`` and ``.fn.``), no final
norm after the patch stage (class attention sees the un-normalised patches), ``mlp_head = LayerNorm
+ Linear`` on the CLS token. ``layer_dropout`` drops whole blocks for the whole batch (LayerDrop-style
stochastic depth, at least one block kept, no rescaling), as vit-pytorch does.

Deliberate differences from vit-pytorch:

- ``layer_dropout`` is applied in training only. vit-pytorch also drops blocks in ``eval()``, which
  makes inference random; ``layer_dropout_in_eval=True`` restores that.
- The LayerScale init epsilon is chosen from the total depth (the number of patch blocks, which is
  what the paper's model names count: 0.1 up to 18, 1e-5 up to 24, 1e-6 beyond, for the patch and the
  class blocks alike), as in the paper. vit-pytorch chooses it from each block's index (blocks 1-18
  get 0.1 whatever the depth); ``layerscale_init_by_index=True`` restores that. This only changes the
  initial values, so a loaded checkpoint gives the same outputs either way.
- ``channels`` is an argument (vit-pytorch hard-codes 3 input channels).
- ``image_size`` and ``patch_size`` may be ``(h, w)`` pairs (vit-pytorch takes ints only).
- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid; vit-pytorch slices the flat table, which gives a narrower image the positions of the wrong
  grid cells. ``legacy_pos_slicing=True`` restores vit-pytorch's behaviour.
- Wrong channel counts, non-divisible or too-large images raise ``ValueError`` up front.
- ``num_classes=0`` returns the pooled, normed CLS token ``(b, dim)`` (``mlp_head.1`` an ``nn.Identity``);
  vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.
"""

from __future__ import annotations

from random import randrange
from typing import Optional

import torch
from torch import Tensor, nn

from fastvit.layers import BlockRunner, FeedForward, Linear, TalkingHeadsAttention, ViTStem

from .base import VisionModel
from .registry import register_model

__all__ = ["CaiT", "LayerScale", "TalkingHeadsAttention", "Transformer", "layerscale_init_eps"]


def layerscale_init_eps(depth: int) -> float:
    """The LayerScale init of the paper (section 2) for a network of ``depth`` blocks."""
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


def dropout_layers(layers, dropout: float) -> list:
    """vit-pytorch's layer dropout: drop each block with probability ``dropout``, keep at least one.

    The draw is made on the CPU (no device sync), with the same random calls as vit-pytorch so a
    seeded training step matches it.
    """
    layers = list(layers)
    if dropout == 0:
        return layers
    to_drop = torch.zeros(len(layers)).uniform_(0.0, 1.0) < dropout
    if bool(to_drop.all()):
        to_drop[randrange(len(layers))] = False
    return [layer for layer, drop in zip(layers, to_drop.tolist()) if not drop]


class LayerScale(nn.Module):
    """``fn(x) * scale`` with a per-channel ``scale (1, 1, dim)`` initialised to ``init_eps``."""

    def __init__(self, dim: int, fn: nn.Module, depth: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, 1, dim).fill_(layerscale_init_eps(depth)))
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(x, **kwargs) * self.scale


def layerscale_block(block: nn.ModuleList, x: Tensor, context: Optional[Tensor]) -> Tensor:
    """One block; with a ``context`` (class attention) the keys are ``[x; context]``."""
    attn, ff = block
    x = attn(x, context=context, kv_include_self=True) + x
    return ff(x) + x


class Transformer(BlockRunner, nn.Module):
    """``depth`` x LayerScale(attention) + LayerScale(MLP), with layer dropout; no final norm.

    Args:
        init_depth: the depth that picks the LayerScale init; ``None`` = each block's index (vit-pytorch).
        layer_dropout_in_eval: also drop blocks in eval mode (vit-pytorch's behaviour).
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0,
                 layer_dropout: float = 0.0, *, init_depth: Optional[int] = None,
                 layer_dropout_in_eval: bool = False):
        super().__init__()
        self.layer_dropout = layer_dropout
        self.layer_dropout_in_eval = layer_dropout_in_eval
        self.layers = nn.ModuleList([])
        for ind in range(depth):
            eps_depth = ind + 1 if init_depth is None else init_depth
            self.layers.append(nn.ModuleList([
                LayerScale(dim, TalkingHeadsAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                           depth=eps_depth),
                LayerScale(dim, FeedForward(dim, mlp_dim, dropout=dropout), depth=eps_depth),
            ]))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        layers = self.layers
        if self.layer_dropout > 0 and (self.training or self.layer_dropout_in_eval):
            layers = dropout_layers(self.layers, self.layer_dropout)
        for block in layers:
            x = self.tap(self.run_block(layerscale_block, block, x, context))
        return x


class CaiT(ViTStem, VisionModel):
    """CaiT with vit-pytorch's constructor (plus ``channels`` and the flags below).

    Args:
        image_size: int or (h, w); the largest input size.
        patch_size: int or (ph, pw).
        num_classes: classifier width.
        dim: token width.
        depth: number of patch self-attention blocks.
        cls_depth: number of class-attention blocks.
        heads: attention heads. mlp_dim: MLP hidden width. dim_head: width per head.
        dropout: attention/MLP dropout. emb_dropout: dropout after the position embedding.
        layer_dropout: probability of dropping each block in training.
        channels: input channels.
        layer_dropout_in_eval: also drop blocks in eval, as vit-pytorch does.
        layerscale_init_by_index: pick the LayerScale init from each block's index, as vit-pytorch does.
        legacy_pos_slicing: slice the flat position table for smaller inputs, as vit-pytorch does.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = "mlp_head.1"
    intermediates_from = "patch_transformer"  # the patch blocks (timm's CaiT takes the same)

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, cls_depth, heads, mlp_dim,
                 dim_head=64, dropout=0.0, emb_dropout=0.0, layer_dropout=0.0, channels=3,
                 layer_dropout_in_eval=False, layerscale_init_by_index=False, legacy_pos_slicing=False,
                 legacy_num_classes_zero=False):
        super().__init__()
        if not 0.0 <= layer_dropout < 1.0:
            raise ValueError(f"layer_dropout must be in [0, 1), got {layer_dropout}")
        self.build_stem(image_size=image_size, patch_size=patch_size, channels=channels, dim=dim,
                        cls_in_positions=False, emb_dropout=emb_dropout, legacy_pos_slicing=legacy_pos_slicing)

        stage = dict(dropout=dropout, layer_dropout=layer_dropout,
                     layer_dropout_in_eval=layer_dropout_in_eval,
                     init_depth=None if layerscale_init_by_index else depth)
        self.patch_transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, **stage)
        self.cls_transformer = Transformer(dim, cls_depth, heads, dim_head, mlp_dim, **stage)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info([dim] * depth, [self.patch_size[0]] * depth, "patch_transformer.layers")

    def forward_features(self, img: Tensor) -> Tensor:
        """The CLS token after the class-attention blocks, ``(b, 1, dim)`` (not normed)."""
        x = self.patch_transformer(self.dropout(self.embed(img)))  # (b, n, dim): patches with positions
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)  # (b, 1, dim)
        return self.cls_transformer(cls_tokens, context=x)

    def pool_features(self, x: Tensor) -> Tensor:
        return self.mlp_head[0](x[:, 0])


_SMALL = dict(image_size=32, patch_size=8, dim=32, depth=2, cls_depth=1, heads=4, dim_head=8, mlp_dim=64,
              num_classes=10, layer_dropout=0.0)

# The paper's Table 1 models at 224 (dim_head 48 everywhere, MLP ratio 4, two class-attention blocks).
for _name, _kw in {
    "cait_xxs24_224": dict(dim=192, depth=24, heads=4, mlp_dim=768, layer_dropout=0.05),
    "cait_xxs36_224": dict(dim=192, depth=36, heads=4, mlp_dim=768, layer_dropout=0.1),
    "cait_xs24_224": dict(dim=288, depth=24, heads=6, mlp_dim=1152, layer_dropout=0.05),
    "cait_s24_224": dict(dim=384, depth=24, heads=8, mlp_dim=1536, layer_dropout=0.1),
}.items():
    register_model(_name, CaiT, vit_pytorch="vit_pytorch.cait:CaiT", test_overrides=_SMALL,
                   timm=None if _name == "cait_xs24_224" else _name,  # timm has cait_xs24 at 384 px only
                   description="CaiT (LayerScale, talking heads, class attention)",
                   pretrained_cfg=dict(crop_pct=1.0),  # the paper's (and timm's) evaluation: no crop
                   image_size=224, patch_size=16, num_classes=1000, cls_depth=2, dim_head=48, **_kw)
