"""LeViT: attention with a per-head table of biases gathered by ``|dy| * w + |dx|`` (``RelPosBias`` of
``attention_biases.T``), key width != value width, and ``AttentionDownsample`` with fewer queries
(a strided subsample) than keys. Both the linear (``levit_*``) and the conv (``levit_conv_*``) layouts.
"""

from __future__ import annotations

import torch
from timm.models.levit import Attention as TimmAttention
from timm.models.levit import AttentionDownsample as TimmAttentionDownsample
from torch import Tensor

from fastvit.attention import RelPosBias, attend

from ._patch import Patched, patches


def table_bias(m) -> RelPosBias:
    """``attention_biases [H, T]`` gathered by ``attention_bias_idxs [Nq, Nk]`` (the ``[T, H]`` view is
    made contiguous where it is gathered, ``RelPosBias.materialize``)."""
    return RelPosBias(m.attention_biases.t(), m.attention_bias_idxs)


@patches(TimmAttention)
class Attention(Patched, TimmAttention):
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x)
        split = [self.key_dim, self.key_dim, self.val_dim]
        if self.use_conv:
            b, _, h, w = x.shape
            q, k, v = self.qkv(x).view(b, self.num_heads, -1, h * w).transpose(-1, -2).split(split, dim=3)
            x = attend(q, k, v, scale=self.scale, bias=table_bias(self))  # (b, heads, n, dv)
            x = x.transpose(-1, -2).reshape(b, -1, h, w)
        else:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2).split(split, dim=3)
            x = attend(q, k, v, scale=self.scale, bias=table_bias(self))
            x = x.transpose(1, 2).reshape(b, n, self.val_attn_dim)
        return self.proj(x)


@patches(TimmAttentionDownsample)
class AttentionDownsample(Patched, TimmAttentionDownsample):
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x)
        split = [self.key_dim, self.val_dim]
        if self.use_conv:
            b, _, h, w = x.shape
            hh, ww = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
            k, v = self.kv(x).view(b, self.num_heads, -1, h * w).transpose(-1, -2).split(split, dim=3)
            q = self.q(x).view(b, self.num_heads, self.key_dim, -1).transpose(-1, -2)  # (b, heads, nq, d)
            x = attend(q, k, v, scale=self.scale, bias=table_bias(self))
            x = x.transpose(-1, -2).reshape(b, self.val_attn_dim, hh, ww)
        else:
            b, n, _ = x.shape
            k, v = self.kv(x).view(b, n, self.num_heads, -1).transpose(1, 2).split(split, dim=3)
            q = self.q(x).view(b, -1, self.num_heads, self.key_dim).transpose(1, 2)  # (b, heads, nq, d)
            x = attend(q, k, v, scale=self.scale, bias=table_bias(self))
            x = x.transpose(1, 2).reshape(b, -1, self.val_attn_dim)
        return self.proj(x)
