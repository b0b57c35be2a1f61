"""Window geometry in-kernel, shared by the window family's kernels (``window_fwd.py``,
``window_bwd.py``): where a window starts on the grid, which program does which (window, block),
the grid tokens of a tile's window positions (plain, dilated or shifted, padded positions clamped
onto the last), and the mask of keys in another shift region or past the window. The math and the
layout are in ``window_attention.py``'s docstring."""
from __future__ import annotations

from .triton_compat import tl, triton


@triton.jit
def _window_origin(w, num_win_w, win_h, win_w, dil_h, dil_w):
    """Grid row and column of position (0, 0) of window ``w``, before the shift: window row
    ``wr = block * dil_h + offset`` starts at row ``block * win_h * dil_h + offset``."""
    win_row = w // num_win_w
    win_col = w - win_row * num_win_w
    row0 = (win_row // dil_h) * (win_h * dil_h) + win_row % dil_h
    col0 = (win_col // dil_w) * (win_w * dil_w) + win_col % dil_w
    return row0, col0


@triton.jit
def _block_program(pid, n, BLOCK: tl.constexpr, num_windows, heads):
    """The coordinates of a (batch, head, window, block) program of a 1-D grid (block fastest, then
    window, then batch * heads): the block's first window position, the window, the (batch, head)
    slice and its batch and head."""
    num_blocks = tl.cdiv(n, BLOCK)
    start = (pid % num_blocks) * BLOCK
    pid_w = pid // num_blocks
    w = pid_w % num_windows
    pid_bh = pid_w // num_windows
    return start, w, pid_bh, pid_bh // heads, pid_bh % heads


@triton.jit
def _window_tokens(t, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w,
                   CLAMP: tl.constexpr, SHIFT: tl.constexpr):
    """Raster token index of window-local positions ``t`` and, with SHIFT, their wrap region (0..3).
    With CLAMP, positions past ``n`` (a window padded to the tile) are read as position ``n - 1``:
    every load stays in the tensor without a row mask; callers mask or never store those rows. The
    roll by ``-shift`` is ``(r + shift) % H`` written as one compare and select; the same compare
    says on which side of the wrap the row lies."""
    if CLAMP:
        t = tl.minimum(t, n - 1)
    i = t // win_w
    j = t - i * win_w
    r = row0 + i * dil_h
    c = col0 + j * dil_w
    if SHIFT:
        wrap_r = r >= grid_h - shift_h
        wrap_c = c >= grid_w - shift_w
        r = tl.where(wrap_r, r - (grid_h - shift_h), r + shift_h)
        c = tl.where(wrap_c, c - (grid_w - shift_w), c + shift_w)
        region = wrap_r.to(tl.int32) * 2 + wrap_c.to(tl.int32)
    else:
        region = i  # unused without SHIFT
    return r * grid_w + c, region


@triton.jit
def _mask_keys(s, region_m, region_n, t_n, n, MASK_N: tl.constexpr, SHIFT: tl.constexpr):
    """``-inf`` where key ``t_n`` is padding (MASK_N) or from another wrap region than the query
    (SHIFT); one tile compare for both: a padded key's region becomes -1."""
    if SHIFT:
        if MASK_N:
            region_n = tl.where(t_n < n, region_n, -1)
        s = tl.where(region_m[:, None] == region_n[None, :], s, float("-inf"))
    elif MASK_N:
        s = tl.where((t_n < n)[None, :], s, float("-inf"))
    return s
