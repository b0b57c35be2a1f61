"""Swin v2: cosine attention with a continuous position bias, in the shifted-window block of ``swin``.

The per-head clamped logit scale multiplies the normalised q (``scale=1``), and the CPB MLP's output
``16 * sigmoid(cpb_mlp(coords))`` is the ``[T, H]`` table of a ``RelPosBias`` (the gradient reaches
the MLP); the block's windows go through ``Window`` as v1's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2Block as TimmSwinTransformerV2Block
from timm.models.swin_transformer_v2 import WindowAttention as TimmWindowAttention
from torch import Tensor

from fastvit.attention import RelPosBias
from fastvit.layers import split_qkv

from ._common import qkv_with_split_bias
from ._patch import patches
from .swin import _SwinBlock, _WindowAttention


@patches(TimmWindowAttention)
class WindowAttention(_WindowAttention, TimmWindowAttention):
    def qkv_scale(self, x: Tensor) -> tuple:
        q, k, v = split_qkv(qkv_with_split_bias(self, x), self.num_heads)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (h, 1, 1)
        return F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), v, 1.0

    def table_bias(self) -> RelPosBias:
        table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))
        return RelPosBias(table, self.relative_position_index)


@patches(TimmSwinTransformerV2Block, kind="block")
class SwinTransformerV2Block(_SwinBlock, TimmSwinTransformerV2Block):
    pass
