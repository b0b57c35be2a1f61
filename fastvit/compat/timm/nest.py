"""NesT: attention within each image block of a ``(b, t, n, c)`` input; the blocks fold into the
batch as a view. timm orders the output channels (d, h), which is kept."""

from __future__ import annotations

import torch
from timm.models.nest import Attention as NestAttention
from torch import Tensor

from fastvit.attention import attend
from fastvit.layers import split_qkv

from ._patch import Patched, patches


@patches(NestAttention)
class Attention(Patched, NestAttention):
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x)
        b, t, n, c = x.shape
        q, k, v = split_qkv(self.qkv(x).view(b * t, n, -1), self.num_heads)  # (b*t, h, n, d)
        x = attend(q, k, v, scale=self.scale, dropout_p=self.attn_dropout())
        x = x.view(b, t, self.num_heads, n, -1).permute(0, 1, 3, 4, 2).reshape(b, t, n, c)  # (b, t, n, d*h)
        return self.proj_drop(self.proj(x))
