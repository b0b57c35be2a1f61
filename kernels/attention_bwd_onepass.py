"""The one-pass backward of the attention family for short sequences (``Nq, Nk <= onepass_max_n``):
one program per (batch, head) produces dQ, dK, dV (and dS, the bias gradient) in a single launch.

The three-pass backward (``kernels/attention_bwd.py``) computes ``S = QK^T`` and ``dP = dO V^T``
twice: once per key block for dK/dV and once per query block for dQ, seven matmuls per tile. Here
one program owns a whole (batch, head) and visits each (key block, query block) tile once, five
matmuls per tile:

    prologue      for each query block: delta = rowsum(dO * O) into Delta, lse * log2(e) into Lse2;
                  zero its rows of DQAcc
    main loop     for each key block j (k_j, v_j in registers, dk_j = dv_j = 0):
                      for each query block i (transposed tiles, keys x queries, as in dK/dV):
                          p_t   = exp2(s_t - lse2_i)        s_t = k_j q_i^T * scale * log2(e) (+ bias)
                          dv_j += p_t dO_i
                          ds_t  = p_t * (v_j dO_i^T - delta_i)
                          dk_j += ds_t q_i
                          DQAcc[i] += ds_t^T k_j             (a read-modify-write, see below)
                      store dk_j * scale, dv_j
    epilogue      for each query block: DQ = DQAcc * scale in the input dtype

``DQAcc`` is an fp32 ``[B * H, Nq_pad, BLOCK_D]`` scratch that only its own program touches, so
there are no atomics and the order of the additions is fixed (key block 0, 1, ...): bitwise
reproducible. It is small (``Nq_pad * BLOCK_D * 4`` bytes: 64 KiB at N = 256, D = 64) and stays in L2.
Threads of one program write a dQ tile in one key iteration and read it in the next, so a barrier
(``tl.debug_barrier``, a CTA-wide ``bar.sync`` that also orders the program's global memory
accesses) ends the prologue and every key iteration.

Masks: query rows past Nq are clamped onto the last row and get ``p = 0`` from ``lse = +inf`` (as in
dK/dV), so they contribute nothing; keys past Nk (the partial last key block) get ``s = -inf`` so
their ``p`` and ``dS`` are 0 for dQ and the bias gradient (their dK, dV rows are never stored). With
STORE_DS the program writes its ``dS`` tiles transposed, ``[B * H, Nk_pad, Nq_pad]`` fp32 with plain
stores (each element its own), and the launcher sums them over the batch in a fixed order.
Launcher: ``kernels/attention.py`` (``attention_bwd``).
"""
from __future__ import annotations

from .tiles import _bias_tile, _clamped_query_tiles, _load_tile, _load_vec, _mma, _store_tile
from .triton_compat import tl, triton


@triton.jit
def _onepass_step(
    dk, dv, k, v, key_ok, Q, DOut, Lse2, Delta, DQAcc, DS, Dense, Index, cols, cols_in, TableRow,
    start_m, offs_m, offs_d, offs_dv, stride_qm, stride_dom, stride_dm, stride_im, stride_sm,
    Nq, D, Dv, qk_scale, inv_scale,
    BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, MASK_KEYS: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, STORE_DS: tl.constexpr, BATCH_SUM: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One (key block, query block) tile: dK, dV accumulate in registers, dQ in the scratch."""
    rows = start_m + offs_m
    rows_in, q, do = _clamped_query_tiles(Q, DOut, rows, offs_d, offs_dv, stride_qm, stride_dom, Nq, D, Dv,
                                          EVEN_M, EVEN_D)
    lse2 = tl.load(Lse2 + rows)  # the prologue's padded buffers: +inf and 0 on rows past Nq
    delta = tl.load(Delta + rows)
    if HAS_REL or HAS_DENSE:
        bias = _bias_tile(Dense, rows_in.to(tl.int64)[:, None] * stride_dm + cols_in[None, :],
                          Index, rows_in.to(tl.int64)[:, None] * stride_im + cols_in[None, :], TableRow,
                          None, False, HAS_REL, HAS_DENSE)
        s_t = _mma(k, tl.trans(q), tl.trans(bias) * inv_scale, FP32_IEEE, UPCAST_DOT)
    else:
        s_t = _mma(k, tl.trans(q), None, FP32_IEEE, UPCAST_DOT)  # (BLOCK_N, BLOCK_M)
    s_t = s_t * qk_scale - lse2[None, :]  # one FFMA: log2 units, lse subtracted
    if MASK_KEYS:  # key padding and/or keys past Nk
        s_t = tl.where(key_ok[:, None], s_t, float("-inf"))
    p_t = tl.exp2(s_t)
    dv = _mma(p_t.to(do.dtype), do, dv, FP32_IEEE, UPCAST_DOT)
    dp_t = _mma(v, tl.trans(do), None, FP32_IEEE, UPCAST_DOT)
    ds_t = p_t * (dp_t - delta[None, :])  # dL/ds, s in natural units
    if STORE_DS:  # transposed buffer (keys x queries), padded: no masks
        ds_ptrs = DS + cols.to(tl.int64)[:, None] * stride_sm + rows[None, :]
        if BATCH_SUM:  # this program's sum over its batch elements, in their order
            tl.store(ds_ptrs, tl.load(ds_ptrs) + ds_t)
        else:
            tl.store(ds_ptrs, ds_t)
    ds_lo = ds_t.to(q.dtype)
    dk = _mma(ds_lo, q, dk, FP32_IEEE, UPCAST_DOT)
    dq_ptrs = DQAcc + rows[:, None] * BLOCK_D + offs_d[None, :]
    dq = _mma(tl.trans(ds_lo), k, None, FP32_IEEE, UPCAST_DOT)
    tl.store(dq_ptrs, tl.load(dq_ptrs) + dq)
    return dk, dv


@triton.jit
def _attn_bwd_onepass(
    Q, K, V, Out, DOut, Lse, Lse2, Delta, DQAcc, DQ, DK, DV, DS,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_sbh, stride_sm,
    stride_th, stride_im, stride_db, stride_dh, stride_dm, stride_pb,
    B, H, Nq, Nk, Nq_pad, D, Dv, batch_per_program, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr, STORE_DS: tl.constexpr,
    BATCH_SUM: tl.constexpr, BIAS_PADDED: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: the whole backward of one head for a run of ``batch_per_program`` batch
    elements (one, unless BATCH_SUM). See the module docstring."""
    pid = tl.program_id(0)
    off_h = pid % H
    b0 = (pid // H) * batch_per_program
    b1 = tl.minimum(b0 + batch_per_program, B)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # program-owned scratch, reused for each batch element; dS summed over the program's batch run
    Lse2 += pid.to(tl.int64) * Nq_pad
    Delta += pid.to(tl.int64) * Nq_pad
    DQAcc += pid.to(tl.int64) * Nq_pad * BLOCK_D
    DS += pid.to(tl.int64) * stride_sbh
    TableRow = RelTable + off_h.to(tl.int64) * stride_th
    if BATCH_SUM:  # zero this program's dS sum once (its tiles are read-modify-written per element)
        for start_n in range(0, Nk, BLOCK_N):
            for start_m in range(0, Nq, BLOCK_M):
                tl.store(DS + (start_n + offs_n).to(tl.int64)[:, None] * stride_sm + (start_m + offs_m)[None, :],
                         tl.zeros([BLOCK_N, BLOCK_M], tl.float32))

    for i in range(0, b1 - b0):
        off_b = b0 + i  # a tensor in the interpreter too (for its .to)
        _onepass_head(
            Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh,
            K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh,
            V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh,
            Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh,
            DOut + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh,
            Lse + (off_b * H + off_h).to(tl.int64) * Nq, Lse2, Delta, DQAcc,
            DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh,
            DK + off_b.to(tl.int64) * stride_dkb + off_h.to(tl.int64) * stride_dkh,
            DV + off_b.to(tl.int64) * stride_dvb + off_h.to(tl.int64) * stride_dvh,
            DS, DenseBias + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh, RelIndex, TableRow,
            KeyPad + off_b.to(tl.int64) * stride_pb,
            offs_m, offs_n, offs_d, offs_dv,
            stride_qm, stride_kn, stride_vn, stride_om, stride_dom, stride_dqm, stride_dkn, stride_dvn, stride_sm,
            stride_im, stride_dm, Nq, Nk, D, Dv, qk_scale, inv_scale, scale,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_N, EVEN_D, HAS_REL, HAS_DENSE, HAS_PAD, STORE_DS,
            BATCH_SUM, BIAS_PADDED, FP32_IEEE, UPCAST_DOT)


@triton.jit
def _onepass_head(
    Q, K, V, Out, DOut, Lse, Lse2, Delta, DQAcc, DQ, DK, DV, DS, Dense, RelIndex, TableRow, KeyPad,
    offs_m, offs_n, offs_d, offs_dv,
    stride_qm, stride_kn, stride_vn, stride_om, stride_dom, stride_dqm, stride_dkn, stride_dvn, stride_sm,
    stride_im, stride_dm, Nq, Nk, D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr, STORE_DS: tl.constexpr,
    BATCH_SUM: tl.constexpr, BIAS_PADDED: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The backward of one (batch, head): pointers are that slice's."""
    # prologue, per query block: delta (0 on rows past Nq: O and dO load 0), lse in log2 units (+inf
    # past Nq: p = 0 there) and a zeroed dQ accumulator, so the main loop loads them without masks
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows[:, None] < Nq
        lse = _load_vec(Lse + rows, rows < Nq, float("inf"), not EVEN_M)
        tl.store(Lse2 + rows, lse * 1.4426950408889634)
        o = _load_tile(Out + rows[:, None] * stride_om + offs_dv[None, :], row_ok, offs_dv[None, :] < Dv,
                       EVEN_M, EVEN_D)
        do = _load_tile(DOut + rows[:, None] * stride_dom + offs_dv[None, :], row_ok, offs_dv[None, :] < Dv,
                        EVEN_M, EVEN_D)
        tl.store(Delta + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1))
        tl.store(DQAcc + rows[:, None] * BLOCK_D + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], tl.float32))
    tl.debug_barrier()

    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :],
                       cols[:, None] < Nk, offs_d[None, :] < D, EVEN_N, EVEN_D)
        v = _load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :],
                       cols[:, None] < Nk, offs_dv[None, :] < Dv, EVEN_N, EVEN_D)
        if EVEN_N or BIAS_PADDED:  # BIAS_PADDED: the dense bias's rows are padded past the last key block
            cols_in = cols
        else:  # keys past Nk read the last key's bias (their s is -inf: key_ok below)
            cols_in = tl.minimum(cols, Nk - 1)
        if HAS_PAD:
            key_ok = _load_vec(KeyPad + cols, cols < Nk, 0, not EVEN_N) != 0
        else:
            key_ok = cols < Nk
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        for start_m in range(0, Nq, BLOCK_M):
            dk, dv = _onepass_step(dk, dv, k, v, key_ok, Q, DOut, Lse2, Delta, DQAcc, DS, Dense, RelIndex,
                                   cols, cols_in, TableRow, start_m, offs_m, offs_d, offs_dv, stride_qm,
                                   stride_dom, stride_dm, stride_im, stride_sm, Nq, D, Dv, qk_scale, inv_scale,
                                   BLOCK_D, EVEN_M, EVEN_D, HAS_PAD or not EVEN_N, HAS_REL, HAS_DENSE,
                                   STORE_DS, BATCH_SUM, FP32_IEEE, UPCAST_DOT)
        dk *= scale
        _store_tile(DK + cols[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                    cols[:, None] < Nk, offs_d[None, :] < D, EVEN_N, EVEN_D)
        _store_tile(DV + cols[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
                    cols[:, None] < Nk, offs_dv[None, :] < Dv, EVEN_N, EVEN_D)
        tl.debug_barrier()  # this key block's dQ additions are visible to the next one's

    # epilogue: dQ in the input dtype
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + offs_m
        dq = tl.load(DQAcc + rows[:, None] * BLOCK_D + offs_d[None, :]) * scale
        _store_tile(DQ + rows[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                    rows[:, None] < Nq, offs_d[None, :] < D, EVEN_M, EVEN_D)
    tl.debug_barrier()  # the scratch is the next batch element's
