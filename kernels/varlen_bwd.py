"""The backward kernels of the variable-length (packed) family, FlashAttention-2's passes over each
sequence's own block: ``_varlen_bwd_dkdv`` (one program per key block of a sequence, looping over that
sequence's query blocks) and ``_varlen_bwd_dq`` (one program per query block, looping over its keys).
``delta = rowsum(dO * O)`` does not depend on the sequences: the attention family's
``_attn_bwd_preprocess`` computes it over the packed rows. Launchers: ``kernels/varlen.py``."""
from __future__ import annotations

from .attention_bwd import _dkdv_step, _dq_step
from .tiles import _load_tile, _load_vec, _store_tile
from .triton_compat import tl, triton
from .varlen_fwd import _sequence


@triton.jit
def _varlen_bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, KBlocks,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_dom,
    stride_dkh, stride_dkn, stride_dvh, stride_dvn,
    num_blocks, Nq, D, Dv, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_N keys of one sequence and head; loops over the sequence's query blocks on
    transposed (keys x queries) tiles. Query rows past the sequence's end are clamped onto its last row
    and get p = 0 from lse = +inf (`_dkdv_step`); keys past its end are masked on load and store."""
    pid = tl.program_id(0)
    blk = pid % num_blocks
    off_h = pid // num_blocks
    q_start, len_q, k_start, len_k, start_n = _sequence(KBlocks, CuQ, CuK, blk)
    cols = start_n + tl.arange(0, BLOCK_N)
    key_ok = cols < len_k
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q += off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    DOut += off_h.to(tl.int64) * stride_doh + q_start.to(tl.int64) * stride_dom
    Lse += off_h.to(tl.int64) * Nq + q_start
    Delta += off_h.to(tl.int64) * Nq + q_start
    k = _load_tile(K + off_h.to(tl.int64) * stride_kh + (k_start + cols).to(tl.int64)[:, None] * stride_kn
                   + offs_d[None, :], key_ok[:, None], offs_d[None, :] < D, False, EVEN_D)
    v = _load_tile(V + off_h.to(tl.int64) * stride_vh + (k_start + cols).to(tl.int64)[:, None] * stride_vn
                   + offs_dv[None, :], key_ok[:, None], offs_dv[None, :] < Dv, False, EVEN_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, len_q, BLOCK_M):  # no bias: the step's bias arguments are unused placeholders
        dk, dv = _dkdv_step(dk, dv, k, v, None, Q, DOut, Lse, Delta, K, K, cols, K, start_m, offs_m, offs_d,
                            offs_dv, stride_qm, stride_dom, 0, 0, len_q, D, Dv, qk_scale, 1.0, False, EVEN_D,
                            False, False, False, FP32_IEEE, UPCAST_DOT)

    dk *= scale
    _store_tile(DK + off_h.to(tl.int64) * stride_dkh + (k_start + cols).to(tl.int64)[:, None] * stride_dkn
                + offs_d[None, :], dk.to(DK.dtype.element_ty), key_ok[:, None], offs_d[None, :] < D, False, EVEN_D)
    _store_tile(DV + off_h.to(tl.int64) * stride_dvh + (k_start + cols).to(tl.int64)[:, None] * stride_dvn
                + offs_dv[None, :], dv.to(DV.dtype.element_ty), key_ok[:, None], offs_dv[None, :] < Dv, False,
                EVEN_D)


@triton.jit
def _varlen_bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, QBlocks,
    stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_doh, stride_dom,
    stride_dqh, stride_dqm,
    num_blocks, Nq, D, Dv, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_M queries of one sequence and head; loops over the sequence's key blocks for
    dQ (the partial one masked and first, the full ones unmasked, as `_attn_bwd_dq`)."""
    pid = tl.program_id(0)
    blk = pid % num_blocks
    off_h = pid // num_blocks
    q_start, len_q, k_start, len_k, start_m = _sequence(QBlocks, CuQ, CuK, blk)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    K += off_h.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    V += off_h.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    q = _load_tile(Q + off_h.to(tl.int64) * stride_qh + (q_start + rows).to(tl.int64)[:, None] * stride_qm
                   + offs_d[None, :], row_ok[:, None], offs_d[None, :] < D, False, EVEN_D)
    do = _load_tile(DOut + off_h.to(tl.int64) * stride_doh + (q_start + rows).to(tl.int64)[:, None] * stride_dom
                    + offs_dv[None, :], row_ok[:, None], offs_dv[None, :] < Dv, False, EVEN_D)
    lse = _load_vec(Lse + off_h.to(tl.int64) * Nq + q_start + rows, row_ok, float("inf"), True)  # p = 0 past the end
    delta = _load_vec(Delta + off_h.to(tl.int64) * Nq + q_start + rows, row_ok, 0.0, True)
    lse2 = lse * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if FP32_IEEE:  # one loop, masks on every block: see `_attn_fwd`
        for start_n in range(0, len_k, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, K, V, K, rows, K, rows, K, rows, K, K, start_n, offs_n, offs_d,
                          offs_dv, stride_kn, stride_vn, len_k, D, Dv, qk_scale, 1.0, True, EVEN_D, False, False,
                          False, False, FP32_IEEE, UPCAST_DOT)
    else:
        n_full = (len_k // BLOCK_N) * BLOCK_N
        if n_full < len_k:  # the partial block first (see `_attn_bwd_dq`)
            dq = _dq_step(dq, q, do, lse2, delta, K, V, K, rows, K, rows, K, rows, K, K, n_full, offs_n, offs_d,
                          offs_dv, stride_kn, stride_vn, len_k, D, Dv, qk_scale, 1.0, True, EVEN_D, False, False,
                          False, False, FP32_IEEE, UPCAST_DOT)
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, K, V, K, rows, K, rows, K, rows, K, K, start_n, offs_n, offs_d,
                          offs_dv, stride_kn, stride_vn, len_k, D, Dv, qk_scale, 1.0, False, EVEN_D, False, False,
                          False, False, FP32_IEEE, UPCAST_DOT)

    dq *= scale
    _store_tile(DQ + off_h.to(tl.int64) * stride_dqh + (q_start + rows).to(tl.int64)[:, None] * stride_dqm
                + offs_d[None, :], dq.to(DQ.dtype.element_ty), row_ok[:, None], offs_d[None, :] < D, False, EVEN_D)
