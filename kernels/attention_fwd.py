"""The forward kernels of the attention family: ``_attn_fwd`` (FlashAttention-2's online softmax over
key blocks, the partial block first, biases as the matmul accumulator) and ``_attn_cls_probs`` (the
probabilities of query row 0 from the saved lse). The math and the masking rules are in
``kernels/attention.py``'s docstring; the launchers live there too."""
from __future__ import annotations

from .tiles import _bias_tile, _load_tile, _load_vec, _logits, _mma, _store_tile
from .triton_compat import tl, triton


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, K, V, Dense, dense_rows, Index, index_rows, TableRow, KeyPad,
    start_n, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv, qk_scale, inv_scale,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One key block of the online softmax. MASK_N only on the last, partial key block."""
    cols = start_n + offs_n
    col_ok = cols < Nk
    k_t = _load_tile(K + cols[None, :] * stride_kn + offs_d[:, None],
                     offs_d[:, None] < D, col_ok[None, :], EVEN_D, not MASK_N)  # (BLOCK_D, BLOCK_N)
    s = _logits(q, k_t, Dense, dense_rows[:, None] + cols[None, :], Index, index_rows[:, None] + cols[None, :],
                TableRow, col_ok[None, :], qk_scale, inv_scale, MASK_N, HAS_REL, HAS_DENSE, FP32_IEEE, UPCAST_DOT)
    if HAS_PAD:
        attend = _load_vec(KeyPad + cols, col_ok, 0, MASK_N)
        s = tl.where(attend[None, :] != 0, s, float("-inf"))
    if MASK_N:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys so far are all masked has m_new = -inf; subtracting 0 instead keeps
    # exp2(-inf - -inf) = NaN out of p and alpha (both become exactly 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :],
                   col_ok[:, None], offs_dv[None, :] < Dv, not MASK_N, EVEN_D)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], FP32_IEEE, UPCAST_DOT)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_th, stride_im, stride_db, stride_dh, stride_dm, stride_pb,
    H, Nq, Nk, D, Dv, qk_scale, inv_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head), streaming over all keys.

    The grid is 1-D with the query block fastest, so the programs that share one head's K and V
    run next to each other (L2 reuse), and B * H is not limited by CUDA's 65535 grid-y cap. The
    full key blocks run without key-bound masks; the last, partial one (EVEN_N False) runs before
    them with masks.
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

    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    q = _load_tile(Q + rows[:, None] * stride_qm + offs_d[None, :],
                   rows[:, None] < Nq, offs_d[None, :] < D, EVEN_M, EVEN_D)

    # Bias tiles: int64 row offsets (Nq * Nk may exceed 2**31), plus the key block's columns.
    # Rows past Nq read the last row instead (their results are never stored), so the bias loads
    # of full key blocks need no mask.
    if EVEN_M:
        rows_in = rows
    else:
        rows_in = tl.minimum(rows, Nq - 1)
    Dense = DenseBias + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
    TableRow = RelTable + off_h.to(tl.int64) * stride_th
    KeyPad += off_b.to(tl.int64) * stride_pb
    dense_rows = rows_in.to(tl.int64) * stride_dm
    index_rows = rows_in.to(tl.int64) * stride_im

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if FP32_IEEE and not EVEN_N:
        # IEEE fp32 matmuls are unrolled FMAs: a second, peeled copy of the step doubles the code and
        # made ptxas spill, so this (correctness) path keeps one loop with the key masks on every block.
        for start_n in range(0, Nk, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Dense, dense_rows, RelIndex, index_rows, TableRow,
                                      KeyPad, start_n, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv,
                                      qk_scale, inv_scale, True, EVEN_D, HAS_REL, HAS_DENSE, HAS_PAD,
                                      FP32_IEEE, UPCAST_DOT)
    else:
        n_full = (Nk // BLOCK_N) * BLOCK_N
        # The partial key block (the launcher sets EVEN_N = (Nk % BLOCK_N == 0)) runs FIRST, before the
        # loop: peeled after it, its masks and the rescale of the loop's accumulator sat between the last
        # wgmma of the loop and its wait, and ptxas serialised every wgmma of the kernel (C7515, sm_90a).
        # The online softmax does not care which block comes first.
        if not EVEN_N:
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Dense, dense_rows, RelIndex, index_rows, TableRow,
                                      KeyPad, n_full, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv,
                                      qk_scale, inv_scale, True, EVEN_D, HAS_REL, HAS_DENSE, HAS_PAD,
                                      FP32_IEEE, UPCAST_DOT)
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, Dense, dense_rows, RelIndex, index_rows, TableRow,
                                      KeyPad, start_n, offs_n, offs_d, offs_dv, stride_kn, stride_vn, Nk, D, Dv,
                                      qk_scale, inv_scale, False, EVEN_D, HAS_REL, HAS_DENSE, HAS_PAD,
                                      FP32_IEEE, UPCAST_DOT)

    # l_i >= 1 for any row with a valid key (its max contributes exp2(0)); 0 means no valid key.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    Out += off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    _store_tile(Out + rows[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
                rows[:, None] < Nq, offs_dv[None, :] < Dv, EVEN_M, EVEN_D)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * Nq + rows
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=rows < Nq)


@triton.jit
def _attn_cls_probs(
    Q, K, Lse, Probs,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_th, stride_db, stride_dh, stride_pb,
    H, Nq, Nk, D, qk_scale, inv_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
):
    """Probabilities of query row 0 over BLOCK_N keys: ``exp(s[0, j] - lse[0])``.

    One row is a matrix-vector product, so it is an elementwise multiply and a row sum (tl.dot
    needs 16 rows). It reads K once more and nothing else: a few percent of the forward.
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(Nk, BLOCK_N)
    pid_bh = pid // num_n_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    start_n = (pid % num_n_blocks) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < Nk
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + offs_d
    if EVEN_D:
        q0 = tl.load(q_ptrs).to(tl.float32)
    else:
        q0 = tl.load(q_ptrs, mask=offs_d < D, other=0.0).to(tl.float32)
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :],
                   col_ok[:, None], offs_d[None, :] < D, EVEN_N, EVEN_D).to(tl.float32)
    s = tl.sum(k * q0[None, :], 1)
    if HAS_REL or HAS_DENSE:  # query row 0: the first Nk entries of the index and of the bias rows
        s += _bias_tile(DenseBias + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh, cols,
                        RelIndex, cols, RelTable + off_h.to(tl.int64) * stride_th, col_ok,
                        not EVEN_N, HAS_REL, HAS_DENSE) * inv_scale
    s = s * qk_scale
    if HAS_PAD:
        attend = _load_vec(KeyPad + off_b.to(tl.int64) * stride_pb + cols, col_ok, 0, not EVEN_N)
        s = tl.where(attend != 0, s, float("-inf"))
    if not EVEN_N:
        s = tl.where(col_ok, s, float("-inf"))
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * Nq) * 1.4426950408889634
    p = tl.exp2(s - lse2)
    probs_ptrs = Probs + pid_bh.to(tl.int64) * Nk + cols
    if EVEN_N:
        tl.store(probs_ptrs, p.to(Probs.dtype.element_ty))
    else:
        tl.store(probs_ptrs, p.to(Probs.dtype.element_ty), mask=col_ok)
