"""BEiT: q/v biases, a relative-position table whose index has the cls row and column
(``RelPosBias`` as is), and an optional shared bias from the model (``DenseBias``)."""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.beit import Attention as BeitAttention
from torch import Tensor

from fastvit.attention import DenseBias, RelPosBias, attend
from fastvit.layers import merge_heads, split_qkv

from ._common import qkv_with_split_bias
from ._patch import Patched, patches


@patches(BeitAttention)
class Attention(Patched, BeitAttention):
    def forward(self, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, shared_rel_pos_bias)
        q, k, v = split_qkv(qkv_with_split_bias(self, x), self.num_heads)  # (b, h, n, d)
        bias = []
        if self.relative_position_bias_table is not None:
            bias.append(RelPosBias(self.relative_position_bias_table, self.relative_position_index))
        if shared_rel_pos_bias is not None:
            bias.append(DenseBias(shared_rel_pos_bias))
        x = attend(q, k, v, scale=self.scale, bias=tuple(bias), dropout_p=self.attn_dropout())
        return self.proj_drop(self.proj(merge_heads(x)))
