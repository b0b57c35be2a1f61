"""The backward kernels of the attention family for any sequence length (FlashAttention-2's three
passes): ``_attn_bwd_preprocess`` (``delta = rowsum(dO * O)``), ``_attn_bwd_dkdv`` (one program per
key block, looping over query blocks) and ``_attn_bwd_dq`` (one program per query block, looping over
key blocks; it also writes ``dS``, the bias gradient). Launchers: ``kernels/attention.py``."""
from __future__ import annotations

from .tiles import _bias_tile, _clamped_query_tiles, _load_tile, _load_vec, _logits, _mma, _store_tile
from .triton_compat import tl, triton


@triton.jit
def _attn_bwd_preprocess(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, Nq, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
):
    """``delta[i] = sum_d dO[i, d] * O[i, d]`` (fp32), which is ``rowsum(P * dP)``."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid_bh = pid // num_m_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows[:, None] < Nq
    col_ok = offs_dv[None, :] < Dv
    o = _load_tile(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                   + rows[:, None] * stride_om + offs_dv[None, :], row_ok, col_ok, EVEN_M, EVEN_D)
    do = _load_tile(DOut + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                    + rows[:, None] * stride_dom + offs_dv[None, :], row_ok, col_ok, EVEN_M, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    delta_ptrs = Delta + pid_bh.to(tl.int64) * Nq + rows
    if EVEN_M:
        tl.store(delta_ptrs, delta)
    else:
        tl.store(delta_ptrs, delta, mask=rows < Nq)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, key_ok, Q, DOut, Lse, Delta, Dense, Index, cols_in, TableRow,
    start_m, offs_m, offs_d, offs_dv, stride_qm, stride_dom, stride_dm, stride_im,
    Nq, D, Dv, qk_scale, inv_scale,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One query block of the dK/dV loop, on transposed (keys x queries) tiles.

    No tile needs a mask on any block: query rows past Nq (the last block, unless EVEN_M) read the
    last row of q, dO and the bias instead (a [BLOCK_M] clamp), and their lse loads as +inf, so their
    p = 0 and they add exactly 0 to dK and dV. Only the two [BLOCK_M] vectors lse, delta are masked.
    """
    rows = start_m + offs_m
    rows_in, q, do = _clamped_query_tiles(Q, DOut, rows, offs_d, offs_dv, stride_qm, stride_dom, Nq, D, Dv,
                                          EVEN_M, EVEN_D)
    lse = _load_vec(Lse + rows, rows < Nq, float("inf"), not EVEN_M)
    delta = _load_vec(Delta + rows, rows < Nq, 0.0, not EVEN_M)
    if HAS_REL or HAS_DENSE:
        # Loaded in the natural (queries x keys) orientation, contiguous along keys, then
        # transposed; int64 row offsets (Nq * Nk may exceed 2**31).
        bias = _bias_tile(Dense, rows_in.to(tl.int64)[:, None] * stride_dm + cols_in[None, :],
                          Index, rows_in.to(tl.int64)[:, None] * stride_im + cols_in[None, :], TableRow,
                          None, False, HAS_REL, HAS_DENSE)
        s_t = _mma(k, tl.trans(q), tl.trans(bias) * inv_scale, FP32_IEEE, UPCAST_DOT) * qk_scale
    else:
        s_t = _mma(k, tl.trans(q), None, FP32_IEEE, UPCAST_DOT) * qk_scale  # (BLOCK_N, BLOCK_M)
    if HAS_PAD:
        s_t = tl.where(key_ok[:, None], s_t, float("-inf"))
    p_t = tl.exp2(s_t - lse[None, :] * 1.4426950408889634)
    dv = _mma(p_t.to(do.dtype), do, dv, FP32_IEEE, UPCAST_DOT)
    dp_t = _mma(v, tl.trans(do), None, FP32_IEEE, UPCAST_DOT)
    ds_t = p_t * (dp_t - delta[None, :])  # dL/ds, s in natural units
    dk = _mma(ds_t.to(q.dtype), q, dk, FP32_IEEE, UPCAST_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_th, stride_im, stride_db, stride_dh, stride_dm, stride_pb,
    H, Nq, Nk, D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, head); loops over all query blocks.

    Works on transposed tiles (keys x queries) so dK and dV accumulate without a transpose. No
    tile in the loop is masked: query rows past Nq are clamped onto the last row and get p = 0 from
    lse = +inf (see `_dkdv_step`; cheaper in registers than a peeled masked last block, which made
    ptxas spill on sm_80). Keys past Nk need no mask at all: a row of dK or dV depends only on its
    own key, and those rows are never stored (their bias loads read the last key instead).
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(Nk, BLOCK_N)
    pid_bh = pid // num_n_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    start_n = (pid % num_n_blocks) * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    cols = start_n + offs_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    DOut += off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    Lse += pid_bh.to(tl.int64) * Nq
    Delta += pid_bh.to(tl.int64) * Nq
    k = _load_tile(K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
                   + cols[:, None] * stride_kn + offs_d[None, :],
                   cols[:, None] < Nk, offs_d[None, :] < D, EVEN_N, EVEN_D)
    v = _load_tile(V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
                   + cols[:, None] * stride_vn + offs_dv[None, :],
                   cols[:, None] < Nk, offs_dv[None, :] < Dv, EVEN_N, EVEN_D)
    if HAS_PAD:  # loop-invariant: one load per program
        key_ok = _load_vec(KeyPad + off_b.to(tl.int64) * stride_pb + cols, cols < Nk, 0, not EVEN_N) != 0
    else:
        key_ok = None

    if EVEN_N:
        cols_in = cols
    else:  # keys past Nk read the last key's bias (their rows of dK, dV are never stored)
        cols_in = tl.minimum(cols, Nk - 1)
    Dense = DenseBias + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
    TableRow = RelTable + off_h.to(tl.int64) * stride_th

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, key_ok, Q, DOut, Lse, Delta, Dense, RelIndex, cols_in,
                            TableRow, start_m, offs_m, offs_d, offs_dv, stride_qm, stride_dom, stride_dm,
                            stride_im, Nq, D, Dv, qk_scale, inv_scale, EVEN_M, EVEN_D,
                            HAS_REL, HAS_DENSE, HAS_PAD, FP32_IEEE, UPCAST_DOT)

    dk *= scale
    _store_tile(DK + off_b.to(tl.int64) * stride_dkb + off_h.to(tl.int64) * stride_dkh
                + cols[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                cols[:, None] < Nk, offs_d[None, :] < D, EVEN_N, EVEN_D)
    _store_tile(DV + off_b.to(tl.int64) * stride_dvb + off_h.to(tl.int64) * stride_dvh
                + cols[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
                cols[:, None] < Nk, offs_dv[None, :] < Dv, EVEN_N, EVEN_D)


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, K, V, DS, ds_rows, Dense, dense_rows, Index, index_rows, TableRow, KeyPad,
    start_n, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv, qk_scale, inv_scale,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr, STORE_DS: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One key block of the dQ loop. MASK_N only on the last, partial key block."""
    cols = start_n + offs_n
    col_ok = cols < Nk
    k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :],
                   col_ok[:, None], offs_d[None, :] < D, not MASK_N, EVEN_D)
    v = _load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :],
                   col_ok[:, None], offs_dv[None, :] < Dv, not MASK_N, EVEN_D)
    s = _logits(q, tl.trans(k), Dense, dense_rows[:, None] + cols[None, :], Index,
                index_rows[:, None] + cols[None, :], TableRow, col_ok[None, :], qk_scale, inv_scale, MASK_N,
                HAS_REL, HAS_DENSE, FP32_IEEE, UPCAST_DOT)
    if HAS_PAD:
        attend = _load_vec(KeyPad + cols, col_ok, 0, MASK_N)
        s = tl.where(attend[None, :] != 0, s, float("-inf"))
    if MASK_N:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dp = _mma(do, tl.trans(v), None, FP32_IEEE, UPCAST_DOT)
    ds = p * (dp - delta[:, None])
    if STORE_DS:  # plain stores into this batch element's padded buffer: no masks, no atomics
        tl.store(DS + ds_rows[:, None] + cols[None, :], ds)
    dq = _mma(ds.to(k.dtype), k, dq, FP32_IEEE, UPCAST_DOT)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, DS,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_sbh, stride_sm,
    stride_th, stride_im, stride_db, stride_dh, stride_dm, stride_pb,
    H, Nq, Nk, D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr, STORE_DS: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); loops over all key blocks for dQ (the
    partial last one masked and first, the full blocks unmasked).

    ``dS`` is also the gradient of the additive biases. With STORE_DS each program writes its dS
    tiles with plain stores into DS, an fp32 ``[B, H, Nq_pad, Nk_pad]`` buffer padded to block
    multiples (every (batch, head, query, key) has its own element, so there are no atomics and no
    masks); the launcher sums it over the batch in a fixed order.
    """
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid_bh = pid // num_m_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    start_m = (pid % num_m_blocks) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    q = _load_tile(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                   + rows[:, None] * stride_qm + offs_d[None, :],
                   rows[:, None] < Nq, offs_d[None, :] < D, EVEN_M, EVEN_D)
    do = _load_tile(DOut + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                    + rows[:, None] * stride_dom + offs_dv[None, :],
                    rows[:, None] < Nq, offs_dv[None, :] < Dv, EVEN_M, EVEN_D)
    # +inf makes p = 0 on the rows past Nq
    lse = _load_vec(Lse + pid_bh.to(tl.int64) * Nq + rows, rows < Nq, float("inf"), not EVEN_M)
    delta = _load_vec(Delta + pid_bh.to(tl.int64) * Nq + rows, rows < Nq, 0.0, not EVEN_M)
    lse2 = lse * 1.4426950408889634

    if EVEN_M:
        rows_in = rows
    else:  # rows past Nq read the last row's bias (p = 0 there: lse = +inf)
        rows_in = tl.minimum(rows, Nq - 1)
    Dense = DenseBias + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
    TableRow = RelTable + off_h.to(tl.int64) * stride_th
    KeyPad += off_b.to(tl.int64) * stride_pb
    dense_rows = rows_in.to(tl.int64) * stride_dm  # int64: Nq * Nk may exceed 2**31
    index_rows = rows_in.to(tl.int64) * stride_im
    DS += pid_bh.to(tl.int64) * stride_sbh
    ds_rows = rows.to(tl.int64) * stride_sm  # the buffer is padded: rows past Nq are in it

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if FP32_IEEE and not EVEN_N:  # one loop, masks on every block: see `_attn_fwd`
        for start_n in range(0, Nk, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, K, V, DS, ds_rows, Dense, dense_rows, RelIndex, index_rows,
                          TableRow, KeyPad, start_n, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv,
                          qk_scale, inv_scale, True, EVEN_D, HAS_REL, HAS_DENSE, HAS_PAD, STORE_DS, FP32_IEEE,
                          UPCAST_DOT)
    else:
        n_full = (Nk // BLOCK_N) * BLOCK_N
        if not EVEN_N:  # the partial block first: peeled after the loop it serialised wgmma (see `_attn_fwd`)
            dq = _dq_step(dq, q, do, lse2, delta, K, V, DS, ds_rows, Dense, dense_rows, RelIndex, index_rows,
                          TableRow, KeyPad, n_full, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv, qk_scale,
                          inv_scale, True, EVEN_D, HAS_REL, HAS_DENSE, HAS_PAD, STORE_DS, FP32_IEEE, UPCAST_DOT)
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, K, V, DS, ds_rows, Dense, dense_rows, RelIndex, index_rows,
                          TableRow, KeyPad, start_n, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv, qk_scale,
                          inv_scale, False, EVEN_D, HAS_REL, HAS_DENSE, HAS_PAD, STORE_DS, FP32_IEEE, UPCAST_DOT)

    dq *= scale
    _store_tile(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
                + rows[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                rows[:, None] < Nq, offs_d[None, :] < D, EVEN_M, EVEN_D)
