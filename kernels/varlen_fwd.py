"""The forward kernels of the variable-length (packed) family: ``_varlen_fwd`` (the online softmax of
``_attn_fwd`` over one sequence's keys) and ``_varlen_cls_probs`` (the probabilities of each
sequence's first query over its own keys). The math, the layout and the block tables are in
``kernels/varlen.py``'s docstring; the launchers live there too.

Each program reads its (sequence, first row) from a block table, so the grid covers the query blocks
of the real sequences only: no program, and no tile, is spent on padding between sequences.
"""
from __future__ import annotations

from .attention_fwd import _fwd_step
from .tiles import _load_tile, _store_tile
from .triton_compat import tl, triton


@triton.jit
def _sequence(Blocks, CuQ, CuK, blk):
    """``(q_start, len_q, k_start, len_k, start)`` of block-table entry ``blk``: its sequence's offsets
    and lengths, and the entry's first row within that sequence."""
    seq = tl.load(Blocks + 2 * blk)
    start = tl.load(Blocks + 2 * blk + 1)
    q_start = tl.load(CuQ + seq)
    k_start = tl.load(CuK + seq)
    len_q = tl.load(CuQ + seq + 1) - q_start
    len_k = tl.load(CuK + seq + 1) - k_start
    return q_start, len_q, k_start, len_k, start


@triton.jit
def _varlen_fwd(
    Q, K, V, Out, Lse, CuQ, CuK, QBlocks,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_om,
    num_blocks, Nq, D, Dv, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one sequence and head, streaming over that sequence's keys.

    The grid is 1-D, the block-table entry fastest (a sequence's blocks are adjacent in the table, so
    the programs that share its K and V run together). Rows past the sequence's end are masked on
    load and store; its partial key block runs first with masks (as `_attn_fwd`'s), the full ones
    without. ``Nq`` is the packed query count (the row stride of ``lse``).
    """
    pid = tl.program_id(0)
    blk = pid % num_blocks
    off_h = pid // num_blocks
    q_start, len_q, k_start, len_k, start_m = _sequence(QBlocks, CuQ, CuK, blk)
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q += off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    K += off_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    V += off_h.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    q = _load_tile(Q + rows[:, None] * stride_qm + offs_d[None, :],
                   rows[:, None] < len_q, offs_d[None, :] < D, False, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # no bias in this family: the bias arguments of the step are unused placeholders
    if FP32_IEEE:  # one loop, masks on every block (a peeled copy of the IEEE step spills: see `_attn_fwd`)
        for start_n in range(0, len_k, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, K, rows, K, rows, K, K, start_n, offs_n, offs_d,
                                      offs_dv, stride_kn, stride_vn, len_k, D, Dv, qk_scale, 1.0, True, EVEN_D,
                                      False, False, False, FP32_IEEE, UPCAST_DOT)
    else:
        n_full = (len_k // BLOCK_N) * BLOCK_N
        if n_full < len_k:  # the partial key block first, as in `_attn_fwd` (after the loop it serialised wgmma)
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, K, rows, K, rows, K, K, n_full, offs_n, offs_d,
                                      offs_dv, stride_kn, stride_vn, len_k, D, Dv, qk_scale, 1.0, True, EVEN_D,
                                      False, False, False, FP32_IEEE, UPCAST_DOT)
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, K, rows, K, rows, K, K, start_n, offs_n, offs_d,
                                      offs_dv, stride_kn, stride_vn, len_k, D, Dv, qk_scale, 1.0, False, EVEN_D,
                                      False, False, False, FP32_IEEE, UPCAST_DOT)

    # every sequence has at least one key, so l_i >= 1 on every real row
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    row_ok = rows < len_q
    Out += off_h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    _store_tile(Out + rows[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
                row_ok[:, None], offs_dv[None, :] < Dv, False, EVEN_D)
    tl.store(Lse + off_h.to(tl.int64) * Nq + q_start + rows, lse, mask=row_ok)


@triton.jit
def _varlen_cls_probs(
    Q, K, Lse, Probs, CuQ, CuK, KBlocks,
    stride_qh, stride_qm, stride_kh, stride_kn,
    num_blocks, Nq, Nk, D, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """``exp(s[q0, j] - lse[q0])`` for BLOCK_N keys of one sequence, ``q0`` its first query: one row
    is a matrix-vector product (an elementwise multiply and a row sum), written packed into
    ``Probs [H, Nk]`` at the keys' own positions."""
    pid = tl.program_id(0)
    blk = pid % num_blocks
    off_h = pid // num_blocks
    q_start, _, k_start, len_k, start_n = _sequence(KBlocks, CuQ, CuK, blk)
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < len_k
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm + offs_d
    if EVEN_D:
        q0 = tl.load(q_ptrs).to(tl.float32)
    else:
        q0 = tl.load(q_ptrs, mask=offs_d < D, other=0.0).to(tl.float32)
    K += off_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :],
                   col_ok[:, None], offs_d[None, :] < D, False, EVEN_D).to(tl.float32)
    s = tl.sum(k * q0[None, :], 1) * qk_scale
    lse2 = tl.load(Lse + off_h.to(tl.int64) * Nq + q_start) * 1.4426950408889634
    p = tl.exp2(s - lse2)
    tl.store(Probs + off_h.to(tl.int64) * Nk + k_start + cols, p.to(Probs.dtype.element_ty), mask=col_ok)
