"""Tile helpers shared by the attention kernels (``@triton.jit``, inlined into their callers): the
matmul with its dtype switches, masked or unmasked tile and vector loads and stores, the bias tile
(dense and/or gathered relative-position) and the biased logits of one ``QK^T`` tile."""
from __future__ import annotations

from .triton_compat import tl, triton


@triton.jit
def _mma(a, b, acc, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``a @ b + acc`` (``acc`` may be None) with fp32 accumulation.

    FP32_IEEE: fp32 inputs multiply in IEEE fp32; off, fp32 inputs use TF32 tensor cores (the
    launcher sets it from ``torch.backends.cuda.matmul.allow_tf32``; 16-bit inputs ignore it).
    UPCAST_DOT: only under TRITON_INTERPRET=1 with bf16 inputs: the interpreter (triton 3.x)
    multiplies bf16 as raw uint16 bits in tl.dot. bf16 -> fp32 is exact, so the result is the same.
    """
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif FP32_IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A tile load that compiles its masks away when the extents are known to be in bounds."""
    if EVEN_ROWS and EVEN_COLS:
        tile = tl.load(ptrs)
    elif EVEN_ROWS:
        tile = tl.load(ptrs, mask=col_ok, other=0.0)
    elif EVEN_COLS:
        tile = tl.load(ptrs, mask=row_ok, other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, value, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS and EVEN_COLS:
        tl.store(ptrs, value)
    elif EVEN_ROWS:
        tl.store(ptrs, value, mask=col_ok)
    elif EVEN_COLS:
        tl.store(ptrs, value, mask=row_ok)
    else:
        tl.store(ptrs, value, mask=row_ok & col_ok)


@triton.jit
def _load_vec(ptrs, ok, other, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=ok, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _clamped_query_tiles(Q, DOut, rows, offs_d, offs_dv, stride_qm, stride_dom, Nq, D, Dv,
                         EVEN_M: tl.constexpr, EVEN_D: tl.constexpr):
    """``(rows_in, q, do)`` of a query block on the backward's transposed tiles: rows past Nq (unless
    EVEN_M) read the last row instead of being masked (their lse = +inf gives them p = 0)."""
    if EVEN_M:
        rows_in = rows
    else:
        rows_in = tl.minimum(rows, Nq - 1)
    q = _load_tile(Q + rows_in[:, None] * stride_qm + offs_d[None, :], None, offs_d[None, :] < D, True, EVEN_D)
    do = _load_tile(DOut + rows_in[:, None] * stride_dom + offs_dv[None, :], None, offs_dv[None, :] < Dv,
                    True, EVEN_D)
    return rows_in, q, do


@triton.jit
def _bias_tile(Dense, dense_offs, Index, index_offs, TableRow, in_bounds,
               MASKED: tl.constexpr, HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr):
    """``table[h, index[i, j]] + dense[i, j]`` in fp32 for one tile. ``Dense`` is the (batch, head)
    slice and ``*_offs`` the tile's int64 offsets (row * row stride + column: no int32 product can
    overflow however large ``Nq * Nk`` is); ``TableRow`` is head h's row of the ``[H, T]`` table.
    MASKED: only the tile on the last partial block checks ``in_bounds``."""
    if HAS_REL:
        rel_index = _load_vec(Index + index_offs, in_bounds, 0, MASKED)  # row 0 of the table: in range
        bias = tl.load(TableRow + rel_index).to(tl.float32)
    if HAS_DENSE:
        dense = _load_vec(Dense + dense_offs, in_bounds, 0.0, MASKED).to(tl.float32)
        if HAS_REL:
            bias += dense
        else:
            bias = dense
    return bias


@triton.jit
def _logits(a, b, Dense, dense_offs, Index, index_offs, TableRow, in_bounds, qk_scale, inv_scale,
            MASKED: tl.constexpr, HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr,
            FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """A tile of logits in log2 units: ``(a @ b) * scale * log2(e) + bias * log2(e)``; ``a @ b`` is
    ``q @ k^T`` or, transposed, ``k @ q^T``. Key masks are the caller's.

    The bias enters as the matmul's accumulator, ``(a @ b + bias / scale) * scale * log2(e)``:
    that puts it in the matmul's register layout once, so the softmax stays in that layout too.
    Added after the matmul, the bias tile's load layout wins instead and the logits are shuffled
    through shared memory every step, which costs registers and spills.
    """
    if HAS_REL or HAS_DENSE:
        bias = _bias_tile(Dense, dense_offs, Index, index_offs, TableRow, in_bounds, MASKED, HAS_REL, HAS_DENSE)
        s = _mma(a, b, bias * inv_scale, FP32_IEEE, UPCAST_DOT) * qk_scale
    else:
        s = _mma(a, b, None, FP32_IEEE, UPCAST_DOT) * qk_scale
    return s
