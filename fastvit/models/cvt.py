"""CvT: "CvT: Introducing Convolutions to Vision Transformers" (Wu et al., arXiv 2103.15808).

Three stages, each a strided conv embedding (overlapping patches) + channel LayerNorm, then
pre-norm transformer blocks working on the feature map ``(b, c, h, w)``: q, k, v come from
depthwise-separable conv projections (depthwise kxk, BatchNorm, pointwise 1x1), with keys and
values taken at stride ``kv_proj_stride`` (reduced-KV attention: ``Nk ~ Nq / 4``); MLPs are 1x1
convs. No position embedding and no CLS token; head: global average pool + Linear.

vit-pytorch 1.26.x layout and numerics: ``layers.{0,1,2}`` = (conv, channel LayerNorm, Transformer),
``to_logits.2`` the classifier, the channel LayerNorm ``(x - mean) / sqrt(var + eps) * g + b`` with
``g``, ``b`` of shape ``(1, c, 1, 1)`` (the seed-era ``/ (std + eps)`` changed in later releases),
a fixed head width of 64 (``heads * 64`` inner width), ``channels``.

Deliberate differences from vit-pytorch:

- A wrong channel count (or a non-image input) raises ``ValueError`` up front. Any image size works,
  as in vit-pytorch (the model is fully convolutional).
- The channel LayerNorm computes the variance as the mean of the centred squares and multiplies by
  ``rsqrt`` (``torch.var`` over the channel axis is several times slower on the CPU): the same
  function, rounding differences only (~1e-6 in fp32).
- ``num_classes=0`` returns the average-pooled features ``(b, s3_emb_dim)`` (``to_logits.2`` an
  ``nn.Identity``); vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.

Intermediates (``forward_intermediates``, ``features_only``): the three stage maps, strides 4, 8, 16
with the default embeddings.
"""

from __future__ import annotations

from einops.layers.torch import Rearrange
from torch import Tensor, nn

from fastvit.layers import (
    AttentionBase,
    ChanLayerNorm,
    DepthWiseConv2d,
    FeedForward,
    Linear,
    ResidualBlocks,
    check_image,
)

from .base import VisionModel
from .registry import register_model

__all__ = ["CvT", "ChanLayerNorm", "DepthWiseConv2d", "Attention", "Transformer", "FeedForward"]


class Attention(AttentionBase):
    """Convolutional-projection attention with strided keys/values (``Nk < Nq``).

    Keys: ``norm`` (``g``, ``b``), ``to_q.net.*``, ``to_kv.net.*`` (k | v on the channel axis),
    ``to_out.0`` (1x1 conv).
    """

    def __init__(self, dim: int, proj_kernel: int, kv_proj_stride: int, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__(attn_dropout=dropout)
        inner_dim = dim_head * heads
        padding = proj_kernel // 2
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = ChanLayerNorm(dim)
        self.to_q = DepthWiseConv2d(dim, inner_dim, proj_kernel, padding=padding, stride=1, bias=False)
        self.to_kv = DepthWiseConv2d(dim, inner_dim * 2, proj_kernel, padding=padding, stride=kv_proj_stride,
                                     bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner_dim, dim, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        x = self.norm(x)
        # (b, h*d, y, x) -> (b, h, y*x, d); heads are the outer channel factor as in vit-pytorch. The copy
        # to a unit stride on d (vit-pytorch's rearrange makes the same one) keeps SDPA's CPU flash kernel,
        # which falls back to its slow math path on transposed views (3x slower at stage 1).
        q = self.to_q(x).reshape(b, self.heads, -1, height * width).transpose(-1, -2).contiguous()
        kv = self.to_kv(x)  # (b, 2*h*d, y', x'): k | v
        kv = kv.reshape(b, 2, self.heads, -1, kv.shape[-2] * kv.shape[-1]).transpose(-1, -2).contiguous()
        k, v = kv.unbind(1)  # (b, h, n', d) each
        out = self.attend(q, k, v, scale=self.scale)  # (b, h, n, d)
        out = out.transpose(-1, -2).reshape(b, -1, height, width)  # (b, h*d, y, x)
        return self.to_out(out)


class Transformer(ResidualBlocks):
    """``depth`` x (attention + conv MLP, residual) on a feature map, no final norm."""

    def __init__(self, dim: int, proj_kernel: int, kv_proj_stride: int, depth: int, heads: int,
                 dim_head: int = 64, mlp_mult: int = 4, dropout: float = 0.0):
        super().__init__([
            (Attention(dim, proj_kernel=proj_kernel, kv_proj_stride=kv_proj_stride, heads=heads, dim_head=dim_head,
                       dropout=dropout),
             FeedForward(dim, dim * mlp_mult, dropout=dropout, conv=True))
            for _ in range(depth)
        ])


class CvT(VisionModel):
    """Convolutional vision Transformer with vit-pytorch's constructor.

    Args:
        num_classes: classifier width.
        s{1,2,3}_emb_dim: stage width. s{i}_emb_kernel, s{i}_emb_stride: the stage's conv embedding.
        s{i}_proj_kernel: kernel of the depthwise q/k/v projections. s{i}_kv_proj_stride: their k/v stride.
        s{i}_heads: heads (64 wide each). s{i}_depth: blocks. s{i}_mlp_mult: MLP expansion.
        dropout: attention/MLP dropout. channels: input channels.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = "to_logits.2"

    def __init__(self, *, num_classes,
                 s1_emb_dim=64, s1_emb_kernel=7, s1_emb_stride=4, s1_proj_kernel=3, s1_kv_proj_stride=2,
                 s1_heads=1, s1_depth=1, s1_mlp_mult=4,
                 s2_emb_dim=192, s2_emb_kernel=3, s2_emb_stride=2, s2_proj_kernel=3, s2_kv_proj_stride=2,
                 s2_heads=3, s2_depth=2, s2_mlp_mult=4,
                 s3_emb_dim=384, s3_emb_kernel=3, s3_emb_stride=2, s3_proj_kernel=3, s3_kv_proj_stride=2,
                 s3_heads=6, s3_depth=10, s3_mlp_mult=4,
                 dropout=0.0, channels=3, legacy_num_classes_zero=False):
        super().__init__()
        args = dict(locals())
        self.channels = channels
        dim, stride, widths, strides = channels, 1, [], []
        layers = []
        for prefix in ("s1", "s2", "s3"):
            cfg = {key[3:]: value for key, value in args.items() if key.startswith(f"{prefix}_")}
            layers.append(nn.Sequential(
                nn.Conv2d(dim, cfg["emb_dim"], kernel_size=cfg["emb_kernel"], padding=cfg["emb_kernel"] // 2,
                          stride=cfg["emb_stride"]),
                ChanLayerNorm(cfg["emb_dim"]),
                Transformer(dim=cfg["emb_dim"], proj_kernel=cfg["proj_kernel"],
                            kv_proj_stride=cfg["kv_proj_stride"], depth=cfg["depth"], heads=cfg["heads"],
                            mlp_mult=cfg["mlp_mult"], dropout=dropout),
            ))
            dim = cfg["emb_dim"]
            stride *= cfg["emb_stride"]
            widths.append(dim)
            strides.append(stride)
        self.layers = nn.Sequential(*layers)
        self.to_logits = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            Rearrange("... () () -> ..."),
            Linear(dim, num_classes),
        )
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info(widths, strides, "layers")

    def forward_features(self, img: Tensor) -> Tensor:
        """The last stage's feature map ``(b, s3_emb_dim, h', w')``."""
        check_image(img, channels=self.channels, max_size=None)
        x = img
        for stage in self.layers:
            x = self.tap(stage(x))
        return x

    def pool_features(self, x: Tensor) -> Tensor:
        return self.to_logits[:2](x)


# Paper configs (Table 2): head width 64, MLP ratio 4, embeddings 7x7/4, 3x3/2, 3x3/2, kv stride 2.
_SMALL = dict(num_classes=10, s1_emb_dim=16, s1_heads=1, s1_depth=1, s1_mlp_mult=2, s2_emb_dim=32, s2_heads=1,
              s2_depth=1, s2_mlp_mult=2, s3_emb_dim=48, s3_heads=2, s3_depth=1, s3_mlp_mult=2)

for _name, _kw, _size in (
    ("cvt_13", dict(s1_emb_dim=64, s1_heads=1, s1_depth=1, s2_emb_dim=192, s2_heads=3, s2_depth=2,
                    s3_emb_dim=384, s3_heads=6, s3_depth=10), 224),
    ("cvt_21", dict(s1_emb_dim=64, s1_heads=1, s1_depth=1, s2_emb_dim=192, s2_heads=3, s2_depth=4,
                    s3_emb_dim=384, s3_heads=6, s3_depth=16), 224),
    ("cvt_w24", dict(s1_emb_dim=192, s1_heads=3, s1_depth=2, s2_emb_dim=768, s2_heads=12, s2_depth=2,
                     s3_emb_dim=1024, s3_heads=16, s3_depth=20), 384),
):
    register_model(_name, CvT, vit_pytorch="vit_pytorch.cvt:CvT", test_overrides=_SMALL,
                   input_size=(3, _size, _size), test_input_size=(3, 32, 32), num_classes=1000, **_kw)
