"""Twins-SVT: "Twins: Revisiting the Design of Spatial Attention in Vision Transformers" (Chu et al.,
arXiv 2104.13840).

Four stages on the feature map ``(b, c, h, w)``. Each stage embeds non-overlapping patches
(channel LayerNorm, 1x1 conv, channel LayerNorm), then alternates two attentions:

- locally-grouped self-attention (LSA): attention inside non-overlapping ``p x p`` windows, i.e. a
  batch of ``b * windows`` sequences of ``p*p`` tokens (no cross-window term);
- global sub-sampled attention (GSA): every position attends to keys/values taken by a ``k x k``
  stride-``k`` conv, i.e. reduced keys/values (``Nk = Nq / k^2``);

each followed by a conv MLP, all residual, and a positional encoding generator (PEG: a residual
depthwise conv) after the first block of the stage. The last stage has GSA only. Head: global
average pool + Linear.

vit-pytorch 1.26.x layout and numerics: ``layers.{0..3}`` = (PatchEmbedding, Transformer(depth 1),
PEG, Transformer(depth s{i}_depth)), ``layers.6`` the classifier; residual blocks keep their module
under ``fn``; attention has 8 heads of width 64 at every stage (vit-pytorch's fixed defaults),
1x1-conv projections (``to_q``, ``to_kv``, ``to_out.0``) and a channel LayerNorm ``norm``
(``(x - mean) / sqrt(var + eps) * g + b``).

Deliberate differences from vit-pytorch:

- ``channels`` sets the input channels (vit-pytorch: 3 only).
- Inputs are checked up front: the side must divide by the product of the patch sizes, and every
  stage with local attention must divide into its windows (vit-pytorch fails inside a rearrange).
- The local attention never cuts the map into windows (vit-pytorch cuts first and projects each
  window): its 1x1 q/k/v convs run once on the whole map (per pixel, so the same result) and one
  ``attend(..., window=Window(grid, size=(p, p)))`` call attends inside the windows
  (``fastvit.layers.WindowAttention``); a backend with a window kernel reads them in place.
- The channel LayerNorm uses two means (``fastvit.layers.ChanLayerNorm``) instead of ``torch.var``: the same
  function, rounding differences only (~1e-6 in fp32).
- GSA's ``k x k`` stride-``k`` key/value conv runs as one GEMM on the flattened patches (the same sums;
  the conv weight is used as it is stored), ~100x faster than oneDNN's conv for these shapes on a CPU.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from fastvit.layers import (
    PEG,
    AttentionBase,
    BlockRunner,
    ChanLayerNorm,
    FeedForward,
    Linear,
    Residual,
    WindowAttention,
    check_image,
    split_qkv,
)

from .base import VisionModel
from .registry import register_model

__all__ = ["TwinsSVT", "LocalAttention", "GlobalAttention", "Transformer", "PatchEmbedding", "PEG", "Residual"]

_STAGES = ("s1", "s2", "s3", "s4")


class PatchEmbedding(nn.Module):
    """``(b, c, h, w) -> (b, dim_out, h/p, w/p)``: flatten ``p x p`` patches channel-first, then
    ChanLayerNorm, 1x1 conv, ChanLayerNorm. Keys ``proj.0/1/2``."""

    def __init__(self, *, dim: int, dim_out: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Sequential(
            ChanLayerNorm(patch_size ** 2 * dim),
            nn.Conv2d(patch_size ** 2 * dim, dim_out, 1),
            ChanLayerNorm(dim_out),
        )

    def forward(self, fmap: Tensor) -> Tensor:
        p = self.patch_size
        return self.proj(rearrange(fmap, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p))


class LocalAttention(WindowAttention):
    """LSA: attention inside ``patch_size x patch_size`` windows, one ``attend(window=...)`` call on the
    whole map. Keys ``norm``, ``to_q``, ``to_kv``, ``to_out.0``. The map's sides must divide by
    ``patch_size``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, patch_size: int = 7):
        # vit-pytorch applies no dropout to the local probabilities, only after the output conv
        super().__init__(dim, heads=heads, dim_head=dim_head, window_size=patch_size, conv=True, fused_qkv=False,
                         attn_dropout=0.0, proj_dropout=dropout)
        self.patch_size = patch_size


class GlobalAttention(AttentionBase):
    """GSA: every position attends to keys/values of a ``k x k`` stride-``k`` conv (reduced KV).
    Keys ``norm``, ``to_q``, ``to_kv``, ``to_out.0``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, k: int = 7):
        super().__init__(attn_dropout=dropout)
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = ChanLayerNorm(dim)
        self.to_q = nn.Conv2d(dim, inner_dim, 1, bias=False)
        self.to_kv = nn.Conv2d(dim, inner_dim * 2, k, stride=k, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner_dim, dim, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        width = x.shape[-1]
        q = rearrange(self.to_q(x), "b (h d) x y -> b h (x y) d", h=self.heads)
        k, v = self.keys_values(x)
        out = self.attend(q, k, v, scale=self.scale)  # (b, h, x*y, d)
        return self.to_out(rearrange(out, "b h (x y) d -> b (h d) x y", y=width))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``to_kv`` (a k x k conv at stride k: non-overlapping patches) as one GEMM on the flattened
        patches, ``(b, h, n', d)`` each. The same sums as the conv; oneDNN runs this conv shape at 2-13
        GFLOP/s on a CPU (its whole-window kernels), the GEMM at ~200: Twins-SVT's GSA was half its time."""
        kh, kw = self.to_kv.kernel_size
        b, c, height, width = x.shape
        hk, wk = height // kh, width // kw  # the conv drops a remainder, as here
        patches = rearrange(x[..., : hk * kh, : wk * kw], "b c (x p1) (y p2) -> b (x y) (c p1 p2)", p1=kh, p2=kw)
        kv = F.linear(patches, self.to_kv.weight.flatten(1))  # (b, n', 2*h*d): k | v, heads outer
        return split_qkv(kv, self.heads, parts=2)  # (b, h, n', d) each


def twins_block(block: nn.ModuleList, x: Tensor) -> Tensor:
    """LSA, MLP, GSA, MLP: each a residual (``Residual``) or an identity."""
    local_attn, ff1, global_attn, ff2 = block
    return ff2(global_attn(ff1(local_attn(x))))


class Transformer(BlockRunner, nn.Module):
    """``depth`` x (LSA, MLP, GSA, MLP), each residual; without local attention (the last stage) the
    first two are identities. Keys ``layers.{i}.{0..3}.fn``."""

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64, mlp_mult: int = 4,
                 local_patch_size: int = 7, global_k: int = 7, dropout: float = 0.0, has_local: bool = True):
        super().__init__()
        def local(module: nn.Module) -> nn.Module:
            return Residual(module) if has_local else nn.Identity()

        self.layers = nn.ModuleList([
            nn.ModuleList([
                local(LocalAttention(dim, heads, dim_head, dropout, local_patch_size)),
                local(FeedForward(dim, dim * mlp_mult, dropout, conv=True)),
                Residual(GlobalAttention(dim, heads, dim_head, dropout, global_k)),
                Residual(FeedForward(dim, dim * mlp_mult, dropout, conv=True)),
            ])
            for _ in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = self.run_block(twins_block, block, x)
        return x


class TwinsSVT(VisionModel):
    """Twins-SVT with vit-pytorch's constructor (``vit_pytorch.twins_svt.TwinsSVT``).

    Args:
        num_classes: classifier width.
        s{1..4}_emb_dim: stage width. s{i}_patch_size: the stage's patch embedding stride.
        s{i}_local_patch_size: LSA window side (stages 1-3). s{i}_global_k: GSA key/value conv size and stride.
        s{i}_depth: blocks after the PEG (each stage has one more before it).
        peg_kernel_size: of the PEG's depthwise conv. dropout: attention / MLP dropout.
        channels: input channels.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)`` (``(b, 0)`` out);
            by default the classifier is an ``nn.Identity`` and the model returns the pooled features.

    Intermediates (``forward_intermediates``, ``features_only``): the four stage maps (strides 4, 8,
    16, 32 with the default patch sizes).
    """

    classifier_path = "layers.6"

    def __init__(self, *, num_classes,
                 s1_emb_dim=64, s1_patch_size=4, s1_local_patch_size=7, s1_global_k=7, s1_depth=1,
                 s2_emb_dim=128, s2_patch_size=2, s2_local_patch_size=7, s2_global_k=7, s2_depth=1,
                 s3_emb_dim=256, s3_patch_size=2, s3_local_patch_size=7, s3_global_k=7, s3_depth=5,
                 s4_emb_dim=512, s4_patch_size=2, s4_local_patch_size=7, s4_global_k=7, s4_depth=4,
                 peg_kernel_size=3, dropout=0.0, channels=3, legacy_num_classes_zero=False):
        super().__init__()
        args = dict(locals())
        self.channels = channels
        self.stage_configs = []
        dim = channels
        layers = []
        for prefix in _STAGES:
            cfg = {key[3:]: value for key, value in args.items() if key.startswith(f"{prefix}_")}
            has_local = prefix != "s4"
            self.stage_configs.append({**cfg, "has_local": has_local})
            block = dict(local_patch_size=cfg["local_patch_size"], global_k=cfg["global_k"], dropout=dropout,
                         has_local=has_local)
            layers.append(nn.Sequential(
                PatchEmbedding(dim=dim, dim_out=cfg["emb_dim"], patch_size=cfg["patch_size"]),
                Transformer(dim=cfg["emb_dim"], depth=1, **block),
                PEG(dim=cfg["emb_dim"], kernel_size=peg_kernel_size, wrapped=True),
                Transformer(dim=cfg["emb_dim"], depth=cfg["depth"], **block),
            ))
            dim = cfg["emb_dim"]
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), Rearrange("... () () -> ..."),
                                    Linear(dim, num_classes))
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        strides = [cfg["patch_size"] for cfg in self.stage_configs]
        self.set_feature_info([cfg["emb_dim"] for cfg in self.stage_configs],
                              [math.prod(strides[: i + 1]) for i in range(len(strides))], "layers")

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless every stage's patches, windows and GSA kernel fit an ``height x width`` input."""
        h, w = height, width
        for i, cfg in enumerate(self.stage_configs, start=1):
            p = cfg["patch_size"]
            if h % p or w % p:
                raise ValueError(f"image size {(height, width)}: stage {i} embeds {p}x{p} patches of a "
                                 f"{h}x{w} map, which it does not divide")
            h, w = h // p, w // p
            lp, k = cfg["local_patch_size"], cfg["global_k"]
            if cfg["has_local"] and (h % lp or w % lp):
                raise ValueError(f"image size {(height, width)}: stage {i}'s {h}x{w} map does not divide "
                                 f"into {lp}x{lp} local-attention windows")
            if h < k or w < k:
                raise ValueError(f"image size {(height, width)}: stage {i}'s {h}x{w} map is smaller than its "
                                 f"{k}x{k} global-attention key/value kernel")

    def forward_features(self, img: Tensor) -> Tensor:
        """The last stage's feature map ``(b, s4_emb_dim, h/32, w/32)`` (default patch sizes)."""
        check_image(img, channels=self.channels, max_size=None)
        self.check_size(*img.shape[-2:])
        x = img
        for stage in self.layers[:4]:
            x = self.tap(stage(x))
        return x

    def pool_features(self, x: Tensor) -> Tensor:
        return self.layers[4:6](x)


# Small enough for CPU tests: 64 px -> 16/8/4/2 maps, 2x2 windows, 2x2 (then 1x1) GSA kernels.
_SMALL = dict(num_classes=10,
              s1_emb_dim=16, s1_patch_size=4, s1_local_patch_size=2, s1_global_k=2, s1_depth=1,
              s2_emb_dim=24, s2_patch_size=2, s2_local_patch_size=2, s2_global_k=2, s2_depth=1,
              s3_emb_dim=32, s3_patch_size=2, s3_local_patch_size=2, s3_global_k=2, s3_depth=1,
              s4_emb_dim=32, s4_patch_size=2, s4_local_patch_size=2, s4_global_k=1, s4_depth=1)

# vit-pytorch's defaults, which the seed README uses: widths 64-512, depths 1/1/5/4 after the PEG
# (the paper's Twins-SVT-S has 2/2/10/4 blocks and 2-16 heads; vit-pytorch uses 8 heads throughout).
register_model("twins_svt_seed_224", TwinsSVT, vit_pytorch="vit_pytorch.twins_svt:TwinsSVT", test_overrides=_SMALL,
               input_size=(3, 224, 224), test_input_size=(3, 64, 64), num_classes=1000)
