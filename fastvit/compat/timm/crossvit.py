"""CrossViT: cross attention of one branch's class token over the other branch's tokens (one query);
its transformer blocks are ``timm.layers.Attention`` (``vit``)."""

from __future__ import annotations

import torch
from timm.models.crossvit import CrossAttention as TimmCrossAttention
from torch import Tensor

from ._patch import Patched, patches
from .cait import class_attention


@patches(TimmCrossAttention)
class CrossAttention(Patched, TimmCrossAttention):
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x)
        return class_attention(self, x, self.wq, self.wk, self.wv)
