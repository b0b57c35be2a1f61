"""LeViT: "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference"
(Graham et al., arXiv 2104.01136).

A convolutional stem (16x downsampling), then stages of attention blocks on the feature map
``(b, c, h, w)``: q, k, v are 1x1 convs + BatchNorm with a small key width and a wider value width
(``dim_key != dim_value``), a learned 2-D relative position bias per head, GELU + 1x1 conv + BN on
the output; MLPs are 1x1 convs with Hardswish. Between stages a shrinking attention block takes its
queries from a stride-2 grid (``Nq = Nk / 4``, twice the heads, no attention residual). Head:
global average pool, Linear (and a distillation Linear when ``num_distill_classes`` is set, then
``forward`` returns ``(out, distill)``).

vit-pytorch 1.26.x layout and numerics:

- The position bias table is ``pos_bias``, an ``nn.Embedding(fmap_h * fmap_w, heads)`` weight
  ``[T, heads]``, indexed by ``pos_indices[i, j] = |dy| * fmap_w + |dx|`` between query ``i`` and key
  ``j`` (a persistent buffer, so it is in the state_dict as in vit-pytorch). It is passed to
  ``attend()`` as ``RelPosBias(table, pos_indices)``. vit-pytorch adds it to the *scaled* logits
  divided by the scale (``dots * scale + bias / scale``, i.e. the table times ``sqrt(dim_key)``); the
  official LeViT adds the table as is. fastvit keeps vit-pytorch's scaling, so its checkpoints load
  unchanged.
- The output BatchNorm of every attention block starts with zero gamma, so every attention block
  is a no-op at initialisation (and a shrinking block, which has no residual, outputs its BN bias).
- The stem is 4 stride-2 3x3 convs with nothing in between (the paper puts Hardswish between them);
  the shrinking blocks use ``mlp_mult=2`` and no dropout whatever the constructor says; both as in
  vit-pytorch.
- BatchNorm: outputs match vit-pytorch in eval mode (and in train mode with the same batch).

How fastvit runs it: after the stem, the blocks work on tokens ``(b, h*w, c)`` (as timm's LeViT
does), applying vit-pytorch's 1x1 convs as Linears on the same weights (``conv1x1``) and its
BatchNorm2d per token (``batchnorm``: statistics over all ``b*h*w`` positions, as on the map). Same
parameters, keys and function (rounding differences only); on the CPU it saves the layout copies
around every attention and the 1x1 projections run ~10% faster than 1x1 convs. The stride-2 query
projection of a shrinking block is the same Linear on every other row and column of the grid.

Deliberate differences from vit-pytorch:

- ``channels`` (vit-pytorch hard-codes 3 input channels) and ``(h, w)`` image sizes.
- The feature map size is the stem's actual output, ``ceil`` of the size halved four times.
  vit-pytorch sizes its tables for ``image_size // 16`` and crashes in ``forward`` when the image is
  not a multiple of 16; multiples of 16 (the only sizes vit-pytorch runs) are unaffected.
- The input must be exactly ``image_size`` (the bias tables are sized for it): anything else, and a
  wrong channel count, is a ``ValueError`` up front. Tuples for ``dim``/``depth``/``heads`` longer
  than ``stages`` are a ``ValueError`` (vit-pytorch asserts).
- ``num_classes=0`` returns the average-pooled features ``(b, dim_last)`` (``mlp_head`` an
  ``nn.Identity``); vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.

Intermediates (``forward_intermediates``, ``features_only``): each stage's map, strides 16, 32, 64.
"""

from __future__ import annotations

from math import ceil
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit.attention import RelPosBias
from fastvit.layers import (
    AttentionBase,
    BlockRunner,
    Linear,
    cast_tuple,
    check_image,
    merge_heads,
    mlp,
    pair,
    residual_block,
)

from .base import VisionModel
from .registry import register_model

__all__ = ["LeViT", "Attention", "Transformer", "FeedForward", "levit_pos_indices"]


def conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 conv (vit-pytorch's parameters) applied to tokens ``(b, n, c_in) -> (b, n, c_out)``."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def batchnorm(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """A BatchNorm2d applied to tokens ``(b, n, c)``: per-channel statistics over all ``b*n`` tokens."""
    return bn(x.reshape(-1, x.shape[-1], 1, 1)).view(x.shape)  # (b*n, c, 1, 1): a view both ways


def levit_pos_indices(fmap_size: tuple[int, int], stride: int = 1) -> Tensor:
    """``[Nq, Nk]`` indices into the ``[fmap_h * fmap_w, heads]`` bias table, as vit-pytorch builds them.

    Queries sit on the ``stride``-subsampled grid, keys on the full grid; the index of a pair is
    ``|dy| * fmap_w + |dx|`` (symmetric: only absolute offsets are learned).
    """
    fh, fw = fmap_size
    q_range_h, q_range_w = torch.arange(0, fh, stride), torch.arange(0, fw, stride)
    q_pos = torch.stack(torch.meshgrid(q_range_h, q_range_w, indexing="ij"), -1)
    k_pos = torch.stack(torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij"), -1)
    q_pos, k_pos = q_pos.reshape(-1, 2), k_pos.reshape(-1, 2)  # (nq, 2), (nk, 2)
    rel_pos = (q_pos[:, None, :] - k_pos[None, :, :]).abs()  # (nq, nk, 2)
    return rel_pos[..., 0] * fw + rel_pos[..., 1]


class FeedForward(nn.Module):
    """``Conv1x1 -> Hardswish -> Dropout -> Conv1x1 -> Dropout``, on tokens. Keys ``net.0``, ``net.3``."""

    def __init__(self, dim: int, mult: int, dropout: float = 0.0):
        super().__init__()
        self.net = mlp(dim, dim * mult, dropout=dropout, norm=False, conv=True, activation=nn.Hardswish)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, n, dim) -> (b, n, dim)``."""
        conv_in, act, drop_hidden, conv_out, drop_out = self.net
        return drop_out(conv1x1(conv_out, drop_hidden(act(conv1x1(conv_in, x)))))


class Attention(AttentionBase):
    """LeViT attention over the tokens of a feature map, with a relative position bias and optional
    query subsampling.

    Keys: ``to_q``/``to_k``/``to_v`` (``.0`` conv, ``.1`` BN), ``to_out.1`` (conv), ``to_out.2`` (BN),
    ``pos_bias.weight`` ``[fmap_h * fmap_w, heads]``, ``pos_indices`` ``[Nq, Nk]``.

    Args:
        dim: input channels. fmap_size: ``(h, w)`` of the input map (the bias table is sized for it).
        heads: heads. dim_key: q/k width per head. dim_value: v width per head.
        dropout: probability and output dropout. dim_out: output channels (default ``dim``).
        downsample: queries from the stride-2 grid, so the output map is ``ceil(h / 2) x ceil(w / 2)``.
    """

    def __init__(self, dim: int, fmap_size, heads: int = 8, dim_key: int = 32, dim_value: int = 64,
                 dropout: float = 0.0, dim_out: Optional[int] = None, downsample: bool = False):
        super().__init__(attn_dropout=dropout)
        inner_dim_key = dim_key * heads
        inner_dim_value = dim_value * heads
        dim_out = dim if dim_out is None else dim_out
        stride = 2 if downsample else 1
        fmap_size = pair(fmap_size)

        self.heads = heads
        self.dim_key = dim_key
        self.scale = dim_key ** -0.5
        self.fmap_size = fmap_size
        self.downsample = downsample

        self.to_q = nn.Sequential(nn.Conv2d(dim, inner_dim_key, 1, stride=stride, bias=False),
                                  nn.BatchNorm2d(inner_dim_key))
        self.to_k = nn.Sequential(nn.Conv2d(dim, inner_dim_key, 1, bias=False),
                                  nn.BatchNorm2d(inner_dim_key))
        self.to_v = nn.Sequential(nn.Conv2d(dim, inner_dim_value, 1, bias=False),
                                  nn.BatchNorm2d(inner_dim_value))

        out_batch_norm = nn.BatchNorm2d(dim_out)
        nn.init.zeros_(out_batch_norm.weight)
        self.to_out = nn.Sequential(nn.GELU(), nn.Conv2d(inner_dim_value, dim_out, 1), out_batch_norm,
                                    nn.Dropout(dropout))

        self.pos_bias = nn.Embedding(fmap_size[0] * fmap_size[1], heads)
        self.register_buffer("pos_indices", levit_pos_indices(fmap_size, stride))

    def forward(self, x: Tensor) -> Tensor:
        """``(b, fmap_h * fmap_w, dim)`` tokens in row-major grid order -> ``(b, nq, dim_out)``."""
        b, n, c = x.shape
        x_q = x
        if self.downsample:  # the stride-2 1x1 conv: every other row and column of the grid
            x_q = x.view(b, *self.fmap_size, c)[:, ::2, ::2].reshape(b, -1, c)  # (b, nq, c)
        # (b, n, h*d) -> (b, h, n, d) views; heads are the outer channel factor as in vit-pytorch.
        q = batchnorm(self.to_q[1], conv1x1(self.to_q[0], x_q)).view(b, -1, self.heads, self.dim_key)
        k = batchnorm(self.to_k[1], conv1x1(self.to_k[0], x)).view(b, n, self.heads, -1)
        v = batchnorm(self.to_v[1], conv1x1(self.to_v[0], x)).view(b, n, self.heads, -1)
        # vit-pytorch adds bias / scale to the scaled logits: the table in logit units is table / scale.
        bias = RelPosBias(self.pos_bias.weight / self.scale, self.pos_indices)
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale,
                          bias=bias)  # (b, h, nq, dv)
        out = merge_heads(out)  # (b, nq, h*dv)
        gelu, conv, norm, dropout = self.to_out
        return dropout(batchnorm(norm, conv1x1(conv, gelu(out))))


def shrinking_block(block: nn.ModuleList, x: Tensor) -> Tensor:
    """A block without the attention residual (it subsamples or changes the width)."""
    attn, ff = block
    x = attn(x)
    return ff(x) + x


class Transformer(BlockRunner, nn.Module):
    """``depth`` x (attention, MLP) on tokens; the attention residual is dropped when the block
    subsamples or changes the width."""

    def __init__(self, dim: int, fmap_size, depth: int, heads: int, dim_key: int, dim_value: int,
                 mlp_mult: int = 2, dropout: float = 0.0, dim_out: Optional[int] = None,
                 downsample: bool = False):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        self.layers = nn.ModuleList([])
        self.attn_residual = (not downsample) and dim == dim_out
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                Attention(dim, fmap_size=fmap_size, heads=heads, dim_key=dim_key, dim_value=dim_value,
                          dropout=dropout, downsample=downsample, dim_out=dim_out),
                FeedForward(dim_out, mlp_mult, dropout=dropout),
            ]))

    def forward(self, x: Tensor) -> Tensor:
        block_fn = residual_block if self.attn_residual else shrinking_block
        for block in self.layers:
            x = self.run_block(block_fn, block, x)
        return x


def _halved(fmap: tuple[int, int]) -> tuple[int, int]:
    """A stride-2 map: ``ceil`` of each side halved (3x3 pad 1 convs and 1x1 stride-2 convs alike)."""
    return ceil(fmap[0] / 2), ceil(fmap[1] / 2)


class LeViT(VisionModel):
    """LeViT with vit-pytorch's constructor (plus ``channels``).

    Args:
        image_size: int or (h, w); the exact input size.
        num_classes: classifier width.
        dim: width per stage (int or tuple, padded with its last value to ``stages``).
        depth: blocks per stage (int or tuple). heads: heads per stage (int or tuple); the shrinking
            block after a stage uses twice that stage's heads.
        mlp_mult: MLP expansion. stages: number of stages. dim_key: q/k width per head.
        dim_value: v width per head. dropout: attention/MLP dropout.
        num_distill_classes: adds a distillation head; ``forward`` then returns ``(out, distill)``.
        channels: input channels.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = ("mlp_head", "distill_head")

    def __init__(self, *, image_size, num_classes, dim, depth, heads, mlp_mult, stages=3, dim_key=32,
                 dim_value=64, dropout=0.0, num_distill_classes=None, channels=3, legacy_num_classes_zero=False):
        super().__init__()
        # A shorter tuple is padded with its last value, as in vit-pytorch.
        dims, depths = cast_tuple(dim, stages, "dim", pad=True), cast_tuple(depth, stages, "depth", pad=True)
        layer_heads = cast_tuple(heads, stages, "heads", pad=True)
        self.image_size = pair(image_size)
        self.channels = channels
        self.num_distill_classes = num_distill_classes

        self.conv_embedding = nn.Sequential(
            nn.Conv2d(channels, 32, 3, stride=2, padding=1),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.Conv2d(128, dims[0], 3, stride=2, padding=1),
        )

        fmap_size = self.image_size
        for _ in range(4):
            fmap_size = _halved(fmap_size)
        layers, self.stage_fmaps = [], []
        for ind, (stage_dim, stage_depth, stage_heads) in enumerate(zip(dims, depths, layer_heads)):
            layers.append(Transformer(stage_dim, fmap_size, stage_depth, stage_heads, dim_key, dim_value,
                                      mlp_mult, dropout))
            self.stage_fmaps.append(fmap_size)
            if ind < stages - 1:
                layers.append(Transformer(stage_dim, fmap_size, 1, stage_heads * 2, dim_key, dim_value,
                                          dim_out=dims[ind + 1], downsample=True))
                fmap_size = _halved(fmap_size)
        self.backbone = nn.Sequential(*layers)
        self.fmap_size = fmap_size  # of the last stage

        self.distill_head = None
        if num_distill_classes is not None:
            self.distill_head = Linear(dims[-1], num_distill_classes)
        self.mlp_head = Linear(dims[-1], num_classes)
        self.set_head(dims[-1], num_classes, legacy_num_classes_zero)
        self.set_feature_info(dims, [16 * 2 ** i for i in range(stages)], [f"backbone.{2 * i}" for i in range(stages)])

    def forward_features(self, img: Tensor) -> Tensor:
        """The last stage's feature map ``(b, dim_last, h / 64, w / 64)`` (ceil; a view of its tokens)."""
        check_image(img, channels=self.channels, max_size=self.image_size, allow_smaller=False)
        # The stem runs channels-last: oneDNN's (and cuDNN's) NHWC convolutions are faster here (2.3 -> 1.9 ms
        # of a batch-2 fp32 CPU forward of LeViT-128S), and its output is then already the contiguous
        # tokens (b, n, dim) every block's projections read: flatten + transpose is a view, not a copy.
        x = self.conv_embedding(img.contiguous(memory_format=torch.channels_last))  # (b, dim, h / 16, w / 16)
        x = x.flatten(2).transpose(1, 2).contiguous()
        for i, layer in enumerate(self.backbone):  # stages, each but the last followed by a shrinking block
            x = layer(x)  # (b, n, dim)
            if self.taps is not None and i % 2 == 0:  # a stage's output as a map (b, dim, h, w), a view
                self.tap(x.transpose(1, 2).unflatten(2, self.stage_fmaps[i // 2]))
        return x.transpose(1, 2).unflatten(2, self.fmap_size)

    def pool_features(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))  # (b, c): global average pool

    def classify(self, x: Tensor):
        """Logits, and ``(logits, distill_logits)`` with a distillation head."""
        out = self.mlp_head(x)
        if self.distill_head is None:
            return out
        return out, self.distill_head(x)


# Paper configs (Table 2; timm's levit_*): widths, depths and heads per stage, key width D per head
# (16 or 32), value width 2 D (attention ratio 2), MLP ratio 2.
_SMALL = dict(image_size=64, num_classes=10, stages=3, dim=(32, 48, 64), depth=1, heads=(1, 2, 2), mlp_mult=2,
              dim_key=16, dim_value=32)

# vit-pytorch's stem is four stride-2 3x3 convs of 32, 64, 128 and dim[0] channels; timm's (the paper's) has
# dim[0] / 8, / 4, / 2 and dim[0]: at LeViT-128S the stem does 3.2x the FLOPs of timm's (311 vs 98 MFLOP per
# image; 3.4 vs 1.3 ms of a batch-2 fp32 CPU forward), so x timm compares two models, not two
# implementations of one.
_TIMM_NOTE = ("vit-pytorch's conv stem (32-64-128-dim channels) does 3.2x the FLOPs of timm's (dim/8-dim/4-dim/2-dim): "
              "x timm compares different models; patch_timm (--timm-patch levit) compares implementations")

for _name, _kw in {
    "levit_128s": dict(dim=(128, 256, 384), depth=(2, 3, 4), heads=(4, 6, 8), dim_key=16, dim_value=32),
    "levit_128": dict(dim=(128, 256, 384), depth=(4, 4, 4), heads=(4, 8, 12), dim_key=16, dim_value=32),
    "levit_192": dict(dim=(192, 288, 384), depth=(4, 4, 4), heads=(3, 5, 6), dim_key=32, dim_value=64),
    "levit_256": dict(dim=(256, 384, 512), depth=(4, 4, 4), heads=(4, 6, 8), dim_key=32, dim_value=64),
    "levit_384": dict(dim=(384, 512, 768), depth=(4, 4, 4), heads=(6, 9, 12), dim_key=32, dim_value=64),
}.items():
    register_model(_name, LeViT, vit_pytorch="vit_pytorch.levit:LeViT", timm=_name, test_overrides=_SMALL,
                   timm_note=_TIMM_NOTE,
                   image_size=224, num_classes=1000, stages=3, mlp_mult=2, **_kw)
