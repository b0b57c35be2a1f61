"""EfficientFormer (v1): LeViT's attention in its last stage (a ``RelPosBias`` of the per-head table,
key width != value width)."""

from __future__ import annotations

import torch
from timm.models.efficientformer import Attention as TimmAttention
from torch import Tensor

from fastvit.attention import attend

from ._patch import Patched, patches
from .levit import table_bias


@patches(TimmAttention)
class Attention(Patched, TimmAttention):
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2)  # (b, heads, n, 2d + dv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        x = attend(q, k, v, scale=self.scale, bias=table_bias(self))
        return self.proj(x.transpose(1, 2).reshape(b, n, self.val_attn_dim))
