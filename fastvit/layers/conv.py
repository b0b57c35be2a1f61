"""Conv building blocks of the hierarchical models (CvT, NesT, Twins-SVT, CrossFormer, RegionViT, PiT, CCT).

Each keeps the key layout of the vit-pytorch modules it replaces, so checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChanLayerNorm", "DepthWiseConv2d", "PEG", "Residual", "DropPath", "conv_output_size"]


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int = 0) -> int:
    """Output length of a convolution / unfold along one axis."""
    return (size - kernel_size + 2 * padding) // stride + 1


class ChanLayerNorm(nn.Module):
    """LayerNorm over the channels of ``(b, c, h, w)``: ``(x - mean) / sqrt(var + eps) * g + b``.

    Keys ``g``, ``b`` of shape ``(1, c, 1, 1)`` (vit-pytorch's ``cvt.LayerNorm`` and its copies in NesT,
    Twins-SVT, CrossFormer and RegionViT, which use ``torch.var``: the same function, rounding
    differences only, ~1e-6 in fp32).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # Two passes (mean, then the mean of the centred squares): torch.var over the channel axis of an
        # NCHW map is 3-7x slower on the CPU than these two plain reductions.
        x = x - x.mean(dim=1, keepdim=True)
        var = x.square().mean(dim=1, keepdim=True)  # (b, 1, h, w), biased as in vit-pytorch
        return x * torch.rsqrt(var + self.eps) * self.g + self.b


class DepthWiseConv2d(nn.Module):
    """A depthwise kxk conv then a pointwise 1x1 conv, in vit-pytorch's two layouts:

    - ``batch_norm=True`` (CvT's q/k/v projection): depthwise ``dim_in -> dim_in``, BatchNorm,
      pointwise ``dim_in -> dim_out``; keys ``net.0``, ``net.1``, ``net.2``.
    - ``batch_norm=False`` (PiT's pooling): depthwise ``dim_in -> dim_out`` (``groups=dim_in``), then
      pointwise ``dim_out -> dim_out``; keys ``net.0``, ``net.1``.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int, padding: int, stride: int,
                 bias: bool = True, batch_norm: bool = True):
        super().__init__()
        mid = dim_in if batch_norm else dim_out
        self.net = nn.Sequential(
            nn.Conv2d(dim_in, mid, kernel_size=kernel_size, padding=padding, groups=dim_in, stride=stride, bias=bias),
            *([nn.BatchNorm2d(mid)] if batch_norm else []),
            nn.Conv2d(mid, dim_out, kernel_size=1, bias=bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Residual(nn.Module):
    """``fn(x) + x``; the wrapped module's keys live under ``fn`` (vit-pytorch's Twins-SVT layout)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class PEG(nn.Module):
    """Positional encoding generator (CPVT): ``x + depthwise_conv(x)`` on ``(b, c, h, w)``.

    Keys ``proj`` (RegionViT), or ``proj.fn`` with ``wrapped=True`` (Twins-SVT, where vit-pytorch
    wraps the conv in ``Residual``).
    """

    def __init__(self, dim: int, kernel_size: int = 3, wrapped: bool = False):
        super().__init__()
        conv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.proj = Residual(conv) if wrapped else conv

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) if isinstance(self.proj, Residual) else self.proj(x) + x


class DropPath(nn.Module):
    """Per-sample stochastic depth (training only), with vit-pytorch's random calls (CCT)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob <= 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep_mask = torch.zeros(shape, device=x.device).uniform_(0, 1) < keep_prob
        return x.div(keep_prob) * keep_mask.to(x.dtype)
