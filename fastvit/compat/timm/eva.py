"""EVA: q/k norm, q/v biases, 2-D RoPE on the patch tokens. RoPE rotates q and k before ``attend()``
(it is not a bias, so it stays outside the contract); prefix tokens are not rotated."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import EvaAttention as TimmEvaAttention
from torch import Tensor

from fastvit.attention import attend
from fastvit.layers import merge_heads, split_heads, split_qkv

from ._common import mask_bias, qkv_with_split_bias, unmapped_call
from ._patch import Patched, patches


@patches(TimmEvaAttention)
class EvaAttention(Patched, TimmEvaAttention):
    def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, rope, attn_mask, is_causal)
        why = unmapped_call(attn_mask, is_causal)
        if why is not None:
            return self.fallback(why, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = split_qkv(qkv_with_split_bias(self, x), self.num_heads)  # (b, h, n, d)
        else:
            q, k, v = (split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        x = attend(q, k, v, scale=self.scale, bias=mask_bias(attn_mask), dropout_p=self.attn_dropout())
        x = self.norm(merge_heads(x))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
