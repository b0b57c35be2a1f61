"""MobileViT: "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer"
(Mehta & Rastegari, arXiv 2110.02178).

A MobileNetV2 network (inverted-residual ``MV2Block``s) whose last three stages each end in a
``MobileViTBlock``: a local 3x3 conv and a 1x1 projection to the transformer width, then a
transformer over the feature map unfolded into ``ph x pw`` patches, where each pixel position of a
patch attends over the same position in every patch (global attention over ``h*w / (ph*pw)``
tokens, batched over ``b * ph * pw``), folded back, projected back and fused with the block's input
by a 3x3 conv. Downsampling is 32x (stride-2 stem conv, then four stride-2 MV2 blocks).

vit-pytorch 1.26.x layout and numerics: keys ``conv1``, ``stem.{0..3}``, ``trunk.{0,1,2}.{0,1}``,
``to_logits.{0,2}``; every conv is followed by BatchNorm (and SiLU except the pointwise-linear one);
the transformers have 4 heads of width 8, pre-norm attention (``norm``, ``to_qkv`` without bias,
``to_out.0``), SiLU MLPs (``net.0/1/4``) and no final norm.

Deliberate differences from vit-pytorch:

- The fourth stem block is built for ``channels[3]`` inputs, which is what it receives. vit-pytorch
  builds it for ``channels[2]``, which only runs when the two are equal; there weights and outputs
  are the same.
- ``image_size`` may be an int. Any input whose side divides by ``32 * patch`` runs (it is only
  checked against that, not against ``image_size``, as in vit-pytorch where it is unused); others
  raise ``ValueError`` instead of failing inside a rearrange.
- ``in_channels`` sets the input channels (vit-pytorch: 3 only; its ``channels`` are the conv widths).
- Wrong lengths of ``dims`` (3), ``depths`` (3) or ``channels`` (11) raise ``ValueError``.
- ``num_classes=0`` returns the pooled features ``(b, channels[-1])`` after the final 1x1 conv
  (``to_logits.2`` an ``nn.Identity``); vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``:
  ``legacy_num_classes_zero=True``.

Intermediates (``forward_intermediates``, ``features_only``): the stem's map and each of the three
stages', strides 4, 8, 16, 32.

``Recorder`` returns one map per attention layer, ``(b * ph * pw, 4, n, n)`` with ``n`` the patches
of that stage (a list: the stages differ in ``n``).
"""

from __future__ import annotations

import torch
from einops import rearrange
from einops.layers.torch import Reduce
from torch import Tensor, nn

from fastvit.layers import Linear, Transformer, check_image, pair

from .base import VisionModel
from .registry import register_model

__all__ = ["MobileViT", "MV2Block", "MobileViTBlock", "conv_1x1_bn", "conv_nxn_bn"]


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    """1x1 conv (no bias) -> BatchNorm -> SiLU."""
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.SiLU())


def conv_nxn_bn(inp: int, oup: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """kxk conv (padding 1, no bias) -> BatchNorm -> SiLU (vit-pytorch pads 1 whatever the kernel)."""
    return nn.Sequential(nn.Conv2d(inp, oup, kernel_size, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.SiLU())


class MV2Block(nn.Module):
    """MobileNetV2 inverted residual: (1x1 expand) -> 3x3 depthwise (stride) -> 1x1 linear projection.

    Residual when the stride is 1 and the width is kept. Keys ``conv.{i}`` as in vit-pytorch.
    """

    def __init__(self, inp: int, oup: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MV2Block stride must be 1 or 2, got {stride}")
        hidden = int(inp * expansion)
        self.use_res_connect = stride == 1 and inp == oup
        expand = [] if expansion == 1 else [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden),
                                             nn.SiLU()]
        self.conv = nn.Sequential(
            *expand,
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise, linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return out + x if self.use_res_connect else out


class MobileViTBlock(nn.Module):
    """Local conv -> unfold into patches -> transformer -> fold -> project back -> fuse with the input.

    Args:
        dim: transformer width. depth: transformer blocks. channel: the block's input/output channels.
        kernel_size: of the local and the fusion conv. patch_size: ``(ph, pw)``. mlp_dim: MLP hidden width.
        dropout: attention / MLP dropout.
    """

    def __init__(self, dim: int, depth: int, channel: int, kernel_size: int, patch_size, mlp_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.ph, self.pw = pair(patch_size)
        self.conv1 = conv_nxn_bn(channel, channel, kernel_size)
        self.conv2 = conv_1x1_bn(channel, dim)
        self.transformer = Transformer(dim, depth, heads=4, dim_head=8, mlp_dim=mlp_dim, dropout=dropout,
                                       final_norm=False, activation=nn.SiLU)
        self.conv3 = conv_1x1_bn(dim, channel)
        self.conv4 = conv_nxn_bn(2 * channel, channel, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        x = self.conv2(self.conv1(x))  # local representation, (b, dim, h, w)
        b, _, h, w = x.shape
        # Global representation: position (i, j) of every patch forms one sequence of (h/ph)*(w/pw) tokens.
        x = rearrange(x, "b d (h ph) (w pw) -> (b ph pw) (h w) d", ph=self.ph, pw=self.pw)
        x = self.transformer(x)
        x = rearrange(x, "(b ph pw) (h w) d -> b d (h ph) (w pw)", b=b, h=h // self.ph, ph=self.ph, pw=self.pw)
        return self.conv4(torch.cat((self.conv3(x), y), dim=1))


class MobileViT(VisionModel):
    """MobileViT with vit-pytorch's constructor (``vit_pytorch.mobile_vit.MobileViT``).

    Args:
        image_size: int or (h, w), the nominal input size (inputs of other sizes divisible by
            ``32 * patch_size`` also run).
        dims: the three transformer widths.
        channels: the 11 conv widths: stem input (after the first conv), the stem and trunk stages, and
            the final 1x1 conv before pooling.
        num_classes: classifier width.
        expansion: MV2 expansion ratio. kernel_size: of the MobileViT blocks' convs.
        patch_size: (ph, pw) of the unfolding. depths: transformer blocks per MobileViT block.
        dropout: attention / MLP dropout (vit-pytorch: always 0). in_channels: input channels.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = "to_logits.2"

    def __init__(self, image_size, dims, channels, num_classes, expansion=4, kernel_size=3, patch_size=(2, 2),
                 depths=(2, 4, 3), dropout=0.0, in_channels=3, legacy_num_classes_zero=False):
        super().__init__()
        dims, depths, channels = list(dims), list(depths), list(channels)
        for name, value, want in (("dims", dims, 3), ("depths", depths, 3), ("channels", channels, 11)):
            if len(value) != want:
                raise ValueError(f"{name} must have {want} entries, got {len(value)}: {value}")
        self.image_size = pair(image_size)
        self.patch_size = pair(patch_size)
        ph, pw = self.patch_size
        if self.image_size[0] % ph or self.image_size[1] % pw:
            raise ValueError(f"image size {self.image_size} must be divisible by the patch size {self.patch_size}")
        self.in_channels = in_channels

        self.conv1 = conv_nxn_bn(in_channels, channels[0], stride=2)
        self.stem = nn.ModuleList([
            MV2Block(channels[0], channels[1], 1, expansion),
            MV2Block(channels[1], channels[2], 2, expansion),
            MV2Block(channels[2], channels[3], 1, expansion),
            MV2Block(channels[3], channels[3], 1, expansion),  # vit-pytorch: channels[2] -> channels[3]
        ])
        self.trunk = nn.ModuleList([
            nn.ModuleList([
                MV2Block(channels[3 + 2 * i], channels[4 + 2 * i], 2, expansion),
                MobileViTBlock(dims[i], depths[i], channels[5 + 2 * i], kernel_size, self.patch_size,
                               int(dims[i] * (2 if i == 0 else 4)), dropout),
            ])
            for i in range(3)
        ])
        self.to_logits = nn.Sequential(
            conv_1x1_bn(channels[-2], channels[-1]),
            Reduce("b c h w -> b c", "mean"),
            Linear(channels[-1], num_classes, bias=False),
        )
        self.set_head(channels[-1], num_classes, legacy_num_classes_zero)
        self.set_feature_info([channels[3], channels[5], channels[7], channels[9]], [4, 8, 16, 32],
                              ["stem", "trunk.0", "trunk.1", "trunk.2"])

    def forward_features(self, img: Tensor) -> Tensor:
        """The feature map before the head, ``(b, channels[-2], h / 32, w / 32)``."""
        ph, pw = self.patch_size
        check_image(img, channels=self.in_channels, max_size=None, patch_size=(32 * ph, 32 * pw))
        x = self.conv1(img)
        for block in self.stem:
            x = block(x)
        self.tap(x)
        for conv, attn in self.trunk:
            x = self.tap(attn(conv(x)))
        return x

    def pool_features(self, x: Tensor) -> Tensor:
        return self.to_logits[:2](x)


# Small enough for CPU tests: 64 px, 2x2 patches on the 8/4/2-pixel maps, one block per stage.
_SMALL = dict(image_size=(64, 64), dims=[16, 24, 32], channels=[8, 8, 16, 16, 16, 16, 24, 24, 32, 32, 64],
              num_classes=10, expansion=2, depths=(1, 1, 1))

# The paper's three sizes (Table 4 / the reference implementation), 256 px.
for _name, _kw in {
    "mobilevit_xxs": dict(dims=[64, 80, 96], channels=[16, 16, 24, 24, 48, 48, 64, 64, 80, 80, 320], expansion=2),
    "mobilevit_xs": dict(dims=[96, 120, 144], channels=[16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384]),
    "mobilevit_s": dict(dims=[144, 192, 240], channels=[16, 32, 64, 64, 96, 96, 128, 128, 160, 160, 640]),
}.items():
    register_model(_name, MobileViT, vit_pytorch="vit_pytorch.mobile_vit:MobileViT", test_overrides=_SMALL,
                   input_size=(3, 256, 256), test_input_size=(3, 64, 64), image_size=(256, 256), num_classes=1000,
                   **_kw)
