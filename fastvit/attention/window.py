"""``Window``: attention only inside (shifted or dilated) windows of a grid of raster tokens.

    out = attend(q, k, v, window=Window(grid=(H, W), size=(wh, ww), shift=(sh, sw), dilation=(dh, dw)),
                 bias=RelPosBias(table, index))   # index [wh*ww, wh*ww]: window-local positions

q, k, v are ``[B, heads, H*W, D]`` with the tokens in raster order of an ``H x W`` grid (what a
Linear over ``(b, h*w, c)`` gives, viewed, with no copy); the output has the same layout. A window
holds ``n = wh * ww`` tokens; its local position ``t = i * ww + j`` (``i < wh``, ``j < ww``).

Geometry (per axis; rows shown, columns alike). Windows are numbered in raster order of window rows
``wr`` and window columns ``wc``:

- ``size`` alone (Twins LSA, NesT blocks, CrossFormer short distance): position ``i`` of window
  row ``wr`` is grid row ``wr * wh + i``.
- ``shift`` (Swin's shifted windows, ``0 <= sh < wh``): the grid is rolled cyclically by ``-shift``
  (``rolled[r] = grid[(r + sh) % H]``) and then cut as above: grid row ``(wr * wh + i + sh) % H``.
  Two tokens of one window attend to each other only if they come from the same side of the wrap
  on both axes (rolled row ``wr * wh + i >= H - sh`` or not): Swin's region mask, applied exactly
  (probability 0), not as ``-100``. Every query keeps at least itself.
- ``dilation`` (CrossFormer long distance with interval G: ``size=(H//G, W//G), dilation=(G, G)``;
  MaxViT grid attention with grid g: ``size=(g, g), dilation=(H//g, W//g)``): rows are cut into
  blocks of ``wh * dh`` rows, each holding ``dh`` interleaved windows; window row
  ``wr = block * dh + o`` holds grid rows ``block * wh * dh + o + i * dh``.
- Shift and dilation together are refused (no model uses them and their meaning is ambiguous).

Biases broadcast over the windows: ``RelPosBias`` with a window-local index ``[n, n]``, and
``DenseBias`` broadcastable to ``[num_windows, heads, n, n]`` (2 to 4 dims; e.g. CrossFormer's
dynamic position bias ``[heads, n, n]`` or a per-window mask ``[num_windows, 1, n, n]``).
``KeyPaddingMask`` is refused; models that pad (Swin, Twins at odd sizes) pad the grid before.

Backends without a window kernel of their own serve a window through
``fastvit.attention.partition`` (the windows gathered into a batch); the triton backend addresses
the windows in place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Window"]


def _pair(value, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
        raise ValueError(f"Window {name} must be an int or a pair of ints, got {value!r}")
    return pair


@dataclass(frozen=True)
class Window:
    """Window geometry of an attention call (see the module docstring).

    Args:
        grid: ``(H, W)`` of the token grid; the sequence length must be ``H * W``.
        size: ``(wh, ww)`` tokens per window; must divide the grid (times the dilation).
        shift: ``(sh, sw)`` cyclic shift, ``0 <= shift < size`` (Swin).
        dilation: ``(dh, dw)`` stride between a window's tokens (CrossFormer long distance, MaxViT grid).
    """

    grid: tuple
    size: tuple
    shift: tuple = (0, 0)
    dilation: tuple = (1, 1)

    def __post_init__(self):
        for name in ("grid", "size", "shift", "dilation"):
            object.__setattr__(self, name, _pair(getattr(self, name), name))
        (H, W), (wh, ww), (sh, sw), (dh, dw) = self.grid, self.size, self.shift, self.dilation
        for name, pair, least in (("grid", self.grid, 1), ("size", self.size, 1), ("dilation", self.dilation, 1),
                                  ("shift", self.shift, 0)):
            if min(pair) < least:
                raise ValueError(f"Window {name}={pair} must be >= {least}")
        if H % (wh * dh) or W % (ww * dw):
            raise ValueError(f"Window size={self.size} with dilation={self.dilation} does not divide the grid "
                             f"{self.grid}: H must be a multiple of {wh * dh} and W of {ww * dw} "
                             f"(pad the grid before attending)")
        if sh >= wh or sw >= ww:
            raise ValueError(f"Window shift={self.shift} must be smaller than size={self.size}")
        if self.shifted and self.dilated:
            raise ValueError(f"Window shift={self.shift} and dilation={self.dilation} together are not supported")

    @property
    def tokens(self) -> int:
        """Tokens per window, ``wh * ww``."""
        return self.size[0] * self.size[1]

    @property
    def num_windows(self) -> int:
        return (self.grid[0] // self.size[0]) * (self.grid[1] // self.size[1])

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def shifted(self) -> bool:
        return self.shift != (0, 0)

    @property
    def dilated(self) -> bool:
        return self.dilation != (1, 1)

    def describe(self) -> str:
        """``win7x7-grid56x56`` (+ ``-shift3x3`` / ``-dil8x8``)."""
        parts = [f"win{self.size[0]}x{self.size[1]}", f"grid{self.grid[0]}x{self.grid[1]}"]
        if self.shifted:
            parts.append(f"shift{self.shift[0]}x{self.shift[1]}")
        if self.dilated:
            parts.append(f"dil{self.dilation[0]}x{self.dilation[1]}")
        return "-".join(parts)

    def token_index(self, device=None) -> Tensor:
        """``[num_windows, n]`` int64: the raster token of each window position."""
        return _token_index(self.grid, self.size, self.shift, self.dilation, torch.device(device or "cpu"))

    def inverse_index(self, device=None) -> Tensor:
        """``[H*W]`` int64: where each raster token sits in the window-major order of ``token_index``."""
        return _inverse_index(self.grid, self.size, self.shift, self.dilation, torch.device(device or "cpu"))

    def region_mask(self, device=None):
        """``[num_windows, n, n]`` bool (True = may attend), or None when nothing is masked (no shift)."""
        if not self.shifted:
            return None
        return _region_mask(self.grid, self.size, self.shift, torch.device(device or "cpu"))


def _axis_coords(length: int, size: int, shift: int, dilation: int) -> tuple[Tensor, Tensor]:
    """Per axis: ``[num_windows_axis, size]`` grid coordinate and wrap side of every window position."""
    count = length // size
    wr = torch.arange(count)[:, None]
    i = torch.arange(size)[None, :]
    if dilation > 1:
        block, offset = wr // dilation, wr % dilation
        coord = block * size * dilation + offset + i * dilation
        side = torch.zeros_like(coord, dtype=torch.bool)
    else:
        rolled = wr * size + i
        coord = (rolled + shift) % length
        side = rolled >= length - shift if shift else torch.zeros_like(coord, dtype=torch.bool)
    return coord, side


@functools.lru_cache(maxsize=64)
def _token_index(grid, size, shift, dilation, device) -> Tensor:
    rows, _ = _axis_coords(grid[0], size[0], shift[0], dilation[0])  # (nwh, wh)
    cols, _ = _axis_coords(grid[1], size[1], shift[1], dilation[1])  # (nww, ww)
    # (nwh, nww, wh, ww) -> (num_windows, n)
    index = rows[:, None, :, None] * grid[1] + cols[None, :, None, :]
    return index.reshape(-1, size[0] * size[1]).to(device)


@functools.lru_cache(maxsize=64)
def _inverse_index(grid, size, shift, dilation, device) -> Tensor:
    index = _token_index(grid, size, shift, dilation, torch.device("cpu")).reshape(-1)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel())
    return inverse.to(device)


@functools.lru_cache(maxsize=64)
def _region_mask(grid, size, shift, device) -> Tensor:
    _, row_side = _axis_coords(grid[0], size[0], shift[0], 1)
    _, col_side = _axis_coords(grid[1], size[1], shift[1], 1)
    # region id per window position: (nwh, nww, wh, ww) -> (num_windows, n)
    region = (row_side.long() * 2)[:, None, :, None] + col_side.long()[None, :, None, :]
    region = region.reshape(-1, size[0] * size[1])
    return (region[:, :, None] == region[:, None, :]).to(device)
