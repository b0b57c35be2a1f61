"""Windowed attention for backends without a window kernel: the windows gathered into a batch.

``partitioned(inp, attend_windows)`` serves a call with a ``Window`` (``fastvit.attention.window``) by
copying the windows into a batch (one permuting copy of a view per tensor; shifted windows are copied
in up to 9 window-aligned pieces instead of a roll and a cut, except when autograd records the call;
for the reference the scale is folded into q's copy), attending, and copying back (in the memory order
of q, so a model's merge of the heads is a view). CPU inference does it a few window rows at a time
(``window_chunks``; not while traced into a graph). The triton backend needs none of this: its kernel
addresses the windows in place.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor

from ..runtime import tracing
from .bias import DenseBias, RelPosBias
from .inputs import AttnInputs, AttnOutput
from .window import Window

__all__ = ["partitioned", "window_inputs", "window_batch", "window_unbatch", "window_chunks"]


def _window_view(t: Tensor, win: Window) -> Tensor:
    """``(B, h, H*W, d)`` as the view ``(B, h, blocks_h, wh, dh, blocks_w, ww, dw, d)``: grid row
    ``(block * wh + i) * dh + o`` is position ``i`` of window row ``block * dh + o`` (columns alike)."""
    B, heads, _, d = t.shape
    (H, W), (wh, ww), (dh, dw) = win.grid, win.size, win.dilation
    return t.view(B, heads, H // (wh * dh), wh, dh, W // (ww * dw), ww, dw, d)


def _roll(t: Tensor, win: Window, sign: int) -> Tensor:
    """Swin's cyclic shift on the ``(B, h, H, W, d)`` view of raster tokens (a copy), ``sign=-1`` forward."""
    B, heads, _, d = t.shape
    rolled = torch.roll(t.view(B, heads, *win.grid, d), shifts=(sign * win.shift[0], sign * win.shift[1]), dims=(2, 3))
    return rolled.view(B, heads, win.seq_len, d)


def _shift_pieces(length: int, size: int, shift: int) -> list:
    """Swin's roll by ``-shift`` along one grid axis, cut window-aligned: ``(source slice, window slice,
    position slice)`` triples. Window position ``i`` of window ``w`` holds rolled coordinate ``w * size + i``,
    i.e. source coordinate ``(w * size + i + shift) % length``; each piece is a run of source coordinates
    that lands on whole windows (or on a run of positions of the last window) without wrapping."""
    if shift == 0:
        return [(slice(None), slice(None), slice(None))]
    last = length // size - 1  # the last window: its positions >= size - shift wrap around to the start
    pieces = [(slice(shift, shift + last * size), slice(0, last), slice(None)),
              (slice(last * size + shift, length), slice(last, last + 1), slice(0, size - shift)),
              (slice(0, shift), slice(last, last + 1), slice(size - shift, size))]
    return [p for p in pieces if p[1].stop > p[1].start]


def _shifted_copies(grid_view: Tensor, windows: Tensor, win: Window, to_windows: bool) -> None:
    """Copy between raster tokens and shifted windows without the two rolls: ``grid_view`` is ``(B, h, H,
    W, d)``, ``windows`` ``(B, bh, bw, h, wh, ww, d)`` (window order); ``to_windows`` gathers the windows,
    otherwise they are scattered back into the grid. One pass over the data in at most 9 strided copies
    (the roll and the window cut are 3 passes)."""
    (H, W), (wh, ww), (sh, sw) = win.grid, win.size, win.shift
    for rows, bh, i in _shift_pieces(H, wh, sh):
        for cols, bw, j in _shift_pieces(W, ww, sw):
            part = windows[:, bh, bw, :, i, j]  # (B, mr, mc, h, kr, kc, d)
            mr, mc, kr, kc = part.shape[1], part.shape[2], part.shape[4], part.shape[5]
            grid = grid_view[:, :, rows, cols].unflatten(3, (mc, kc)).unflatten(2, (mr, kr))
            grid = grid.permute(0, 2, 4, 1, 3, 5, 6)  # (B, h, mr, kr, mc, kc, d) -> the order of part
            if to_windows:
                part.copy_(grid)
            else:
                grid.copy_(part)


def _eager_copy(*tensors: Tensor) -> bool:
    """Whether copies into preallocated buffers may serve this call: no gradient is recorded, nothing traced."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and not tracing()


def _memory_order(t: Tensor) -> list:
    """The dims of a ``[B, h, N, d]`` tensor from outermost to innermost in memory (ties keep their order)."""
    return sorted(range(t.dim()), key=lambda i: -t.stride(i))


# A chunk of a window batch: (block rows, offsets) of the (B, h, blocks_h, wh, dh, ...) view, i.e. a run
# of consecutive window rows. ALL is the whole batch.
ALL = (slice(None), slice(None))

# Inference on the CPU attends the windows a few window rows at a time, about this many elements of q
# per chunk (1 MiB in fp32): each chunk's copies, logits and output stay in cache and in the allocator's
# free lists. The whole batch at once page-faults its copies in on every call (glibc trims the freed
# heap): Twins-SVT (224 px, batch 2, 2 threads, whose LSA projections are 8x wider than its map) took
# 1.04-1.09x its einops cut's time with one batch, 0.96-1.03x chunked (same-process paired runs).
CPU_CHUNK_ELEMENTS = 1 << 18


def window_batch(t: Tensor, win: Window, scale: Optional[float] = None, chunk: tuple = ALL) -> Tensor:
    """``[B, h, H*W, d]`` raster tokens -> ``[B * num_windows, h, n, d]`` windows in ``token_index`` order
    (only the window rows of ``chunk``).

    One copy (a permuting reshape of a view) whatever the layout of ``t``: a strided view of a fused
    projection or of a ``(b, h*d, H, W)`` map is read in place. Shifted windows are gathered in up to 9
    window-aligned strided copies (``_shifted_copies``), still one pass; only when autograd records the
    call (or a graph is traced) is the grid rolled first, one more copy.
    ``scale`` multiplies the copy in place when nothing needs a gradient (a new tensor if something
    does).
    """
    B, heads, _, d = t.shape
    if win.shifted and _eager_copy(t):
        (H, W), (wh, ww) = win.grid, win.size
        windows = torch.empty(B, H // wh, W // ww, heads, wh, ww, d, dtype=t.dtype, device=t.device)
        _shifted_copies(t.view(B, heads, H, W, d), windows, win, to_windows=True)
        if scale is not None:
            windows.mul_(scale)
        return windows.view(-1, heads, win.tokens, d)
    if win.shifted:
        t = _roll(t, win, -1)
    # (B, h, bh, i, oh, bw, j, ow, d) -> (B, bh, oh, bw, ow, h, i, j, d): windows outer, positions inner
    windows = _window_view(t, win)[:, :, chunk[0], :, chunk[1]].permute(0, 2, 4, 5, 7, 1, 3, 6, 8)
    shape = (-1, heads, win.tokens, d)
    if scale is None:
        return windows.reshape(shape)
    if not _eager_copy(t):
        return windows.reshape(shape) * scale
    # A fresh copy (a reshape may be a view of t when one window covers the grid), scaled in place:
    # cheaper than a multiply reading the strided view, and than a copy plus a scaled copy.
    copy = torch.empty(windows.shape, dtype=t.dtype, device=t.device)
    return copy.copy_(windows).mul_(scale).view(shape)


def _empty_like_layout(like: Tensor, dv: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty ``[B, h, N, dv]`` tensor laid out in the memory order of ``like`` (in ``like``'s dtype unless
    ``dtype`` is given)."""
    order = _memory_order(like)
    sizes = [*like.shape[:3], dv]
    buffer = torch.empty([sizes[dim] for dim in order], dtype=dtype or like.dtype, device=like.device)
    return buffer.permute(*[order.index(dim) for dim in range(4)])


def window_unbatch(out: Tensor, win: Window, like: Optional[Tensor] = None, into: Optional[Tensor] = None,
                   chunk: tuple = ALL) -> Tensor:
    """The inverse of ``window_batch``: ``[B * num_windows, h, n, dv]`` -> ``[B, h, H*W, dv]``.

    One copy, written in the memory order of ``like`` (the call's q): the output of a call on a
    ``(b, h*d, H, W)`` map is laid out as ``(b, h, d, H*W)`` and the output of a call on a fused
    ``(b, N, 3*h*d)`` projection as ``(b, N, h, d)``, so the model's merge of the heads is a view.
    With ``into`` (an unshifted call's ``[B, h, H*W, dv]`` output), the windows of ``chunk`` are
    written into it in place and it is returned.
    """
    heads, dv = out.shape[1], out.shape[-1]
    (H, W), (wh, ww), (dh, dw) = win.grid, win.size, win.dilation
    if into is not None:
        B = into.shape[0]
        dest = _window_view(into, win)[:, :, chunk[0], :, chunk[1]]  # (B, h, bh, i, oh, bw, j, ow, dv)
        src = out.view(B, dest.shape[2], dest.shape[4], W // (ww * dw), dw, heads, wh, ww, dv)
        dest.copy_(src.permute(0, 5, 1, 6, 2, 3, 7, 4, 8))
        return into
    B = out.shape[0] // win.num_windows
    if win.shifted and _eager_copy(out):
        result = (out.new_empty(B, heads, win.seq_len, dv) if like is None
                  else _empty_like_layout(like, dv, dtype=out.dtype))
        windows = out.view(B, H // wh, W // ww, heads, wh, ww, dv)
        _shifted_copies(result.view(B, heads, H, W, dv), windows, win, to_windows=False)
        return result
    blocks = (B, H // (wh * dh), dh, W // (ww * dw), dw, heads, wh, ww, dv)
    view = out.view(blocks)  # (B, bh, oh, bw, ow, h, i, j, dv)
    # Each dim of [B, h, N, dv] as dims of the view; N in raster order (bh, i, oh, bw, j, ow).
    parts = {0: [0], 1: [5], 2: [1, 6, 2, 3, 7, 4], 3: [8]}
    order = _memory_order(like) if like is not None else [0, 1, 2, 3]
    laid_out = view.permute(*[p for dim in order for p in parts[dim]])
    sizes = {0: B, 1: heads, 2: win.seq_len, 3: dv}
    flat = laid_out.reshape([sizes[dim] for dim in order])  # the copy
    if win.shifted:  # undo Swin's roll, keeping the memory order
        at = order.index(2)
        grid = flat.view(*flat.shape[:at], H, W, *flat.shape[at + 1:])
        flat = torch.roll(grid, shifts=win.shift, dims=(at, at + 1)).view(flat.shape)
    return flat.permute(*[order.index(dim) for dim in range(4)])


def window_chunks(inp: AttnInputs) -> list:
    """The chunks ``partitioned`` attends one after the other: ``[ALL]`` unless the call is inference on
    the CPU without a shift and its q holds more than ``CPU_CHUNK_ELEMENTS`` elements; then runs of
    consecutive window rows (whole blocks of dilated windows, or offsets within one block)."""
    win: Window = inp.window
    if inp.q.device.type != "cpu" or win.shifted or inp.needs_grad or tracing():
        return [ALL]
    B, heads, N, d = inp.q.shape
    H, wh, dh = win.grid[0], win.size[0], win.dilation[0]
    blocks, rows = H // (wh * dh), H // wh
    per_row = B * heads * d * N // rows  # elements of q in one window row
    k = max(1, CPU_CHUNK_ELEMENTS // per_row)  # window rows per chunk
    if k >= rows:
        return [ALL]
    if dh == 1 or k >= dh:
        step = max(1, k // dh)
        return [(slice(b, min(b + step, blocks)), slice(None)) for b in range(0, blocks, step)]
    return [(slice(b, b + 1), slice(o, min(o + k, dh))) for b in range(blocks) for o in range(0, dh, k)]


def partitioned(inp: AttnInputs, attend_windows: Callable, fold_scale: bool = False) -> AttnOutput:
    """Serve a windowed call by gathering its windows into a batch: ``attend_windows(inner)`` gets
    window-free ``AttnInputs`` of shape ``[B * windows, heads, n, D]`` (``window_inputs``) and returns
    an ``AttnOutput``; the output is put back in raster order (``window_unbatch``). CPU inference does
    it a few window rows at a time (``window_chunks``), writing each chunk into the output in place.
    ``fold_scale``: q's copy is scaled and the inner call gets ``scale=1`` (for a backend that would
    scale q in a pass of its own, the reference; SDPA and FlexAttention scale inside their kernels).

    Without a shift both directions are one permuting copy of a view (what an einops cut costs a
    model); a shift cuts each copy into up to 9 window-aligned pieces (a roll each way when autograd
    records the call). The shift mask becomes one more ``DenseBias`` (``0`` /
    ``-inf``, per window), and a per-window dense bias is repeated over the batch: these are the
    copies and the expanded mask a fused kernel avoids.
    """
    chunks = window_chunks(inp)
    if chunks == [ALL]:
        inner = window_inputs(inp, fold_scale=fold_scale)
        out = attend_windows(inner).out  # (b * nw, h, n, dv)
        # `inner` (the batched q, k, v) is freed only after the copy back, as when a model held its cut
        # windows: freed before it, the heap's top is trimmed and the copy back page-faults it in again
        # (glibc's default allocator; 3-6% of CrossFormer's and Twins-SVT's CPU time, measured).
        result = window_unbatch(out, inp.window, like=inp.q)
        del inner
        return AttnOutput(result)
    result = _empty_like_layout(inp.q, inp.value_dim)
    for chunk in chunks:
        inner = window_inputs(inp, chunk, fold_scale=fold_scale)
        window_unbatch(attend_windows(inner).out, inp.window, into=result, chunk=chunk)
    return AttnOutput(result)


def window_inputs(inp: AttnInputs, chunk: tuple = ALL, fold_scale: bool = False) -> AttnInputs:
    """Window-free ``AttnInputs`` of a windowed call (of the window rows of ``chunk``): q, k, v as
    ``[B * windows, heads, n, D]``, the biases per window (``RelPosBias`` as it is; ``DenseBias`` and
    the shift mask repeated over the batch). ``fold_scale``: q scaled, ``scale=1``."""
    win: Window = inp.window
    B = inp.q.shape[0]
    q = window_batch(inp.q, win, scale=inp.scale if fold_scale else None, chunk=chunk)
    nw = q.shape[0] // B
    if chunk == ALL:
        windows = slice(None)
    else:  # the chunk's window rows are consecutive: so are its windows
        first = (chunk[0].start or 0) * win.dilation[0] + (chunk[1].start or 0)  # its first window row
        per_row = win.grid[1] // win.size[1]  # windows per window row
        windows = slice(first * per_row, first * per_row + nw)

    def per_window(t: Tensor) -> Tensor:  # [nw|1, h|1, n, n] -> [b * nw | 1, h|1, n, n]
        if t.shape[0] == 1:
            return t
        t = t[windows]
        return t.unsqueeze(0).expand(B, *t.shape).reshape(B * nw, *t.shape[1:])

    bias = []
    for b in inp.bias:
        if isinstance(b, RelPosBias):
            bias.append(b)
        else:
            bias.append(DenseBias(per_window(b.materialize())))
    allowed = win.region_mask(inp.q.device)
    if allowed is not None:
        mask = torch.zeros(allowed.shape, dtype=inp.dtype, device=inp.q.device)
        mask.masked_fill_(~allowed, float("-inf"))
        bias.append(DenseBias(per_window(mask.unsqueeze(1))))
    return replace(inp, q=q, k=window_batch(inp.k, win, chunk=chunk), v=window_batch(inp.v, win, chunk=chunk),
                   scale=1.0 if fold_scale else inp.scale, bias=tuple(bias), window=None)

