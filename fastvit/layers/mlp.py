"""Feed-forward blocks: one builder for vit-pytorch's MLP layouts, and the pre-norm ``FeedForward``."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .conv import ChanLayerNorm
from .linear import Linear

__all__ = ["FeedForward", "mlp"]


def mlp(dim: int, hidden_dim: int, *, dropout: Optional[float] = 0.0, out_dropout: bool = True, norm: bool = True,
        conv: bool = False, activation: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Optional[Callable[[int], nn.Module]] = None) -> nn.Sequential:
    """vit-pytorch's MLP as a ``Sequential``: ``[norm] -> fc1 -> act -> [Dropout] -> fc2 -> [Dropout]``.

    Args:
        dim, hidden_dim: input/output and hidden width.
        dropout: rate of both dropouts; ``None`` leaves both out (SimpleViT: keys ``0/1/3``).
        out_dropout: keep the dropout after ``fc2`` (CrossFormer and RegionViT have none).
        norm: a pre-norm first; without it ``fc1`` is index 0 (LeViT: keys ``0/3``).
        conv: on ``(b, c, h, w)`` maps: ``ChanLayerNorm`` and 1x1 convs (CvT, NesT, Twins-SVT,
            CrossFormer) instead of ``LayerNorm`` and ``Linear`` on tokens.
        activation: builds the nonlinearity (MobileViT: ``nn.SiLU``, LeViT: ``nn.Hardswish``).
        norm_layer: builds the pre-norm from ``dim`` (NaViT: ``BiasFreeLayerNorm``); default
            ``nn.LayerNorm`` (``ChanLayerNorm`` with ``conv``).
    """
    if conv:
        default_norm, fc = ChanLayerNorm, (lambda i, o: nn.Conv2d(i, o, 1))
    else:
        default_norm, fc = nn.LayerNorm, Linear
    layers = [(norm_layer or default_norm)(dim)] if norm else []
    layers += [fc(dim, hidden_dim), activation()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(fc(hidden_dim, dim))
    if dropout is not None and out_dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class FeedForward(nn.Module):
    """vit-pytorch's pre-norm MLP: ``LayerNorm -> Linear -> GELU -> Dropout -> Linear -> Dropout``.

    Keys ``net.0`` (norm), ``net.1``, ``net.4`` match vit-pytorch >= 1.4. With ``dropout=None`` the
    dropout layers are left out (SimpleViT: keys ``net.0/1/3``). ``activation`` builds the nonlinearity
    (MobileViT: ``nn.SiLU``); the exact GELU is fused into the first GEMM where possible. ``conv=True``
    is the same block on feature maps (vit-pytorch's ``cvt.FeedForward``, also used by NesT and
    Twins-SVT: ``ChanLayerNorm`` and 1x1 convs, same keys).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: Optional[float] = 0.0, norm: bool = True,
                 activation: Callable[[], nn.Module] = nn.GELU, conv: bool = False):
        super().__init__()
        self.net = mlp(dim, hidden_dim, dropout=dropout, norm=norm, conv=conv, activation=activation)
        act = self.net[2 if norm else 1]
        # fc1 + GELU in one call: oneDNN fuses the GELU into the GEMM in inference on the CPU.
        self.fused_gelu = not conv and isinstance(act, nn.GELU) and act.approximate == "none"
        self.first = 1 if norm else 0  # index of fc1

    def forward(self, x):
        if not self.fused_gelu:
            return self.net(x)
        if self.first:
            x = self.net[0](x)
        h = self.net[self.first].forward_act(x, "gelu")
        for layer in self.net[self.first + 2:]:
            h = layer(h)
        return h
