"""Windowed self-attention: attention inside the (shifted or dilated) windows of a token grid, as one
``attend(..., window=Window(...))`` call on the raster tokens. The model never cuts windows: a backend
with a window kernel addresses them in place, the others copy them into a batch once
(``fastvit.attention.partition``).

``WindowAttention`` carries the shared part: the q/k/v projection (one fused ``to_qkv``, or ``to_q`` and
``to_kv`` apart), heads split as views, the ``Window`` of the grid, an optional Swin-style relative
position table, and the output projection. Two layouts, with vit-pytorch's keys in both:

- tokens ``(b, h*w, dim)`` with the grid passed along: ``LayerNorm``, ``Linear`` projections;
- feature maps ``(b, dim, h, w)`` (``conv=True``; Twins-SVT, NesT, CrossFormer): ``ChanLayerNorm``,
  1x1 ``Conv2d`` projections. Heads are split as views of the conv output (``map_heads``), and the
  output comes back from the backend laid out ``(b, h, d, h*w)``, so merging the heads into a map is
  a view too (``merge_map_heads``).

Subclasses change what the model needs: the window (``window(grid)``: NesT's blocks per side) and the
bias (``attention_bias(window)``: CrossFormer's dynamic position bias as a ``DenseBias``).

While a ``Recorder`` records, the windows are batched here and attended with ``return_probs``, so
the maps are ``(b * windows, heads, n, n)``, as when the models cut windows themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastvit.attention import RelPosBias, Window, attend, make_inputs
from fastvit.attention.partition import window_inputs, window_unbatch

from .attention import AttentionBase, merge_heads, split_heads, split_qkv
from .conv import ChanLayerNorm
from .linear import Linear

__all__ = ["WindowAttention", "window_relative_position_index", "map_heads", "merge_map_heads"]


def _pair(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def window_relative_position_index(window_size) -> Tensor:
    """Swin's ``[n, n]`` index (``n = wh * ww``) into a ``[(2wh - 1) * (2ww - 1), heads]`` table: the
    offset ``(dy, dx)`` between two positions of a window is row ``(dy + wh - 1) * (2ww - 1) + dx + ww - 1``."""
    wh, ww = _pair(window_size)
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, n)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, n, n)
    return (rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1


def map_heads(x: Tensor, heads: int, parts: int = 1) -> tuple:
    """A 1x1-conv projection ``(b, parts*h*d, H, W)`` -> ``parts`` views ``(b, h, H*W, d)`` (heads outer in
    each part, as vit-pytorch's ``chunk`` + ``rearrange('b (h d) x y -> b h (x y) d')``)."""
    b, _, height, width = x.shape
    return x.view(b, parts, heads, -1, height * width).permute(1, 0, 2, 4, 3).unbind(0)


def merge_map_heads(out: Tensor, grid: tuple) -> Tensor:
    """``(b, h, H*W, d) -> (b, h*d, H, W)``: a view when ``out`` is laid out ``(b, h, d, H*W)`` (what a
    windowed call on ``map_heads`` views returns), one copy otherwise."""
    b, h, _, d = out.shape
    return out.transpose(2, 3).reshape(b, h * d, *grid)


class WindowAttention(AttentionBase):
    """Multi-head self-attention inside windows of a grid (Swin, Twins-SVT LSA, NesT, CrossFormer).

    Keys: ``norm`` (if any), ``to_qkv`` (or ``to_q`` and ``to_kv`` with ``fused_qkv=False``),
    ``rel_pos_table`` (with ``rel_pos_bias``), ``to_out.0`` (``to_out`` with ``proj_dropout=None``). The
    index of the table is a buffer (``rel_pos_index``, not saved: it follows from the window size).

    Args:
        dim: channels of the tokens / map.
        heads: number of heads. dim_head: width of each head.
        window_size: ``wh`` or ``(wh, ww)`` tokens per window.
        shift: Swin's cyclic shift, ``0 <= shift < window_size`` per axis.
        dilated: the window's tokens are spread over the whole grid at a stride of ``grid // window_size``
            (CrossFormer's long-distance attention, MaxViT's grid attention) instead of adjacent.
        rel_pos_bias: a trainable Swin-style relative position table, zero-initialised.
        conv: feature maps ``(b, dim, h, w)`` with ``ChanLayerNorm`` and 1x1 convs (else tokens).
        norm: whether the module owns its pre-norm.
        fused_qkv: one ``to_qkv`` (else ``to_q`` and ``to_kv``).
        attn_dropout: dropout on the probabilities (training only).
        proj_dropout: dropout after the output projection (``to_out.0``); None: no dropout layer, the
            projection is ``to_out`` itself (CrossFormer's key).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, window_size=7, shift=0,
                 dilated: bool = False, rel_pos_bias: bool = False, conv: bool = False, norm: bool = True,
                 fused_qkv: bool = True, attn_dropout: float = 0.0, proj_dropout: Optional[float] = 0.0):
        super().__init__(attn_dropout=attn_dropout)
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.window_size = _pair(window_size)
        self.shift = _pair(shift)
        self.dilated = dilated
        self.conv = conv
        self.fused_qkv = fused_qkv
        self._windows: dict = {}
        if norm:
            self.norm = ChanLayerNorm(dim) if conv else nn.LayerNorm(dim)

        def proj(i: int, o: int, bias: bool) -> nn.Module:
            return nn.Conv2d(i, o, 1, bias=bias) if conv else Linear(i, o, bias=bias)

        if fused_qkv:
            self.to_qkv = proj(dim, inner_dim * 3, False)
        else:
            self.to_q = proj(dim, inner_dim, False)
            self.to_kv = proj(dim, inner_dim * 2, False)
        if rel_pos_bias:
            wh, ww = self.window_size
            self.rel_pos_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
            self.register_buffer("rel_pos_index", window_relative_position_index(self.window_size), persistent=False)
        if proj_dropout is None:
            self.to_out = proj(inner_dim, dim, True)
        else:
            self.to_out = nn.Sequential(proj(inner_dim, dim, True), nn.Dropout(proj_dropout))

    def window(self, grid: tuple) -> Window:
        """The ``Window`` of an ``(H, W)`` grid (cached per grid)."""
        win = self._windows.get(grid)
        if win is None:
            (H, W), (wh, ww) = grid, self.window_size
            if self.dilated:
                win = Window(grid=grid, size=(wh, ww), dilation=(max(1, H // wh), max(1, W // ww)))
            else:
                win = Window(grid=grid, size=(wh, ww), shift=self.shift)
            self._windows[grid] = win
        return win

    def attention_bias(self, window: Window):
        """The bias descriptor(s) of a call (None: none); window-local positions."""
        if "rel_pos_table" in self._parameters:
            return RelPosBias(self.rel_pos_table, self.rel_pos_index)
        return None

    def project_qkv(self, x: Tensor) -> tuple:
        """q, k, v ``(b, heads, H*W, d)``, views of the projections (normed input)."""
        if self.conv:
            if self.fused_qkv:
                return map_heads(self.to_qkv(x), self.heads, parts=3)
            (q,) = map_heads(self.to_q(x), self.heads)
            return (q, *map_heads(self.to_kv(x), self.heads, parts=2))
        if self.fused_qkv:
            return split_qkv(self.to_qkv(x), self.heads)
        return (split_heads(self.to_q(x), self.heads), *split_qkv(self.to_kv(x), self.heads, parts=2))

    def forward(self, x: Tensor, grid: Optional[tuple] = None) -> Tensor:
        """``x``: ``(b, dim, H, W)`` with ``conv=True``, else ``(b, H*W, dim)`` with ``grid=(H, W)``."""
        if self.conv:
            grid = tuple(x.shape[-2:])
        elif grid is None:
            raise ValueError("WindowAttention on tokens needs grid=(H, W)")
        grid = tuple(int(g) for g in grid)
        norm = self._modules.get("norm")
        window = self.window(grid)
        # q, k, v (b, h, H*W, d) are views of the projections. Neither they nor the normed input are
        # bound to names here: a backend that copies the windows frees the projections as soon as
        # the call returns, not after the output projection (less memory, fewer CPU page faults).
        out = self.attend(*self.project_qkv(x if norm is None else norm(x)), scale=self.scale, window=window,
                          bias=self.attention_bias(window))
        return self.to_out(merge_map_heads(out, grid) if self.conv else merge_heads(out))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs):
        if not self.record_attention:
            return super().attend(q, k, v, **kwargs)
        # Recording: the maps of every window, (b * windows, h, n, n), need the windows as a batch.
        window = kwargs.pop("window")
        inner = window_inputs(make_inputs(q, k, v, window=window, **kwargs))
        result = attend(inner.q, inner.k, inner.v, scale=inner.scale, bias=inner.bias,
                        dropout_p=self.attn_dropout if self.training else 0.0, return_probs=True)
        self.recorded_attention = result.probs
        return window_unbatch(result.out, window, like=q)
