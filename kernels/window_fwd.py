"""The window family's forward kernel (``_win_fwd``): one program per (batch, head, window[, query
block]), key blocks streamed with an online softmax (FlashAttention-2's split loop: full blocks
unmasked, the partial last one masked), the summed bias tile added as the matmul's accumulator.
Launched by ``window_attention.window_attention_fwd``; the math, the layout and the design are in
``window_attention.py``'s docstring."""
from __future__ import annotations

from .tiles import _load_tile, _mma, _store_tile
from .triton_compat import tl, triton
from .window_tiles import _block_program, _mask_keys, _window_origin, _window_tokens


@triton.jit
def _win_fwd_step(
    acc, l_i, m_i, q, K, V, BiasRows, region_m, start_n, offs_n, offs_d, offs_dv,
    row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w, n,
    stride_kn, stride_vn, D, Dv, qk_scale, inv_scale,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One key block of the online softmax (log2 units). MASK_N only on the partial last block."""
    t_n = start_n + offs_n
    tok_n, region_n = _window_tokens(t_n, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w,
                                     MASK_N, SHIFT)  # padded keys read the last key; masked below
    k_t = _load_tile(K + tok_n[None, :] * stride_kn + offs_d[:, None], offs_d[:, None] < D, None,
                     EVEN_D, True)  # (BLOCK_D, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(BiasRows + t_n[None, :]).to(tl.float32)  # padded to the tile: no clamp, no mask
        s = _mma(q, k_t, bias * inv_scale, FP32_IEEE, UPCAST_DOT) * qk_scale
    else:
        s = _mma(q, k_t, None, FP32_IEEE, UPCAST_DOT) * qk_scale
    s = _mask_keys(s, region_m, region_n, t_n, n, MASK_N, SHIFT)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys so far are all masked (another region) has m_new = -inf: subtract 0 instead,
    # so p and alpha are exactly 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(V + tok_n[:, None] * stride_vn + offs_dv[None, :], None, offs_dv[None, :] < Dv, True, EVEN_D)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], FP32_IEEE, UPCAST_DOT)
    return acc, l_i, m_new


@triton.jit
def _win_fwd(
    Q, K, V, Out, Lse, Bias,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_bw, stride_bh, stride_bm,
    heads, num_windows, num_win_w, grid_h, grid_w, win_h, win_w, shift_h, shift_w, dil_h, dil_w, n,
    D, Dv, qk_scale, inv_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_M positions of one (batch, head, window), streaming over the window's keys.

    1-D grid, query block fastest, then window: the programs sharing a window's K and V are
    neighbours. A window that fits one tile runs the masked step once (no loop)."""
    start_m, w, pid_bh, off_b, off_h = _block_program(tl.program_id(0), n, BLOCK_M, num_windows, heads)
    row0, col0 = _window_origin(w, num_win_w, win_h, win_w, dil_h, dil_w)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    t_m = start_m + offs_m
    tok_m, region_m = _window_tokens(t_m, n, row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w,
                                     not EVEN_M, SHIFT)  # padded rows read the last position; never stored

    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    q = _load_tile(Q + tok_m[:, None] * stride_qn + offs_d[None, :], None, offs_d[None, :] < D, True, EVEN_D)
    BiasRows = Bias + w.to(tl.int64) * stride_bw + off_h.to(tl.int64) * stride_bh + (t_m * stride_bm)[:, None]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # FlashAttention-2's split loop (full key blocks unmasked, the partial last one peeled and masked,
    # and run FIRST: peeled after the loop it serialised wgmma on sm_90a, as in kernels/attention.py)
    # unless every block is masked anyway (SHIFT: the region compare; padded keys then cost one vector
    # select) or the matmuls are IEEE fp32 (unrolled FMAs: a peeled step doubles the code and spills,
    # as in kernels/attention.py): then one loop masks every block.
    one_loop: tl.constexpr = SHIFT or FP32_IEEE
    n_full = n if one_loop else (n // BLOCK_N) * BLOCK_N
    if not EVEN_N and not one_loop:
        acc, l_i, m_i = _win_fwd_step(acc, l_i, m_i, q, K, V, BiasRows, region_m, n_full, offs_n, offs_d, offs_dv,
                                      row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w, n,
                                      stride_kn, stride_vn, D, Dv, qk_scale, inv_scale,
                                      True, EVEN_D, HAS_BIAS, SHIFT, FP32_IEEE, UPCAST_DOT)
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _win_fwd_step(acc, l_i, m_i, q, K, V, BiasRows, region_m, start_n, offs_n, offs_d, offs_dv,
                                      row0, col0, grid_h, grid_w, win_w, shift_h, shift_w, dil_h, dil_w, n,
                                      stride_kn, stride_vn, D, Dv, qk_scale, inv_scale,
                                      one_loop and not EVEN_N, EVEN_D, HAS_BIAS, SHIFT, FP32_IEEE, UPCAST_DOT)

    # Every row attends to itself, so l_i >= 1, unless a -inf dense bias masked all its keys.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    Out += off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    _store_tile(Out + tok_m[:, None] * stride_on + offs_dv[None, :], out.to(Out.dtype.element_ty),
                (t_m < n)[:, None], offs_dv[None, :] < Dv, EVEN_M, EVEN_D)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * (grid_h * grid_w) + tok_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=t_m < n)
