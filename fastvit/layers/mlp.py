"""Feed-forward blocks."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .linear import Linear

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """vit-pytorch's pre-norm MLP: ``LayerNorm -> Linear -> GELU -> Dropout -> Linear -> Dropout``.

    Keys ``net.0`` (norm), ``net.1``, ``net.4`` match vit-pytorch >= 1.4. With ``dropout=None`` the
    dropout layers are left out (SimpleViT: keys ``net.0/1/3``). ``activation`` builds the nonlinearity
    (MobileViT: ``nn.SiLU``); the exact GELU is fused into the first GEMM where possible.
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: Optional[float] = 0.0, norm: bool = True,
                 activation: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        layers = [nn.LayerNorm(dim) if norm else nn.Identity(), Linear(dim, hidden_dim), activation()]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        layers.append(Linear(hidden_dim, dim))
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        norm, fc1, act = self.net[0], self.net[1], self.net[2]
        if isinstance(act, nn.GELU) and act.approximate == "none":
            # fc1 + GELU in one call: oneDNN fuses the GELU into the GEMM in inference on the CPU.
            h = fc1.forward_act(norm(x), "gelu")
        else:
            h = act(fc1(norm(x)))
        for layer in self.net[3:]:
            h = layer(h)
        return h
