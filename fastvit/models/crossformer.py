"""CrossFormer: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention"
(Wang et al., arXiv 2108.00154).

Four stages on the feature map ``(b, c, h, w)``, each a cross-scale embedding (convs of several
kernel sizes with the same stride, concatenated on channels) and blocks that alternate

- short-distance attention (SDA): attention inside ``G x G`` windows of adjacent positions;
- long-distance attention (LDA): attention among the ``I x I`` positions sampled at a stride of
  ``h / I`` (one "dilated window" per offset), so every group spans the whole map;

both are windows of one ``attend()`` call, with a dynamic position bias: a small MLP maps each
relative offset ``(dy, dx)`` to a bias shared by all heads (``DenseBias``, differentiable into the
MLP). Conv MLPs, pre-norm (channel LayerNorm), residual; head: global average pool + Linear.

vit-pytorch 1.26.x layout: ``layers.{0..3}`` = (CrossEmbedLayer ``convs``, Transformer), attention
keys ``norm``, ``to_qkv`` (1x1 conv, no bias), ``to_out`` (1x1 conv), ``dpb.{0,1,3,4,6,7,9}``, heads
``dim // dim_head`` with ``dim_head = 32``; MLP keys ``0/1/4`` (no dropout after the last conv);
``to_logits.1`` the classifier.

Deliberate differences from vit-pytorch:

- Dynamic position bias: vit-pytorch evaluates its MLP at the ``(2G + 1)^2`` offsets
  ``-G..G`` but looks the results up with indices built for the ``(2G - 1)^2`` offsets
  ``-(G-1)..G-1``, so the bias of offset ``(dy, dx)`` is the MLP's output at another offset. fastvit
  evaluates the MLP at the offsets it looks up. ``legacy_dpb_offsets=True`` restores vit-pytorch's
  lookup (same weights, vit-pytorch's outputs).
- Input sizes are checked up front: every stage's map must divide into its SDA and LDA windows
  (vit-pytorch fails inside a rearrange); wrong tuple lengths raise ``ValueError``.
- The map is never cut into groups (vit-pytorch cuts first, then norms and projects each group):
  the pre-norm and the q/k/v 1x1 conv run once on the whole map (per pixel, the same results) and
  each attention is one ``attend(..., window=...)`` call (``fastvit.layers.WindowAttention``; the long
  distance groups are dilated windows), so a backend with a window kernel reads them in place.
- The channel LayerNorm uses two means (``fastvit.layers.ChanLayerNorm``) instead of ``torch.var``: rounding
  differences only (~1e-6 in fp32).
"""

from __future__ import annotations

import math

import torch
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn

from fastvit.attention import DenseBias, Window
from fastvit.layers import BlockRunner, Linear, WindowAttention, cast_tuple, check_image, mlp

from .base import VisionModel
from .registry import register_model

__all__ = ["CrossFormer", "CrossEmbedLayer", "DynamicPositionBias", "Attention", "Transformer", "FeedForward"]


class CrossEmbedLayer(nn.Module):
    """Convs of several kernel sizes and one stride, concatenated on channels (smallest kernel first;
    channel shares ``dim_out / 2, / 4, ...``, the rest to the largest kernel). Keys ``convs.{i}``."""

    def __init__(self, dim_in: int, dim_out: int, kernel_sizes, stride: int = 2):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        dim_scales = [int(dim_out / (2 ** i)) for i in range(1, len(kernel_sizes))]
        dim_scales = [*dim_scales, dim_out - sum(dim_scales)]
        self.stride = stride
        self.convs = nn.ModuleList([
            nn.Conv2d(dim_in, dim_scale, kernel, stride=stride, padding=(kernel - stride) // 2)
            for kernel, dim_scale in zip(kernel_sizes, dim_scales)
        ])

    def output_size(self, size: int) -> int:
        """Side of the output map for an input side (every conv must agree, or concatenation fails)."""
        sizes = {(size + 2 * c.padding[0] - c.kernel_size[0]) // self.stride + 1 for c in self.convs}
        if len(sizes) != 1:
            raise ValueError(f"a {size}-pixel side gives maps of sides {sorted(sizes)} for the kernels "
                             f"{[c.kernel_size[0] for c in self.convs]} at stride {self.stride}")
        return sizes.pop()

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


def DynamicPositionBias(dim: int) -> nn.Sequential:  # noqa: N802 - vit-pytorch's name
    """MLP ``(dy, dx) -> bias``: 3 x (Linear, LayerNorm, ReLU), then Linear to one value."""
    return nn.Sequential(
        nn.Linear(2, dim), nn.LayerNorm(dim), nn.ReLU(),
        nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(),
        nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(),
        nn.Linear(dim, 1), Rearrange("... () -> ..."),
    )


def FeedForward(dim: int, mult: int = 4, dropout: float = 0.0) -> nn.Sequential:  # noqa: N802
    """``ChanLayerNorm -> Conv1x1 -> GELU -> Dropout -> Conv1x1`` (no dropout after it). Keys ``0``, ``1``, ``4``."""
    return mlp(dim, dim * mult, dropout=dropout, out_dropout=False, conv=True)


class Attention(WindowAttention):
    """Short- (``attn_type='short'``) or long-distance (``'long'``) attention over ``window_size^2``
    positions, with the dynamic position bias. Keys ``norm``, ``to_qkv``, ``to_out``, ``dpb``.

    Both are one ``attend(window=...)`` call on the whole map: short distance ``Window(size=(G, G))``,
    long distance ``Window(size=(I, I), dilation=(h // I, w // I))`` (position ``(i, j)`` of group
    ``(y, x)`` is map position ``(i * h / I + y, j * w / I + x)``).
    """

    def __init__(self, dim: int, attn_type: str, window_size: int, dim_head: int = 32, dropout: float = 0.0,
                 legacy_dpb_offsets: bool = False):
        if attn_type not in ("short", "long"):
            raise ValueError(f"attn_type must be 'short' or 'long', got {attn_type!r}")
        heads = dim // dim_head
        super().__init__(dim, heads=heads, dim_head=dim_head, window_size=window_size, dilated=attn_type == "long",
                         conv=True, attn_dropout=dropout, proj_dropout=None)  # to_out: a bare conv
        self.attn_type = attn_type
        self.legacy_dpb_offsets = legacy_dpb_offsets
        self.dpb = DynamicPositionBias(dim // 4)

        w = window_size
        pos = torch.arange(w)
        grid = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).flatten(1).t()  # (w*w, 2)
        rel = grid[:, None] - grid[None, :] + (w - 1)  # offsets shifted to 0..2w-2
        self.register_buffer("rel_pos_indices", rel[..., 0] * (2 * w - 1) + rel[..., 1], persistent=False)

    def position_bias(self) -> Tensor:
        """``(w*w, w*w)``: the bias of every (query, key) pair of a window, shared by all heads."""
        w = self.window_size[0]
        # The offsets rel_pos_indices enumerates: -(w-1)..w-1 per axis (vit-pytorch: -w..w, mismatched).
        radius = w if self.legacy_dpb_offsets else w - 1
        pos = torch.arange(-radius, radius + 1, device=self.rel_pos_indices.device)
        offsets = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).flatten(1).t()
        return self.dpb(offsets.to(self.to_qkv.weight.dtype))[self.rel_pos_indices]

    def attention_bias(self, window: Window) -> DenseBias:
        return DenseBias(self.position_bias())  # (n, n): broadcast over windows and heads


def crossformer_block(block: nn.ModuleList, x: Tensor) -> Tensor:
    """SDA, MLP, LDA, MLP, each residual."""
    for module in block:
        x = module(x) + x
    return x


class Transformer(BlockRunner, nn.Module):
    """``depth`` x (SDA, MLP, LDA, MLP), each residual. Keys ``layers.{i}.{0..3}``."""

    def __init__(self, dim: int, *, local_window_size: int, global_window_size: int, depth: int = 4,
                 dim_head: int = 32, attn_dropout: float = 0.0, ff_dropout: float = 0.0,
                 legacy_dpb_offsets: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                Attention(dim, "short", local_window_size, dim_head, attn_dropout, legacy_dpb_offsets),
                FeedForward(dim, dropout=ff_dropout),
                Attention(dim, "long", global_window_size, dim_head, attn_dropout, legacy_dpb_offsets),
                FeedForward(dim, dropout=ff_dropout),
            ])
            for _ in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = self.run_block(crossformer_block, block, x)
        return x


class CrossFormer(VisionModel):
    """CrossFormer with vit-pytorch's constructor (``vit_pytorch.crossformer.CrossFormer``).

    Args:
        dim, depth, global_window_size, local_window_size, cross_embed_kernel_sizes, cross_embed_strides:
            per stage (a value or a tuple of 4).
        num_classes: classifier width. attn_dropout, ff_dropout: dropouts. channels: input channels.
        legacy_dpb_offsets: vit-pytorch's mismatched dynamic-position-bias lookup (module docstring).
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)`` (``(b, 0)`` out);
            by default the classifier is an ``nn.Identity`` and the model returns the pooled features.

    Intermediates (``forward_intermediates``, ``features_only``): the four stage maps (strides 4, 8,
    16, 32 with the default cross-embedding strides).
    """

    classifier_path = "to_logits.1"

    def __init__(self, *, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
                 local_window_size=7, cross_embed_kernel_sizes=((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
                 cross_embed_strides=(4, 2, 2, 2), num_classes=1000, attn_dropout=0.0, ff_dropout=0.0, channels=3,
                 legacy_dpb_offsets=False, legacy_num_classes_zero=False):
        super().__init__()
        dim = cast_tuple(dim, 4, "dim")
        depth = cast_tuple(depth, 4, "depth")
        global_window_size = cast_tuple(global_window_size, 4, "global_window_size")
        local_window_size = cast_tuple(local_window_size, 4, "local_window_size")
        cross_embed_kernel_sizes = cast_tuple(cross_embed_kernel_sizes, 4, "cross_embed_kernel_sizes")
        cross_embed_strides = cast_tuple(cross_embed_strides, 4, "cross_embed_strides")
        self.channels = channels
        self.windows = list(zip(local_window_size, global_window_size))
        dims = [channels, *dim]
        self.layers = nn.ModuleList([
            nn.ModuleList([
                CrossEmbedLayer(dims[i], dims[i + 1], cross_embed_kernel_sizes[i], stride=cross_embed_strides[i]),
                Transformer(dims[i + 1], local_window_size=local_window_size[i],
                            global_window_size=global_window_size[i], depth=depth[i], attn_dropout=attn_dropout,
                            ff_dropout=ff_dropout, legacy_dpb_offsets=legacy_dpb_offsets),
            ])
            for i in range(4)
        ])
        self.to_logits = nn.Sequential(Reduce("b c h w -> b c", "mean"), Linear(dim[-1], num_classes))
        self.set_head(dim[-1], num_classes, legacy_num_classes_zero)
        self.set_feature_info(dim, [math.prod(cross_embed_strides[: i + 1]) for i in range(4)], "layers")

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless every stage's map divides into its short- and long-distance windows."""
        h, w = height, width
        for i, ((cel, _), (local, glob)) in enumerate(zip(self.layers, self.windows), start=1):
            h, w = cel.output_size(h), cel.output_size(w)
            for kind, size in (("short-distance", local), ("long-distance", glob)):
                if h % size or w % size:
                    raise ValueError(f"image size {(height, width)}: stage {i}'s {h}x{w} map does not divide into "
                                     f"{size}x{size} {kind} attention groups")

    def forward_features(self, img: Tensor) -> Tensor:
        """The last stage's feature map ``(b, dim[-1], h/32, w/32)`` (default strides)."""
        check_image(img, channels=self.channels, max_size=None)
        self.check_size(int(img.shape[-2]), int(img.shape[-1]))  # ints even while jit-traced
        x = img
        for cel, transformer in self.layers:
            x = self.tap(transformer(cel(x)))
        return x

    def pool_features(self, x: Tensor) -> Tensor:
        return self.to_logits[0](x)


# Small enough for CPU tests: 64 px -> 16/8/4/2 maps, 2x2 short windows, 2/2/2/1 long groups.
_SMALL = dict(dim=(32, 32, 64, 64), depth=(1, 1, 1, 1), global_window_size=(2, 2, 2, 1), local_window_size=2,
              cross_embed_kernel_sizes=((4, 8), (2, 4), (2, 4), (2, 4)), num_classes=10)

# vit-pytorch's defaults, which the seed README uses.
register_model("crossformer_seed_224", CrossFormer, vit_pytorch="vit_pytorch.crossformer:CrossFormer",
               test_overrides=_SMALL, input_size=(3, 224, 224), test_input_size=(3, 64, 64),
               vit_pytorch_compat={"legacy_dpb_offsets": True}, num_classes=1000)
