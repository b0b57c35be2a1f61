"""The window family's backward kernels: ``_win_bwd_tile`` (a window that fits one tile: dQ, dK, dV
and dS from one load of q, k, v, O, dO, dS summed over a batch chunk in-program) and the
FlashAttention-2 pair for larger windows, ``_win_bwd_dq`` (per query block: delta, dQ, dS) then
``_win_bwd_dkdv`` (per key block, over the query blocks). Launched by
``window_attention.window_attention_bwd``; the math, the layout and the design are in
``window_attention.py``'s docstring."""
from __future__ import annotations

from .tiles import _load_tile, _mma, _store_tile
from .triton_compat import tl, triton
from .window_tiles import _block_program, _mask_keys, _window_origin, _window_tokens


@triton.jit
def _win_bwd_tile(
    Q, K, V, Out, DOut, Lse, DQ, DK, DV, DS, Bias,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_bw, stride_bh, stride_bm,
    batch, batch_per_program, heads, num_windows, num_win_w, grid_h, grid_w, win_h, win_w, shift_h, shift_w,
    dil_h, dil_w, n, D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, STORE_DS: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The whole backward of windows that fit one tile: one program per (batch chunk, head, window),
    looping over the chunk's batch elements in order.

    Per batch element: ``delta = rowsum(dO * O)``, ``p = exp(s - lse)``, ``dV = p^T dO``,
    ``dP = dO V^T``, ``dS = p * (dP - delta)``, ``dQ = dS K * scale``, ``dK = dS^T Q * scale``. The
    program owns its window, so every output is a plain store. With STORE_DS it also sums dS over its
    batch elements in registers (in order) and stores one fp32 ``[BLOCK, BLOCK]`` tile per (chunk,
    window, head) into DS: the bias gradient, reduced without atomics. Padded rows have lse = +inf
    (p = 0), padded keys s = -inf (p = 0): they add exactly 0 to everything.

    Registers (the 64-tile's heaviest variant is near the limit): tiles in the natural (queries x
    keys) orientation, so lse and delta are row vectors of the MMA layout (2 values per thread; the
    transposed orientation's column vectors take 16); the bias tile re-read per batch element
    (L1/L2) rather than held; each gradient stored as soon as it is complete.
    """
    tl.static_assert(BLOCK_M == BLOCK_N)
    pid = tl.program_id(0)
    w = pid % num_windows
    rest = pid // num_windows
    off_h = rest % heads
    chunk = rest // heads
    # int64 bounds: the loop variable is int64 in compiled code (a plain int under the interpreter)
    b_start = chunk.to(tl.int64) * batch_per_program
    b_end = tl.minimum(b_start + batch_per_program, batch)
    row0, col0 = _window_origin(w, num_win_w, win_h, win_w, dil_h, dil_w)

    offs = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    tok, region = _window_tokens(offs, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w,
                                 not EVEN_N, SHIFT)
    row_ok = offs < n
    d_ok = offs_d[None, :] < D
    dv_ok = offs_dv[None, :] < Dv
    h64 = off_h.to(tl.int64)
    BiasW = Bias + w.to(tl.int64) * stride_bw + h64 * stride_bh
    num_tokens = grid_h * grid_w

    ds_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b64 in range(b_start, b_end):
        o = _load_tile(Out + b64 * stride_ob + h64 * stride_oh + tok[:, None] * stride_on + offs_dv[None, :],
                       None, dv_ok, True, EVEN_D)
        do = _load_tile(DOut + b64 * stride_dob + h64 * stride_doh + tok[:, None] * stride_don + offs_dv[None, :],
                        None, dv_ok, True, EVEN_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh + tok[:, None] * stride_qn + offs_d[None, :],
                       None, d_ok, True, EVEN_D)
        k = _load_tile(K + b64 * stride_kb + h64 * stride_kh + tok[:, None] * stride_kn + offs_d[None, :],
                       None, d_ok, True, EVEN_D)
        lse = tl.load(Lse + (b64 * heads + h64) * num_tokens + tok)
        if EVEN_N:
            lse2 = lse * 1.4426950408889634
        else:
            lse2 = tl.where(row_ok, lse * 1.4426950408889634, float("inf"))  # p = 0 on padded rows
        if HAS_BIAS:  # re-read per batch element (L1/L2): fewer registers live across the loop
            bias = tl.load(BiasW + (offs * stride_bm)[:, None] + offs[None, :]).to(tl.float32)
            s = _mma(q, tl.trans(k), bias * inv_scale, FP32_IEEE, UPCAST_DOT) * qk_scale
        else:
            s = _mma(q, tl.trans(k), None, FP32_IEEE, UPCAST_DOT) * qk_scale
        s = _mask_keys(s, region, region, offs, n, not EVEN_N, SHIFT)
        p = tl.exp2(s - lse2[:, None])
        # Each gradient is stored as soon as it is complete: fewer tiles live at once.
        dv = _mma(tl.trans(p.to(do.dtype)), do, None, FP32_IEEE, UPCAST_DOT)
        _store_tile(DV + b64 * stride_dvb + h64 * stride_dvh + tok[:, None] * stride_dvn + offs_dv[None, :],
                    dv.to(DV.dtype.element_ty), row_ok[:, None], dv_ok, EVEN_N, EVEN_D)
        v = _load_tile(V + b64 * stride_vb + h64 * stride_vh + tok[:, None] * stride_vn + offs_dv[None, :],
                       None, dv_ok, True, EVEN_D)
        dp = _mma(do, tl.trans(v), None, FP32_IEEE, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        ds_in = ds.to(q.dtype)
        dq = _mma(ds_in, k, None, FP32_IEEE, UPCAST_DOT) * scale
        _store_tile(DQ + b64 * stride_dqb + h64 * stride_dqh + tok[:, None] * stride_dqn + offs_d[None, :],
                    dq.to(DQ.dtype.element_ty), row_ok[:, None], d_ok, EVEN_N, EVEN_D)
        dk = _mma(tl.trans(ds_in), q, None, FP32_IEEE, UPCAST_DOT) * scale
        _store_tile(DK + b64 * stride_dkb + h64 * stride_dkh + tok[:, None] * stride_dkn + offs_d[None, :],
                    dk.to(DK.dtype.element_ty), row_ok[:, None], d_ok, EVEN_N, EVEN_D)
        if STORE_DS:
            ds_sum += ds

    if STORE_DS:  # this (chunk, window, head)'s own tile of the padded buffer: no masks, no atomics
        slab = (chunk.to(tl.int64) * num_windows + w) * heads + off_h
        tl.store(DS + slab * (BLOCK_M * BLOCK_N) + offs[:, None] * BLOCK_N + offs[None, :], ds_sum)


@triton.jit
def _win_dq_step(
    dq, q, do, lse2, delta, region_m, K, V, DS, ds_rows, BiasRows, start_n, offs_n, offs_d, offs_dv,
    row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w, n,
    stride_kn, stride_vn, D, Dv, qk_scale, inv_scale,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr,
    STORE_DS: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One key block of the dQ loop (multi-block windows). MASK_N only on the partial last block."""
    t_n = start_n + offs_n
    tok_n, region_n = _window_tokens(t_n, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w,
                                     MASK_N, SHIFT)
    k = _load_tile(K + tok_n[:, None] * stride_kn + offs_d[None, :], None, offs_d[None, :] < D, True, EVEN_D)
    v = _load_tile(V + tok_n[:, None] * stride_vn + offs_dv[None, :], None, offs_dv[None, :] < Dv, True, EVEN_D)
    if HAS_BIAS:
        bias = tl.load(BiasRows + t_n[None, :]).to(tl.float32)
        s = _mma(q, tl.trans(k), bias * inv_scale, FP32_IEEE, UPCAST_DOT) * qk_scale
    else:
        s = _mma(q, tl.trans(k), None, FP32_IEEE, UPCAST_DOT) * qk_scale
    s = _mask_keys(s, region_m, region_n, t_n, n, MASK_N, SHIFT)
    p = tl.exp2(s - lse2[:, None])
    dp = _mma(do, tl.trans(v), None, FP32_IEEE, UPCAST_DOT)
    ds = p * (dp - delta[:, None])
    if STORE_DS:  # this batch element's slice of the padded buffer: plain stores, no masks
        tl.store(DS + ds_rows[:, None] + t_n[None, :], ds)
    dq = _mma(ds.to(k.dtype), k, dq, FP32_IEEE, UPCAST_DOT)
    return dq


@triton.jit
def _win_bwd_dq(
    Q, K, V, Out, DOut, Lse, Delta, DQ, DS, Bias,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_bw, stride_bh, stride_bm, stride_sm,
    heads, num_windows, num_win_w, grid_h, grid_w, win_h, win_w, shift_h, shift_w, dil_h, dil_w, n,
    D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, STORE_DS: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Windows larger than one tile: one program per (batch, head, window, query block). Computes
    ``delta = rowsum(dO * O)`` for its rows (stored for `_win_bwd_dkdv`, launched after it), then
    loops over the key blocks for dQ. With STORE_DS it writes its dS tiles into DS, an fp32
    ``[B, nW, heads, n_pad, n_pad]`` buffer padded to block multiples (plain stores)."""
    start_m, w, pid_bh, off_b, off_h = _block_program(tl.program_id(0), n, BLOCK_M, num_windows, heads)
    row0, col0 = _window_origin(w, num_win_w, win_h, win_w, dil_h, dil_w)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    t_m = start_m + offs_m
    tok_m, region_m = _window_tokens(t_m, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w,
                                     not EVEN_M, SHIFT)
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh + tok_m[:, None] * stride_qn + offs_d[None, :],
                   None, offs_d[None, :] < D, True, EVEN_D)
    o = _load_tile(Out + b64 * stride_ob + h64 * stride_oh + tok_m[:, None] * stride_on + offs_dv[None, :],
                   None, offs_dv[None, :] < Dv, True, EVEN_D)
    do = _load_tile(DOut + b64 * stride_dob + h64 * stride_doh + tok_m[:, None] * stride_don + offs_dv[None, :],
                    None, offs_dv[None, :] < Dv, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    Lse += pid_bh.to(tl.int64) * (grid_h * grid_w)
    Delta += pid_bh.to(tl.int64) * (grid_h * grid_w)
    lse = tl.load(Lse + tok_m)
    if EVEN_M:
        tl.store(Delta + tok_m, delta)
        lse2 = lse * 1.4426950408889634
    else:
        tl.store(Delta + tok_m, delta, mask=t_m < n)
        lse2 = tl.where(t_m < n, lse * 1.4426950408889634, float("inf"))  # p = 0 on padded rows

    K += b64 * stride_kb + h64 * stride_kh
    V += b64 * stride_vb + h64 * stride_vh
    BiasRows = Bias + w.to(tl.int64) * stride_bw + h64 * stride_bh + (t_m * stride_bm)[:, None]
    DS += ((b64 * num_windows + w) * heads + h64) * (tl.cdiv(n, BLOCK_M) * BLOCK_M) * stride_sm
    ds_rows = t_m.to(tl.int64) * stride_sm  # the buffer is padded: padded rows are in it

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # One loop with the key masks on every block (unless the window is a block multiple): the peeled
    # masked tail of FlashAttention-2's split loop made ptxas spill here (head dim 128), and the
    # windows' key loops are short (NesT: 7 blocks of 32), so the masks cost little.
    for start_n in range(0, n, BLOCK_N):
        dq = _win_dq_step(dq, q, do, lse2, delta, region_m, K, V, DS, ds_rows, BiasRows, start_n, offs_n, offs_d,
                          offs_dv, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w, n,
                          stride_kn, stride_vn, D, Dv, qk_scale, inv_scale,
                          not EVEN_N, EVEN_D, HAS_BIAS, SHIFT, STORE_DS, FP32_IEEE, UPCAST_DOT)
    dq *= scale
    _store_tile(DQ + b64 * stride_dqb + h64 * stride_dqh + tok_m[:, None] * stride_dqn + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), (t_m < n)[:, None], offs_d[None, :] < D, EVEN_M, EVEN_D)


@triton.jit
def _win_bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV, Bias,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_bw, stride_bh, stride_bm,
    heads, num_windows, num_win_w, grid_h, grid_w, win_h, win_w, shift_h, shift_w, dil_h, dil_w, n,
    D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Windows larger than one tile: one program per (batch, head, window, key block), looping over
    the query blocks on transposed (keys x queries) tiles. No tile is masked: padded query rows read
    the last position and get p = 0 from lse = +inf; padded keys' rows of dK, dV are never stored."""
    start_n, w, pid_bh, off_b, off_h = _block_program(tl.program_id(0), n, BLOCK_N, num_windows, heads)
    row0, col0 = _window_origin(w, num_win_w, win_h, win_w, dil_h, dil_w)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    t_n = start_n + offs_n
    tok_n, region_n = _window_tokens(t_n, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w,
                                     not EVEN_N, SHIFT)
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    k = _load_tile(K + b64 * stride_kb + h64 * stride_kh + tok_n[:, None] * stride_kn + offs_d[None, :],
                   None, offs_d[None, :] < D, True, EVEN_D)
    v = _load_tile(V + b64 * stride_vb + h64 * stride_vh + tok_n[:, None] * stride_vn + offs_dv[None, :],
                   None, offs_dv[None, :] < Dv, True, EVEN_D)
    Q += b64 * stride_qb + h64 * stride_qh
    DOut += b64 * stride_dob + h64 * stride_doh
    Lse += pid_bh.to(tl.int64) * (grid_h * grid_w)
    Delta += pid_bh.to(tl.int64) * (grid_h * grid_w)
    BiasW = Bias + w.to(tl.int64) * stride_bw + h64 * stride_bh

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, n, BLOCK_M):
        t_m = start_m + offs_m
        tok_m, region_m = _window_tokens(t_m, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h,
                                         dil_w, not EVEN_M, SHIFT)
        q = _load_tile(Q + tok_m[:, None] * stride_qn + offs_d[None, :], None, offs_d[None, :] < D, True, EVEN_D)
        do = _load_tile(DOut + tok_m[:, None] * stride_don + offs_dv[None, :], None, offs_dv[None, :] < Dv,
                        True, EVEN_D)
        lse = tl.load(Lse + tok_m)
        delta = tl.load(Delta + tok_m)
        if EVEN_M:
            lse2 = lse * 1.4426950408889634
        else:
            lse2 = tl.where(t_m < n, lse * 1.4426950408889634, float("inf"))
        if HAS_BIAS:
            # loaded in the natural (queries x keys) orientation, contiguous along keys, then transposed
            bias = tl.load(BiasW + (t_m * stride_bm)[:, None] + t_n[None, :]).to(tl.float32)
            s_t = _mma(k, tl.trans(q), tl.trans(bias) * inv_scale, FP32_IEEE, UPCAST_DOT) * qk_scale
        else:
            s_t = _mma(k, tl.trans(q), None, FP32_IEEE, UPCAST_DOT) * qk_scale
        if SHIFT:
            s_t = tl.where(region_n[:, None] == region_m[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse2[None, :])
        dv = _mma(p_t.to(do.dtype), do, dv, FP32_IEEE, UPCAST_DOT)
        dp_t = _mma(v, tl.trans(do), None, FP32_IEEE, UPCAST_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk, FP32_IEEE, UPCAST_DOT)

    dk *= scale
    _store_tile(DK + b64 * stride_dkb + h64 * stride_dkh + tok_n[:, None] * stride_dkn + offs_d[None, :],
                dk.to(DK.dtype.element_ty), (t_n < n)[:, None], offs_d[None, :] < D, EVEN_N, EVEN_D)
    _store_tile(DV + b64 * stride_dvb + h64 * stride_dvh + tok_n[:, None] * stride_dvn + offs_dv[None, :],
                dv.to(DV.dtype.element_ty), (t_n < n)[:, None], offs_dv[None, :] < Dv, EVEN_N, EVEN_D)
