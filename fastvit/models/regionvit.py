"""RegionViT: "RegionViT: Regional-to-Local Attention for Vision Transformers" (Chen et al.,
arXiv 2106.02689).

Two token sets: local tokens (a conv patch embedding, stride 4) and region tokens (one per
``region_patch_size``-pixel region, ``window_size`` local tokens on a side). Each regional-to-local
(R2L) block first runs self-attention among the region tokens of an image, then, for every region,
self-attention over ``[its region token; its window of local tokens]`` with a learned relative
position bias between local tokens (``RelPosBias``: a table of ``(2w - 1)^2`` offsets per head, plus
a zero entry for the pairs that involve the region token), then an MLP; both attentions share one
module's weights. Four stages, downsampling both token maps by a stride-2 conv between them; the
head pools the region tokens.

The local attention stays a batch of ``[region; window]`` sequences rather than an
``attend(..., window=Window(...))`` call: every window attends with one extra token, its region's,
which is not a token of the local grid, and a ``Window`` is defined over the raster tokens of one
grid only (``Nq = Nk = H*W``). Expressing it would need a per-window prefix token in the window
contract; until then the model cuts its windows (one copy each way, as vit-pytorch does).

vit-pytorch 1.26.x layout and numerics: ``local_encoder`` (one 8x8 stride-4 conv, or three convs
with channel LayerNorms when ``tokenize_local_3_conv``), ``region_encoder.1`` (a 1x1 conv on
flattened regions), ``layers.{i}`` = (Downsample ``conv``, PEG ``proj``, R2LTransformer with
``local_rel_pos_bias`` and ``layers.{j}.{0,1}``), attention ``fastvit.layers.Attention`` (keys
``norm``, ``to_qkv``, ``to_out.0``; 4 heads of width 32), MLP keys ``0/1/4``, ``to_logits.{1,2}``.

Deliberate differences from vit-pytorch:

- The local encoder takes ``channels`` input channels (vit-pytorch builds it for 3 whatever
  ``channels`` says, so any other value fails there; with 3 the weights and outputs are the same).
- Sizes are checked up front: the image must divide into regions and local patches, and at every
  stage each region must cover a whole window of at most ``window_size`` local tokens on a side
  (vit-pytorch asserts the first two and fails inside a rearrange or an embedding lookup otherwise).
- Wrong tuple lengths raise ``ValueError``.
- The channel LayerNorm uses two means (``fastvit.layers.ChanLayerNorm``) instead of ``torch.var``: rounding
  differences only (~1e-6 in fp32).
- ``num_classes=0`` returns the pooled, normed region features ``(b, dim[-1])`` (``to_logits.2`` an
  ``nn.Identity``); vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.

Intermediates (``forward_intermediates``, ``features_only``): each stage's *local* token map (the
dense one a detection or segmentation head wants), strides 4, 8, 16, 32; ``forward_features`` returns
the last stage's region tokens, which the head pools.
"""

from __future__ import annotations

import torch
from einops import rearrange
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn

from fastvit.attention import RelPosBias
from fastvit.layers import PEG, Attention, BlockRunner, ChanLayerNorm, Linear, cast_tuple, check_image, mlp

from .base import VisionModel
from .registry import register_model

__all__ = ["RegionViT", "R2LTransformer", "Attention", "Downsample", "PEG", "FeedForward"]


class Downsample(nn.Module):
    """3x3 stride-2 conv. Keys ``conv``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def FeedForward(dim: int, mult: int = 4, dropout: float = 0.0) -> nn.Sequential:  # noqa: N802 - vit-pytorch's name
    """``LayerNorm -> Linear -> GELU -> Dropout -> Linear`` on tokens. Keys ``0``, ``1``, ``4``."""
    return mlp(dim, dim * mult, dropout=dropout, out_dropout=False)


def r2l_block(block: nn.ModuleList, local_tokens: Tensor, region_tokens: Tensor, bias: RelPosBias):
    """One R2L block: region self-attention, then ``[region; window]`` attention, then the MLP.

    ``local_tokens (b * regions, wh*ww, d)``, ``region_tokens (b, regions, d)``; returns both updated.
    """
    attn, ff = block
    b = region_tokens.shape[0]
    region_tokens = attn(region_tokens) + region_tokens
    tokens = torch.cat((region_tokens.reshape(-1, 1, region_tokens.shape[-1]), local_tokens), dim=1)
    tokens = attn(tokens, bias=bias) + tokens
    tokens = ff(tokens) + tokens
    return tokens[:, 1:], tokens[:, :1].reshape(b, -1, tokens.shape[-1])


class R2LTransformer(BlockRunner, nn.Module):
    """``depth`` x (region self-attention; [region; window] attention with the local relative position
    bias; MLP), residual. Keys ``local_rel_pos_bias``, ``layers.{i}.{0,1}``."""

    def __init__(self, dim: int, *, window_size: int, depth: int = 4, heads: int = 4, dim_head: int = 32,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.heads = heads
        self.local_rel_pos_bias = nn.Embedding((2 * window_size - 1) ** 2, heads)
        self.layers = nn.ModuleList([
            nn.ModuleList([Attention(dim, heads=heads, dim_head=dim_head, dropout=attn_dropout),
                           FeedForward(dim, dropout=ff_dropout)])
            for _ in range(depth)
        ])

    def bias_index(self, wh: int, ww: int, device) -> Tensor:
        """``(1 + wh*ww, 1 + wh*ww)`` rows of the bias table: vit-pytorch's offsets between local tokens
        (``dy + (w-1) + (dx + (w-1)) * (2w-1)``), and the extra zero row for pairs with the region token.
        Built once per window shape and device (its range check then runs once too)."""
        key = (wh, ww, str(device))
        cache = self.__dict__.setdefault("_bias_index_cache", {})
        if key not in cache:
            with torch.inference_mode(False), torch.no_grad():
                cache[key] = self._build_bias_index(wh, ww, device)
        return cache[key]

    def _build_bias_index(self, wh: int, ww: int, device) -> Tensor:
        w = self.window_size
        grid = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                          indexing="ij")).flatten(1)  # (2, n)
        rel = grid[:, :, None] - grid[:, None, :] + (w - 1)
        local = rel[0] + rel[1] * (2 * w - 1)
        zero_row = (2 * w - 1) ** 2
        index = torch.full((1 + wh * ww, 1 + wh * ww), zero_row, dtype=torch.long, device=device)
        index[1:, 1:] = local
        return index

    def forward(self, local_tokens: Tensor, region_tokens: Tensor) -> tuple[Tensor, Tensor]:
        b, _, lh, lw = local_tokens.shape
        rh, rw = region_tokens.shape[-2:]
        wh, ww = lh // rh, lw // rw  # local tokens per region side
        table = self.local_rel_pos_bias.weight
        table = torch.cat((table, table.new_zeros(1, self.heads)))  # the zero entry of the region token
        bias = RelPosBias(table, self.bias_index(wh, ww, table.device))

        # Windows: (b * regions, wh*ww, d), regions in row-major order like the region tokens.
        local_tokens = rearrange(local_tokens, "b d (h p1) (w p2) -> (b h w) (p1 p2) d", p1=wh, p2=ww)
        region_tokens = rearrange(region_tokens, "b d h w -> b (h w) d")
        for block in self.layers:
            local_tokens, region_tokens = self.run_block(r2l_block, block, local_tokens, region_tokens, bias)
        local_tokens = rearrange(local_tokens, "(b h w) (p1 p2) d -> b d (h p1) (w p2)", b=b, h=rh, p1=wh)
        region_tokens = rearrange(region_tokens, "b (h w) d -> b d h w", h=rh)
        return local_tokens, region_tokens


class RegionViT(VisionModel):
    """RegionViT with vit-pytorch's constructor (``vit_pytorch.regionvit.RegionViT``).

    Args:
        dim, depth: per stage (a value or a tuple of 4). window_size: local tokens per region side.
        num_classes: classifier width. tokenize_local_3_conv: three-conv local encoder (smaller models).
        local_patch_size: pixels per local token side (the encoder's stride is 4 regardless, as in
            vit-pytorch). use_peg: PEG on the local tokens from stage 2 on.
        attn_dropout, ff_dropout: dropouts. channels: input channels.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = "to_logits.2"

    def __init__(self, *, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), window_size=7, num_classes=1000,
                 tokenize_local_3_conv=False, local_patch_size=4, use_peg=False, attn_dropout=0.0, ff_dropout=0.0,
                 channels=3, legacy_num_classes_zero=False):
        super().__init__()
        dim = cast_tuple(dim, 4, "dim")
        depth = cast_tuple(depth, 4, "depth")
        self.channels = channels
        self.window_size = window_size
        self.local_patch_size = local_patch_size
        self.region_patch_size = region = local_patch_size * window_size
        init_dim, last_dim = dim[0], dim[-1]
        if tokenize_local_3_conv:
            self.local_encoder = nn.Sequential(
                nn.Conv2d(channels, init_dim, 3, 2, 1), ChanLayerNorm(init_dim), nn.GELU(),
                nn.Conv2d(init_dim, init_dim, 3, 2, 1), ChanLayerNorm(init_dim), nn.GELU(),
                nn.Conv2d(init_dim, init_dim, 3, 1, 1),
            )
        else:
            self.local_encoder = nn.Conv2d(channels, init_dim, 8, 4, 3)
        self.region_encoder = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=region, p2=region),
            nn.Conv2d(region ** 2 * channels, init_dim, 1),
        )
        self.layers = nn.ModuleList()
        current = init_dim
        for i, (stage_dim, num_layers) in enumerate(zip(dim, depth)):
            self.layers.append(nn.ModuleList([
                Downsample(current, stage_dim) if i > 0 else nn.Identity(),
                PEG(stage_dim) if i > 0 and use_peg else nn.Identity(),
                R2LTransformer(stage_dim, depth=num_layers, window_size=window_size, attn_dropout=attn_dropout,
                               ff_dropout=ff_dropout),
            ]))
            current = stage_dim
        self.to_logits = nn.Sequential(Reduce("b c h w -> b c", "mean"), nn.LayerNorm(last_dim),
                                       Linear(last_dim, num_classes))
        self.set_head(last_dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info(dim, [4, 8, 16, 32], "layers")  # the local encoder's stride is 4

    def check_size(self, height: int, width: int, local_size: tuple) -> None:
        """ValueError unless every stage's regions cover whole windows of at most ``window_size`` tokens."""
        for what, p in (("region", self.region_patch_size), ("local patch", self.local_patch_size)):
            if height % p or width % p:
                raise ValueError(f"image size {(height, width)} must be divisible by the {what} size {p}")
        (lh, lw), (rh, rw) = local_size, (height // self.region_patch_size, width // self.region_patch_size)
        for stage in range(1, 5):
            if stage > 1:  # the stride-2 downsampling conv (padding 1) rounds up
                lh, lw, rh, rw = (-(-s // 2) for s in (lh, lw, rh, rw))
            if lh % rh or lw % rw or lh // rh > self.window_size or lw // rw > self.window_size:
                raise ValueError(f"image size {(height, width)}: at stage {stage} the {lh}x{lw} local tokens do not "
                                 f"split into whole windows of at most {self.window_size} tokens per side over "
                                 f"the {rh}x{rw} regions")

    def forward_features(self, img: Tensor) -> Tensor:
        """The region tokens of the last stage, ``(b, dim[-1], h', w')``."""
        check_image(img, channels=self.channels, max_size=None)
        local_tokens = self.local_encoder(img)
        self.check_size(*img.shape[-2:], local_size=tuple(local_tokens.shape[-2:]))
        region_tokens = self.region_encoder(img)
        for down, peg, transformer in self.layers:
            local_tokens, region_tokens = down(local_tokens), down(region_tokens)
            local_tokens = peg(local_tokens)
            local_tokens, region_tokens = transformer(local_tokens, region_tokens)
            self.tap(local_tokens)
        return region_tokens

    def pool_features(self, x: Tensor) -> Tensor:
        return self.to_logits[:2](x)


# Small enough for CPU tests: 2-token windows of 4-pixel local tokens, 64 px -> 16x16 local / 8x8 regions.
_SMALL = dict(dim=(16, 16, 32, 32), depth=(1, 1, 1, 1), window_size=2, num_classes=10)

# vit-pytorch's defaults, which the seed README uses.
register_model("regionvit_seed_224", RegionViT, vit_pytorch="vit_pytorch.regionvit:RegionViT", test_overrides=_SMALL,
               input_size=(3, 224, 224), test_input_size=(3, 64, 64), num_classes=1000)
