"""``timm.layers.Attention``: ViT / DeiT / DeiT3 / registers / distilled, and the ViT blocks inside
PiT, CrossViT and MobileViT v1. Global attention, as is; a float ``attn_mask`` is a ``DenseBias``."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Attention as TimmAttention
from torch import Tensor

from fastvit.attention import attend
from fastvit.layers import merge_heads, split_qkv

from ._common import mask_bias, run_module, unmapped_call
from ._patch import Patched, patches


@patches(TimmAttention)
class Attention(Patched, TimmAttention):
    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, attn_mask, is_causal)
        why = unmapped_call(attn_mask, is_causal)
        if why is not None:
            return self.fallback(why, x, attn_mask=attn_mask, is_causal=is_causal)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = split_qkv(self.qkv(x), self.num_heads)  # (b, h, n, d)
        q, k = run_module(self.q_norm, q), run_module(self.k_norm, k)
        x = attend(q, k, v, scale=self.scale, bias=mask_bias(attn_mask), dropout_p=self.attn_dropout())
        x = run_module(self.norm, merge_heads(x))
        if gate is not None:
            x = x * gate
        return run_module(self.proj_drop, self.proj(x))
