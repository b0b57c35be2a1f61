"""Swin v1 (and what v2 shares, see ``swin_v2``): window attention with a relative-position table, and
the (shifted-)window block.

The block's attention goes through ``attend(window=Window(grid, size, shift))`` on the raster tokens:
no roll, no partition / reverse copies, no expanded shift mask (pairs from different sides of the
cyclic wrap are masked exactly where timm adds -100, a difference that underflows in fp32). A map
that is not a multiple of the window (timm zero-pads it after the roll, and the padded tokens are
attended to) keeps timm's roll + pad + partition, with the windows' attention still from fastvit.

v1's table is ``RelPosBias(relative_position_bias_table, relative_position_index)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.swin_transformer import SwinTransformerBlock as TimmSwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention
from torch import Tensor

from fastvit.attention import DenseBias, RelPosBias, Window, attend
from fastvit.layers import merge_heads, split_qkv

from ._patch import Patched, patches


class _WindowAttention(Patched):
    """What v1 and v2 share: a call on ``(b*windows, n, c)`` windows (timm's) or on the whole grid."""

    def qkv_scale(self, x: Tensor) -> tuple:
        """``(q, k, v, scale)``, q/k/v ``(b, h, n, d)`` from tokens ``(b, n, c)``."""
        raise NotImplementedError

    def table_bias(self) -> RelPosBias:
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, mask)
        q, k, v, scale = self.qkv_scale(x)
        bias = [self.table_bias()]
        if mask is not None:  # timm's (windows, n, n) shift mask; window w of image i is batch i*windows + w
            windows, n = mask.shape[0], mask.shape[1]
            bias.append(DenseBias(mask.unsqueeze(0).expand(x.shape[0] // windows, -1, -1, -1).reshape(-1, 1, n, n)))
        x = attend(q, k, v, scale=scale, bias=tuple(bias), dropout_p=self.attn_dropout())
        return self.proj_drop(self.proj(merge_heads(x)))

    def attend_grid(self, x: Tensor, window) -> Tensor:
        """Window attention over a whole ``(b, h, w, c)`` map, in place."""
        b, h, w, c = x.shape
        q, k, v, scale = self.qkv_scale(x.view(b, h * w, c))
        x = attend(q, k, v, scale=scale, bias=self.table_bias(), window=window, dropout_p=self.attn_dropout())
        return self.proj_drop(self.proj(merge_heads(x))).view(b, h, w, -1)


@patches(TimmWindowAttention)
class WindowAttention(_WindowAttention, TimmWindowAttention):
    def qkv_scale(self, x: Tensor) -> tuple:
        return (*split_qkv(self.qkv(x), self.num_heads), self.scale)

    def table_bias(self) -> RelPosBias:
        return RelPosBias(self.relative_position_bias_table, self.relative_position_index)


class _SwinBlock(Patched):
    kind = "block"

    def _attn(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own _attn (see _patch)
            return self._timm__attn(x)
        _, h, w, _ = x.shape
        (wh, ww), shift = self.window_size, tuple(self.shift_size)
        if h % wh or w % ww:
            return self.fallback("map not a multiple of the window (timm pads after the roll)", x, _method="_attn")
        if not isinstance(self.attn, _WindowAttention):
            return self.fallback("its WindowAttention is not patched", x, _method="_attn")
        return self.attn.attend_grid(x, Window(grid=(h, w), size=(wh, ww), shift=shift))


@patches(TimmSwinTransformerBlock, kind="block")
class SwinTransformerBlock(_SwinBlock, TimmSwinTransformerBlock):
    pass
