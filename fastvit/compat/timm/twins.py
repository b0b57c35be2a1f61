"""Twins (SVT / PCPVT): locally grouped attention (LSA: non-overlapping ``ws x ws`` windows) and global
sub-sampled attention (GSA: keys and values from a strided conv, so Nk < Nq).

LSA goes through ``attend(window=Window(...))`` on the raster tokens: no partition or reverse copies.
Where the map is not a multiple of the window, timm zero-pads it and the padded tokens are attended
to (no mask), so that case keeps timm's partition, with the windows folded into the batch.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from timm.models.twins import GlobalSubSampleAttn as TimmGlobalSubSampleAttn
from timm.models.twins import LocallyGroupedAttn as TimmLocallyGroupedAttn
from torch import Tensor

from fastvit.attention import Window, attend
from fastvit.layers import merge_heads, split_heads, split_qkv

from ._patch import Patched, patches


@patches(TimmLocallyGroupedAttn)
class LocallyGroupedAttn(Patched, TimmLocallyGroupedAttn):
    def forward(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, size)
        b, n, c = x.shape
        h, w = size
        ws = self.ws
        if h % ws == 0 and w % ws == 0:
            q, k, v = split_qkv(self.qkv(x), self.num_heads)  # (b, heads, h*w, d), raster order
            x = attend(q, k, v, scale=self.scale, window=Window(grid=(h, w), size=(ws, ws)),
                       dropout_p=self.attn_dropout())
            return self.proj_drop(self.proj(merge_heads(x)))
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3)  # (b, nh, nw, ws, ws, c)
        q, k, v = split_qkv(self.qkv(x).view(-1, ws * ws, 3 * c), self.num_heads)  # (b*windows, heads, ws*ws, d)
        x = attend(q, k, v, scale=self.scale, dropout_p=self.attn_dropout())
        x = merge_heads(x).view(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        x = x[:, :h, :w].reshape(b, n, c)
        return self.proj_drop(self.proj(x))


@patches(TimmGlobalSubSampleAttn)
class GlobalSubSampleAttn(Patched, TimmGlobalSubSampleAttn):
    def forward(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, size)
        b, n, c = x.shape
        q = split_heads(self.q(x), self.num_heads)  # (b, heads, n, d)
        if self.sr is not None:  # keys and values from a strided conv of the map
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, *size)).flatten(2).transpose(1, 2))
        k, v = split_qkv(self.kv(x), self.num_heads, parts=2)  # (b, heads, nk, d)
        x = attend(q, k, v, scale=self.scale, dropout_p=self.attn_dropout())
        return self.proj_drop(self.proj(merge_heads(x)))
