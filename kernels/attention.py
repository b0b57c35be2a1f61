"""Fused attention (FlashAttention-2) with in-kernel relative-position, dense and key-padding biases.

Math, per batch ``b`` and head ``h`` (``i`` a query, ``j`` a key)::

    s[i, j]  = scale * q[i] . k[j] + rel_table[rel_index[i, j], h] + dense_bias[b, h, i, j]
    s[i, j]  = -inf                      where key_padding[b, j] is False
    p        = softmax_j(s)              (a row with no valid key: p = 0, out = 0)
    out[i]   = sum_j p[i, j] v[j]
    lse[i]   = log(sum_j exp(s[i, j]))   (+inf for a row with no valid key, see below)

The forward streams over key blocks with an online softmax (in base 2: ``exp2`` with the scale
folded into ``log2(e)``) and saves only ``out`` and ``lse``. The backward recomputes ``p`` from
``lse``: ``delta = rowsum(dO * O)``; one kernel per key block accumulates ``dK, dV`` over query
blocks, one per query block accumulates ``dQ`` over key blocks; ``dS = P * (dP - delta)`` is also
the gradient of every additive bias (summed by the dQ kernel, see below). Biases enter each
``QK^T`` tile as the matmul accumulator (``_logits``), which keeps the softmax in the matmul's
register layout: the difference between spilling and not spilling for biased 64x64 tiles.

Layout: ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]``, ``out [B, H, Nq, Dv]``,
``lse [B, H, Nq]`` fp32. Strided views are accepted; a tensor is copied only when its last dim is
not contiguous. ``Nq != Nk`` and ``D != Dv`` are allowed.

Biases (any combination in one call):

- ``rel_table [T, H]`` + ``rel_index [Nq, Nk]`` (int32/int64): gathered inside the kernels, never
  expanded to ``[B, H, Nq, Nk]``. The table is read in fp32; its gradient is accumulated by the dQ
  kernel in an fp32 ``[1, H, Nq, Nk]`` buffer (atomic adds over the batch) and scattered into
  ``[T, H]`` with ``index_add_``: the backward holds one batch element's worth of logits, not
  ``B`` of them (``H * Nq * Nk * 4`` bytes, e.g. 1.8 MB for 12 heads at N=197).
- ``dense_bias``: additive, shape ``[1|B, 1|H, Nq, Nk]`` (broadcast dims read with stride 0), read
  in q's dtype (converted when it differs). Its gradient is ``dS`` summed over the broadcast dims.
- ``key_padding [B, Nk]`` bool, True = attend.

Limits and caveats:

- Head dims 1..128 (``MAX_HEAD_DIM``; a head row is kept in registers). They are padded to a power
  of two >= 16 inside the kernels with masks (``D = 8, 48, 80`` work).
- fp32, fp16, bf16 inputs; fp32 accumulation; outputs in the input dtype. fp32 matmuls use IEEE
  fp32 (no TF32), which is exact but slow on tensor-core GPUs: fp32 is the correctness path.
- Dropout is not supported: ``dropout_p > 0`` raises ``ValueError`` (the dispatcher falls back).
- ``scale`` must be non-zero (the bias is added to the matmul as ``bias / scale``).
- Head-block pairs are (16,16), (32,32), (64,64), (128,128) and (32,64); other D != Dv pairs run in
  (max, max) blocks (LeViT's D=16, Dv=64 runs as 64x64: wasted compute, no extra memory traffic).
- A row with no valid key gets ``out = 0`` and ``lse = +inf``: ``exp(s - lse)`` is then 0 for
  every key, so the backward yields zero gradients for it without a special case.
- The bias gradients use fp32 atomic adds, so they are not bitwise deterministic run to run.
- ``cls_probs`` (``return_cls_probs=True``) are the probabilities of query row 0, ``[B, H, Nk]``
  in the input dtype, recomputed from the saved ``lse`` by a one-row kernel. They carry no
  gradient.
- Configs are chosen by a deterministic heuristic (no run-time autotuning) from a list pruned by the
  ahead-of-time compile report (``fastvit.kernels.aot``); every variant a launcher can launch is
  listed by ``iter_compile_specs()``.
- Triton runs on CUDA, or on the CPU with ``TRITON_INTERPRET=1`` (tests; slow).
"""

from __future__ import annotations

import math
import os
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as _e:  # the reference and the capability checks still work without triton
    _TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

    class _TritonStub:
        """Lets this module import (and define its kernels as plain functions) without triton."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _TritonStub()

__all__ = [
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "Config",
    "CompileSpec",
    "attention",
    "attention_with_cls_probs",
    "attention_fwd",
    "attention_bwd",
    "cls_probs_from_lse",
    "AttentionFn",
    "not_supported_reasons",
    "iter_compile_specs",
    "attention_ref",
]

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # the kernels spell these constants out: a jit function reads no globals
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``a @ b + acc`` (``acc`` may be None) with fp32 accumulation.

    FP32_IEEE: fp32 inputs multiply in IEEE fp32 (Triton defaults to TF32 on tensor-core GPUs).
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
    """A tile load that compiles its masks away when the extents are known to be block multiples."""
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
def _bias_tile(
    rows, cols, off_b, off_h, Nq, Nk, RelTable, RelIndex, DenseBias,
    stride_tt, stride_th, stride_im, stride_in, stride_db, stride_dh, stride_dm, stride_dn,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr,
):
    """``rel_table[rel_index[i, j], h] + dense_bias[b, h, i, j]`` in fp32, natural units, 0 outside
    ``Nq x Nk``. ``rows`` (i) and ``cols`` (j) broadcast in either orientation (the dK/dV kernel
    works on transposed tiles)."""
    in_bounds = (rows < Nq) & (cols < Nk)
    if HAS_REL:
        index_ptrs = RelIndex + rows * stride_im + cols * stride_in
        if EVEN_M and EVEN_N:
            rel_index = tl.load(index_ptrs)
        else:
            rel_index = tl.load(index_ptrs, mask=in_bounds, other=0)  # row 0 of the table: in range
        bias = tl.load(RelTable + rel_index * stride_tt + off_h * stride_th).to(tl.float32)
    if HAS_DENSE:
        dense_ptrs = (DenseBias + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
                      + rows * stride_dm + cols * stride_dn)
        if EVEN_M and EVEN_N:
            dense = tl.load(dense_ptrs).to(tl.float32)
        else:
            dense = tl.load(dense_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        if HAS_REL:
            bias += dense
        else:
            bias = dense
    return bias


@triton.jit
def _mask_keys(s, cols, off_b, Nk, KeyPad, stride_pb, stride_pn, EVEN_N: tl.constexpr, HAS_PAD: tl.constexpr):
    """-inf where a key is padded out or past ``Nk``."""
    if HAS_PAD:
        attend = tl.load(KeyPad + off_b.to(tl.int64) * stride_pb + cols * stride_pn, mask=cols < Nk, other=0)
        s = tl.where(attend != 0, s, float("-inf"))
    if not EVEN_N:
        s = tl.where(cols < Nk, s, float("-inf"))
    return s


@triton.jit
def _logits(
    a, b, rows, cols, off_b, off_h, Nq, Nk, qk_scale, inv_scale,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_tt, stride_th, stride_im, stride_in,
    stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """A tile of logits in log2 units: ``(a @ b) * scale * log2(e) + bias * log2(e)``, -inf at
    invalid keys; ``a @ b`` is ``q @ k^T`` or, transposed, ``k @ q^T``.

    The bias enters as the matmul's accumulator, ``(a @ b + bias / scale) * scale * log2(e)``:
    that puts it in the matmul's register layout once, so the softmax stays in that layout too.
    Added after the matmul, the bias tile's load layout wins instead and the logits are shuffled
    through shared memory every step, which costs registers and spills (the AOT report showed 255
    registers and spills for a 64x64 tile; 194 and none this way).
    """
    if HAS_REL or HAS_DENSE:
        bias = _bias_tile(rows, cols, off_b, off_h, Nq, Nk, RelTable, RelIndex, DenseBias,
                          stride_tt, stride_th, stride_im, stride_in, stride_db, stride_dh, stride_dm, stride_dn,
                          EVEN_M, EVEN_N, HAS_REL, HAS_DENSE)
        s = _mma(a, b, bias * inv_scale, FP32_IEEE, UPCAST_DOT) * qk_scale
    else:
        s = _mma(a, b, None, FP32_IEEE, UPCAST_DOT) * qk_scale
    return _mask_keys(s, cols, off_b, Nk, KeyPad, stride_pb, stride_pn, EVEN_N, HAS_PAD)


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_tt, stride_th, stride_im, stride_in,
    stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
    H, Nq, Nk, D, Dv, qk_scale, inv_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head), streaming over all keys.

    The grid is 1-D with the query block fastest, so the programs that share one head's K and V
    run next to each other (L2 reuse), and B * H is not limited by CUDA's 65535 grid-y cap.
    """
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid_bh = pid // num_m_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh

    q = _load_tile(Q + rows[:, None] * stride_qm + offs_d[None, :],
                   rows[:, None] < Nq, offs_d[None, :] < D, EVEN_M, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + offs_n
        k_t = _load_tile(K + cols[None, :] * stride_kn + offs_d[:, None],
                         offs_d[:, None] < D, cols[None, :] < Nk, EVEN_D, EVEN_N)  # (BLOCK_D, BLOCK_N)
        s = _logits(q, k_t, rows[:, None], cols[None, :], off_b, off_h, Nq, Nk, qk_scale, inv_scale,
                    RelTable, RelIndex, DenseBias, KeyPad,
                    stride_tt, stride_th, stride_im, stride_in,
                    stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                    EVEN_M, EVEN_N, HAS_REL, HAS_DENSE, HAS_PAD, FP32_IEEE, UPCAST_DOT)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all masked has m_new = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out of p and alpha (both become exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :],
                       cols[:, None] < Nk, offs_dv[None, :] < Dv, EVEN_N, EVEN_D)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], FP32_IEEE, UPCAST_DOT)
        m_i = m_new

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
    stride_tt, stride_th, stride_im, stride_in,
    stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
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
    cols = (pid % num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + offs_d
    if EVEN_D:
        q0 = tl.load(q_ptrs).to(tl.float32)
    else:
        q0 = tl.load(q_ptrs, mask=offs_d < D, other=0.0).to(tl.float32)
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :],
                   cols[:, None] < Nk, offs_d[None, :] < D, EVEN_N, EVEN_D).to(tl.float32)
    s = tl.sum(k * q0[None, :], 1)
    if HAS_REL or HAS_DENSE:
        rows = tl.zeros([BLOCK_N], dtype=tl.int32)  # query 0 for every key
        s += _bias_tile(rows, cols, off_b, off_h, Nq, Nk, RelTable, RelIndex, DenseBias,
                        stride_tt, stride_th, stride_im, stride_in, stride_db, stride_dh, stride_dm, stride_dn,
                        True, EVEN_N, HAS_REL, HAS_DENSE) * inv_scale
    s = _mask_keys(s * qk_scale, cols, off_b, Nk, KeyPad, stride_pb, stride_pn, EVEN_N, HAS_PAD)
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * Nq) * 1.4426950408889634
    p = tl.exp2(s - lse2)
    probs_ptrs = Probs + pid_bh.to(tl.int64) * Nk + cols
    if EVEN_N:
        tl.store(probs_ptrs, p.to(Probs.dtype.element_ty))
    else:
        tl.store(probs_ptrs, p.to(Probs.dtype.element_ty), mask=cols < Nk)


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
def _attn_bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_tt, stride_th, stride_im, stride_in,
    stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
    H, Nq, Nk, D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, head); loops over all query blocks.

    Works on transposed tiles (keys x queries) so dK and dV accumulate without a transpose.
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(Nk, BLOCK_N)
    pid_bh = pid // num_n_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    cols = (pid % num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
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

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q + rows[:, None] * stride_qm + offs_d[None, :],
                       rows[:, None] < Nq, offs_d[None, :] < D, EVEN_M, EVEN_D)
        do = _load_tile(DOut + rows[:, None] * stride_dom + offs_dv[None, :],
                        rows[:, None] < Nq, offs_dv[None, :] < Dv, EVEN_M, EVEN_D)
        if EVEN_M:
            lse = tl.load(Lse + rows)
            delta = tl.load(Delta + rows)
        else:  # +inf makes p = 0 on the rows past Nq
            lse = tl.load(Lse + rows, mask=rows < Nq, other=float("inf"))
            delta = tl.load(Delta + rows, mask=rows < Nq, other=0.0)
        s_t = _logits(k, tl.trans(q), rows[None, :], cols[:, None], off_b, off_h, Nq, Nk, qk_scale, inv_scale,
                      RelTable, RelIndex, DenseBias, KeyPad,
                      stride_tt, stride_th, stride_im, stride_in,
                      stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                      EVEN_M, EVEN_N, HAS_REL, HAS_DENSE, HAS_PAD, FP32_IEEE, UPCAST_DOT)  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :] * 1.4426950408889634)
        dv = _mma(p_t.to(do.dtype), do, dv, FP32_IEEE, UPCAST_DOT)
        dp_t = _mma(v, tl.trans(do), None, FP32_IEEE, UPCAST_DOT)
        ds_t = p_t * (dp_t - delta[None, :])  # dL/ds, s in natural units
        dk = _mma(ds_t.to(q.dtype), q, dk, FP32_IEEE, UPCAST_DOT)

    dk *= scale
    _store_tile(DK + off_b.to(tl.int64) * stride_dkb + off_h.to(tl.int64) * stride_dkh
                + cols[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                cols[:, None] < Nk, offs_d[None, :] < D, EVEN_N, EVEN_D)
    _store_tile(DV + off_b.to(tl.int64) * stride_dvb + off_h.to(tl.int64) * stride_dvh
                + cols[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
                cols[:, None] < Nk, offs_dv[None, :] < Dv, EVEN_N, EVEN_D)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, DS,
    RelTable, RelIndex, DenseBias, KeyPad,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_sb, stride_sh, stride_sm, stride_sn,
    stride_tt, stride_th, stride_im, stride_in,
    stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
    H, Nq, Nk, D, Dv, qk_scale, inv_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr, STORE_DS: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); loops over all key blocks for dQ.

    ``dS`` is also the gradient of the additive biases. With STORE_DS it is added into the zeroed
    fp32 buffer DS, whose strides are 0 on the dims it sums over (the batch, for a relative-position
    table), so programs may share addresses: relaxed atomic adds. This kernel sees every (query, key)
    pair once, in the natural orientation, and holds fewer registers than the dK/dV kernel.
    """
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Nq, BLOCK_M)
    pid_bh = pid // num_m_blocks
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
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
    if EVEN_M:
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Nq + rows)
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Nq + rows)
    else:
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=float("inf"))
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=0.0)
    lse2 = lse * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :],
                       cols[:, None] < Nk, offs_d[None, :] < D, EVEN_N, EVEN_D)
        v = _load_tile(V + cols[:, None] * stride_vn + offs_dv[None, :],
                       cols[:, None] < Nk, offs_dv[None, :] < Dv, EVEN_N, EVEN_D)
        s = _logits(q, tl.trans(k), rows[:, None], cols[None, :], off_b, off_h, Nq, Nk, qk_scale, inv_scale,
                    RelTable, RelIndex, DenseBias, KeyPad,
                    stride_tt, stride_th, stride_im, stride_in,
                    stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                    EVEN_M, EVEN_N, HAS_REL, HAS_DENSE, HAS_PAD, FP32_IEEE, UPCAST_DOT)
        p = tl.exp2(s - lse2[:, None])
        dp = _mma(do, tl.trans(v), None, FP32_IEEE, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            ds_ptrs = (DS + off_b.to(tl.int64) * stride_sb + off_h.to(tl.int64) * stride_sh
                       + rows[:, None] * stride_sm + cols[None, :] * stride_sn)
            tl.atomic_add(ds_ptrs, ds, mask=(rows[:, None] < Nq) & (cols[None, :] < Nk), sem="relaxed")
        dq = _mma(ds.to(k.dtype), k, dq, FP32_IEEE, UPCAST_DOT)

    dq *= scale
    _store_tile(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
                + rows[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                rows[:, None] < Nq, offs_d[None, :] < D, EVEN_M, EVEN_D)


# --------------------------------------------------------------------------------------------------
# configs: a pruned list, a deterministic heuristic, and the variants the launchers can launch
# --------------------------------------------------------------------------------------------------

class Config(NamedTuple):
    """Launch parameters of one kernel (the AOT report lists one row per config and variant)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class CompileSpec(NamedTuple):
    """One kernel variant: what ``triton.compile`` needs to build it ahead of time."""

    kernel: str
    config: Config
    signature: dict
    constexprs: dict


# Head blocks: (BLOCK_D, BLOCK_DV). D and Dv are padded to a power of two >= 16 (tl.dot needs 16),
# and a pair that is not listed is widened to (max, max): that keeps the variant count (and the AOT
# report) bounded. LeViT is why a D != Dv pair exists: (32, 64) is vit-pytorch's default. The paper's
# (16, 64) runs as (64, 64): masked loads read no padding from memory, the wasted QK^T columns cost
# compute only, and LeViT's small heads are memory-bound.
HEAD_BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (32, 64))
_DTYPE_CODES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Preference lists, tried in order; the first that `keep()` accepts is launched. Keys: the kernel,
# the dtype class (fp32 tiles take twice the registers, and its IEEE matmuls run on CUDA cores) and,
# for the forward, a query bucket ("short": Nq <= 128, "long") -- so each (kernel, dtype, head
# blocks, biased or not) launches at most two forward configs and one per backward kernel. Class
# attention (Nq = 1) runs in a 64-row tile: 63 wasted rows of a tiny problem cost less than another
# compiled variant. 8-warp entries are the fallbacks for biased calls: the in-kernel gathers hold a
# pointer per logit, which spills 4-warp tiles.
_FWD_PREFS = {
    ("16bit", "short"): (Config(64, 64, 4, 2), Config(64, 64, 8, 2), Config(64, 32, 4, 2), Config(64, 32, 8, 2),
                         Config(32, 32, 4, 2)),
    ("16bit", "long"): (Config(128, 64, 4, 3), Config(128, 64, 8, 3), Config(64, 64, 4, 2), Config(64, 64, 8, 2),
                        Config(64, 32, 4, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 2)),
    ("fp32", "short"): (Config(32, 32, 4, 2), Config(32, 32, 8, 2), Config(16, 32, 4, 2), Config(16, 16, 4, 2),
                        Config(16, 16, 4, 1)),
    ("fp32", "long"): (Config(64, 32, 4, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 2), Config(32, 32, 8, 2),
                       Config(16, 32, 4, 2), Config(16, 16, 4, 2), Config(16, 16, 4, 1)),
}
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per step; dQ: BLOCK_M queries per program.
_DKDV_PREFS = {"16bit": (Config(64, 64, 4, 2), Config(64, 64, 8, 2), Config(32, 64, 4, 2), Config(32, 32, 4, 2)),
               "fp32": (Config(32, 32, 4, 2), Config(32, 32, 8, 2), Config(16, 32, 4, 2), Config(16, 16, 4, 1))}
_DQ_PREFS = {"16bit": (Config(64, 64, 4, 2), Config(64, 64, 8, 2), Config(64, 32, 4, 2), Config(32, 32, 4, 2)),
             "fp32": (Config(32, 32, 4, 2), Config(32, 32, 8, 2), Config(32, 16, 4, 2), Config(16, 16, 4, 1))}
def _cls_config(block_d: int) -> Config:
    """The CLS-row kernel holds a (BLOCK_N, BLOCK_D) fp32 tile of K: 64 keys spill at BLOCK_D=128."""
    return Config(1, 64 if block_d <= 64 else 32, 4, 1)  # block_m is unused: one query row
_PREPROCESS_CONFIG = Config(64, 1, 4, 1)  # block_n is unused

# The spill table: (kernel, config, dtype class, (BLOCK_D, BLOCK_DV), biased) whose variant spills
# registers on sm_80 or sm_90a (triton 3.8; "biased" = the variant with all three biases). Generated
# by `python -m fastvit.kernels.aot --spill-table` from every config in the preference lists.
PRUNED = frozenset({
    ('_attn_bwd_dkdv', Config(32, 32, 4, 2), 'fp32', (32, 32), False),
    ('_attn_bwd_dkdv', Config(32, 32, 4, 2), 'fp32', (32, 32), True),
    ('_attn_bwd_dkdv', Config(32, 32, 4, 2), 'fp32', (32, 64), False),
    ('_attn_bwd_dkdv', Config(32, 32, 4, 2), 'fp32', (32, 64), True),
    ('_attn_bwd_dkdv', Config(32, 32, 4, 2), 'fp32', (64, 64), False),
    ('_attn_bwd_dkdv', Config(32, 32, 4, 2), 'fp32', (128, 128), False),
    ('_attn_bwd_dkdv', Config(32, 32, 4, 2), 'fp32', (128, 128), True),
    ('_attn_bwd_dkdv', Config(32, 64, 4, 2), '16bit', (64, 64), True),
    ('_attn_bwd_dkdv', Config(32, 64, 4, 2), '16bit', (128, 128), True),
    ('_attn_bwd_dkdv', Config(64, 64, 4, 2), '16bit', (32, 32), True),
    ('_attn_bwd_dkdv', Config(64, 64, 4, 2), '16bit', (32, 64), True),
    ('_attn_bwd_dkdv', Config(64, 64, 4, 2), '16bit', (64, 64), False),
    ('_attn_bwd_dkdv', Config(64, 64, 4, 2), '16bit', (64, 64), True),
    ('_attn_bwd_dkdv', Config(64, 64, 4, 2), '16bit', (128, 128), False),
    ('_attn_bwd_dkdv', Config(64, 64, 4, 2), '16bit', (128, 128), True),
    ('_attn_bwd_dkdv', Config(64, 64, 8, 2), '16bit', (32, 64), True),
    ('_attn_bwd_dkdv', Config(64, 64, 8, 2), '16bit', (64, 64), True),
    ('_attn_bwd_dkdv', Config(64, 64, 8, 2), '16bit', (128, 128), True),
    ('_attn_bwd_dq', Config(32, 16, 4, 2), 'fp32', (128, 128), True),
    ('_attn_bwd_dq', Config(32, 32, 4, 2), 'fp32', (64, 64), True),
    ('_attn_bwd_dq', Config(32, 32, 4, 2), 'fp32', (128, 128), False),
    ('_attn_bwd_dq', Config(32, 32, 4, 2), 'fp32', (128, 128), True),
    ('_attn_bwd_dq', Config(32, 32, 8, 2), 'fp32', (128, 128), True),
    ('_attn_bwd_dq', Config(64, 32, 4, 2), '16bit', (64, 64), True),
    ('_attn_bwd_dq', Config(64, 32, 4, 2), '16bit', (128, 128), True),
    ('_attn_bwd_dq', Config(64, 64, 4, 2), '16bit', (16, 16), True),
    ('_attn_bwd_dq', Config(64, 64, 4, 2), '16bit', (32, 32), True),
    ('_attn_bwd_dq', Config(64, 64, 4, 2), '16bit', (32, 64), True),
    ('_attn_bwd_dq', Config(64, 64, 4, 2), '16bit', (64, 64), True),
    ('_attn_bwd_dq', Config(64, 64, 4, 2), '16bit', (128, 128), False),
    ('_attn_bwd_dq', Config(64, 64, 4, 2), '16bit', (128, 128), True),
    ('_attn_bwd_dq', Config(64, 64, 8, 2), '16bit', (32, 64), True),
    ('_attn_bwd_dq', Config(64, 64, 8, 2), '16bit', (64, 64), True),
    ('_attn_bwd_dq', Config(64, 64, 8, 2), '16bit', (128, 128), True),
    ('_attn_fwd', Config(16, 32, 4, 2), 'fp32', (128, 128), False),
    ('_attn_fwd', Config(16, 32, 4, 2), 'fp32', (128, 128), True),
    ('_attn_fwd', Config(32, 32, 4, 2), 'fp32', (64, 64), True),
    ('_attn_fwd', Config(32, 32, 4, 2), 'fp32', (128, 128), False),
    ('_attn_fwd', Config(32, 32, 4, 2), 'fp32', (128, 128), True),
    ('_attn_fwd', Config(32, 32, 8, 2), 'fp32', (64, 64), True),
    ('_attn_fwd', Config(32, 32, 8, 2), 'fp32', (128, 128), False),
    ('_attn_fwd', Config(32, 32, 8, 2), 'fp32', (128, 128), True),
    ('_attn_fwd', Config(64, 32, 4, 2), '16bit', (128, 128), True),
    ('_attn_fwd', Config(64, 32, 4, 2), 'fp32', (32, 32), True),
    ('_attn_fwd', Config(64, 32, 4, 2), 'fp32', (32, 64), False),
    ('_attn_fwd', Config(64, 32, 4, 2), 'fp32', (32, 64), True),
    ('_attn_fwd', Config(64, 32, 4, 2), 'fp32', (64, 64), False),
    ('_attn_fwd', Config(64, 32, 4, 2), 'fp32', (64, 64), True),
    ('_attn_fwd', Config(64, 32, 4, 2), 'fp32', (128, 128), False),
    ('_attn_fwd', Config(64, 32, 4, 2), 'fp32', (128, 128), True),
    ('_attn_fwd', Config(64, 32, 8, 2), 'fp32', (32, 64), False),
    ('_attn_fwd', Config(64, 32, 8, 2), 'fp32', (64, 64), False),
    ('_attn_fwd', Config(64, 32, 8, 2), 'fp32', (64, 64), True),
    ('_attn_fwd', Config(64, 32, 8, 2), 'fp32', (128, 128), False),
    ('_attn_fwd', Config(64, 32, 8, 2), 'fp32', (128, 128), True),
    ('_attn_fwd', Config(64, 64, 4, 2), '16bit', (16, 16), True),
    ('_attn_fwd', Config(64, 64, 4, 2), '16bit', (32, 32), True),
    ('_attn_fwd', Config(64, 64, 4, 2), '16bit', (128, 128), True),
    ('_attn_fwd', Config(64, 64, 8, 2), '16bit', (128, 128), True),
    ('_attn_fwd', Config(128, 64, 4, 3), '16bit', (16, 16), True),
    ('_attn_fwd', Config(128, 64, 4, 3), '16bit', (32, 32), True),
    ('_attn_fwd', Config(128, 64, 4, 3), '16bit', (32, 64), True),
    ('_attn_fwd', Config(128, 64, 4, 3), '16bit', (64, 64), True),
    ('_attn_fwd', Config(128, 64, 4, 3), '16bit', (128, 128), False),
    ('_attn_fwd', Config(128, 64, 4, 3), '16bit', (128, 128), True),
    ('_attn_fwd', Config(128, 64, 8, 3), '16bit', (16, 16), True),
    ('_attn_fwd', Config(128, 64, 8, 3), '16bit', (32, 32), True),
    ('_attn_fwd', Config(128, 64, 8, 3), '16bit', (128, 128), True),
})


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _head_blocks(d: int, dv: int) -> tuple[int, int]:
    blocks = (max(16, triton_next_power_of_2(d)), max(16, triton_next_power_of_2(dv)))
    if blocks not in HEAD_BLOCKS:
        widest = max(blocks)
        blocks = (widest, widest)
    return blocks


def triton_next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _m_bucket(nq: int) -> str:
    return "short" if nq <= 128 else "long"


def keep(cfg: Config, kernel: str, dtype: torch.dtype, head_blocks: tuple[int, int], biased: bool) -> bool:
    """Whether ``cfg`` may be launched for this kernel, dtype, head blocks and bias presence: not in
    the spill table (``PRUNED``, from the AOT report)."""
    return (kernel, cfg, _dtype_class(dtype), tuple(head_blocks), bool(biased)) not in PRUNED


def _first_kept(prefs, kernel, dtype, head_blocks, biased) -> Config:
    for cfg in prefs:
        if keep(cfg, kernel, dtype, head_blocks, biased):
            return cfg
    return prefs[-1]  # the smallest tile is the last resort (in the report all the same)


def _pick_fwd_config(nq: int, nk: int, head_blocks: tuple[int, int], dtype: torch.dtype,
                     capability: Optional[tuple[int, int]] = None, biased: bool = False) -> Config:
    """The forward config, by query bucket, dtype class, head blocks and bias presence. ``nk`` and
    ``capability`` are part of the key for later tuning; today one list serves sm_80 and sm_90."""
    prefs = _FWD_PREFS[(_dtype_class(dtype), _m_bucket(nq))]
    return _first_kept(prefs, "_attn_fwd", dtype, head_blocks, biased)


def _pick_bwd_configs(nq: int, nk: int, head_blocks: tuple[int, int], dtype: torch.dtype,
                      capability: Optional[tuple[int, int]] = None, biased: bool = False) -> tuple[Config, Config]:
    """(dK/dV config, dQ config)."""
    cls = _dtype_class(dtype)
    return (_first_kept(_DKDV_PREFS[cls], "_attn_bwd_dkdv", dtype, head_blocks, biased),
            _first_kept(_DQ_PREFS[cls], "_attn_bwd_dq", dtype, head_blocks, biased))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _flags(*, even_m, even_n, even_d, has_rel, has_dense, has_pad) -> dict:
    return dict(EVEN_M=even_m, EVEN_N=even_n, EVEN_D=even_d,
                HAS_REL=has_rel, HAS_DENSE=has_dense, HAS_PAD=has_pad)


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(FP32_IEEE=dtype == torch.float32,
                UPCAST_DOT=dtype == torch.bfloat16 and _interpreting())


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------

def _fmt_shape(t: Optional[Tensor]) -> str:
    return "None" if t is None else str(list(t.shape))


def _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding) -> None:
    """Raises ValueError, naming the values, when the inputs break the kernels' contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {_fmt_shape(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported (supports float32, float16, bfloat16)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"batch/heads differ: q {_fmt_shape(q)}, k {_fmt_shape(k)}, v {_fmt_shape(v)} "
                         "(expected [B, H, N, D] with the same B and H)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dim of q ({q.shape[3]}) != head dim of k ({k.shape[3]})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"key count of k ({k.shape[2]}) != key count of v ({v.shape[2]})")
    for name, d in (("q/k head dim", q.shape[3]), ("v head dim", v.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name}={d} is outside 1..{MAX_HEAD_DIM} (the kernel keeps a head row in registers)")
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if (rel_table is None) != (rel_index is None):
        raise ValueError("rel_table and rel_index go together: got "
                         f"rel_table {_fmt_shape(rel_table)}, rel_index {_fmt_shape(rel_index)}")
    if rel_table is not None:
        if rel_table.dim() != 2 or rel_table.shape[1] != H:
            raise ValueError(f"rel_table must be [T, H={H}], got shape {_fmt_shape(rel_table)}")
        if not rel_table.is_floating_point():
            raise ValueError(f"rel_table must be a float tensor, got {rel_table.dtype}")
        if tuple(rel_index.shape) != (Nq, Nk):
            raise ValueError(f"rel_index must be [Nq, Nk] = [{Nq}, {Nk}], got shape {_fmt_shape(rel_index)}")
        if rel_index.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise ValueError(f"rel_index must be an integer tensor, got {rel_index.dtype}")
        for name, t in (("rel_table", rel_table), ("rel_index", rel_index)):
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    if dense_bias is not None:
        shape = tuple(dense_bias.shape)
        if (dense_bias.dim() != 4 or shape[0] not in (1, B) or shape[1] not in (1, H)
                or shape[2:] != (Nq, Nk)):
            raise ValueError(f"dense_bias shape {list(shape)} is not broadcastable as [1|B, 1|H, Nq, Nk] "
                             f"to [B, H, Nq, Nk] = {[B, H, Nq, Nk]}")
        if not dense_bias.is_floating_point():
            raise ValueError(f"dense_bias must be a float tensor, got {dense_bias.dtype}")
        if dense_bias.device != q.device:
            raise ValueError(f"dense_bias is on {dense_bias.device}, q is on {q.device}")
    if key_padding is not None:
        if tuple(key_padding.shape) != (B, Nk):
            raise ValueError(f"key_padding must be [B, Nk] = [{B}, {Nk}], got shape {_fmt_shape(key_padding)}")
        if key_padding.dtype != torch.bool:
            raise ValueError(f"key_padding must be bool (True = attend), got {key_padding.dtype}")
        if key_padding.device != q.device:
            raise ValueError(f"key_padding is on {key_padding.device}, q is on {q.device}")


def _check_scale(scale) -> float:
    # Not 0: the kernels add the bias into the matmul accumulator as bias / scale (see `_logits`).
    if isinstance(scale, Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be a finite, non-zero Python float, got {scale!r}")
    return float(scale)


def _check_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p}: attention dropout is not supported by the triton kernels")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _require_runtime(device: torch.device) -> None:
    ok, why = _runtime_available(device)
    if not ok:
        raise RuntimeError(why)


def _runtime_available(device: torch.device) -> tuple[bool, str]:
    if _TRITON_IMPORT_ERROR is not None:
        return False, f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return True, ""
    return False, f"q is on {device.type}; the triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"


class _BiasArgs(NamedTuple):
    """The bias inputs as kernel arguments: pointers (placeholders when absent) and strides."""

    rel_table: Tensor
    rel_index: Tensor
    dense_bias: Tensor
    key_padding: Tensor
    strides: tuple  # stride_tt, stride_th, stride_im, stride_in, stride_db..dn, stride_pb, stride_pn
    has_rel: bool
    has_dense: bool
    has_pad: bool

    @property
    def biased(self) -> bool:
        return self.has_rel or self.has_dense or self.has_pad


def _bias_args(q, rel_table, rel_index, dense_bias, key_padding) -> _BiasArgs:
    """Normalises the biases to the dtypes the kernels are compiled for: table fp32, index int32,
    dense bias in q's dtype, padding as uint8. Absent biases become empty placeholders with the same
    dtypes, so a variant's signature does not depend on which biases are present."""
    device = q.device
    if rel_table is not None:
        table = rel_table.detach().to(torch.float32)
        index = rel_index.to(torch.int32)
        rel_strides = (table.stride(0), table.stride(1), index.stride(0), index.stride(1))
    else:
        table = torch.empty(0, dtype=torch.float32, device=device)
        index = torch.empty(0, dtype=torch.int32, device=device)
        rel_strides = (0, 0, 0, 0)
    if dense_bias is not None:
        dense = _last_dim_contiguous(dense_bias.detach().to(q.dtype))
        # Broadcast dims are read with stride 0, whatever stride the caller's tensor has there.
        dense_strides = tuple(0 if dense.shape[i] == 1 else dense.stride(i) for i in range(4))
    else:
        dense = torch.empty(0, dtype=q.dtype, device=device)
        dense_strides = (0, 0, 0, 0)
    if key_padding is not None:
        pad = key_padding.view(torch.uint8)  # same bytes; triton loads bool pointers as int1 unevenly
        pad_strides = (pad.stride(0), pad.stride(1))
    else:
        pad = torch.empty(0, dtype=torch.uint8, device=device)
        pad_strides = (0, 0)
    return _BiasArgs(table, index, dense, pad, rel_strides + dense_strides + pad_strides,
                     rel_table is not None, dense_bias is not None, key_padding is not None)


def _launch(kernel, grid: int, args: tuple, constexprs: dict, cfg: Config) -> None:
    kernel[(grid,)](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _geometry(q: Tensor, k: Tensor, v: Tensor, block_m: int, block_n: int, head_blocks) -> dict:
    nq, nk, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    return dict(even_m=nq % block_m == 0, even_n=nk % block_n == 0,
                even_d=(d, dv) == head_blocks)


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
    return_cls_probs: bool = False, dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fused attention forward.

    Args:
        q: ``[B, H, Nq, D]``. k: ``[B, H, Nk, D]``. v: ``[B, H, Nk, Dv]``. Same dtype and device.
        scale: multiplies ``q . k`` (the caller's default is ``D ** -0.5``).
        rel_table: ``[T, H]`` float; with ``rel_index [Nq, Nk]`` int, ``bias = table[index, h]``.
        dense_bias: ``[1|B, 1|H, Nq, Nk]`` additive bias.
        key_padding: ``[B, Nk]`` bool, True = attend.
        return_cls_probs: also return ``[B, H, Nk]`` probabilities of query 0 (input dtype).
        dropout_p: must be 0 (dropout is not supported).

    Returns:
        ``(out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] fp32, cls_probs or None)``.
    """
    scale = _check_scale(scale)
    _check_dropout(dropout_p)
    _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    _require_runtime(q.device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    out = torch.empty((B, H, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    cls_probs = (torch.empty((B, H, Nk), dtype=q.dtype, device=q.device) if return_cls_probs else None)
    if B * H * Nq == 0:
        return out, lse, cls_probs
    if Nk == 0:  # no keys: every row is empty
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse, cls_probs

    bias = _bias_args(q, rel_table, rel_index, dense_bias, key_padding)
    head_blocks = _head_blocks(D, Dv)
    cfg = _pick_fwd_config(Nq, Nk, head_blocks, q.dtype, _capability(q.device), bias.biased)
    flags = _flags(**_geometry(q, k, v, cfg.block_m, cfg.block_n, head_blocks),
                   has_rel=bias.has_rel, has_dense=bias.has_dense, has_pad=bias.has_pad)
    qk_scale = scale * _LOG2E
    _launch(_attn_fwd, B * H * triton.cdiv(Nq, cfg.block_m),
            (q, k, v, out, lse, bias.rel_table, bias.rel_index, bias.dense_bias, bias.key_padding,
             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *bias.strides,
             H, Nq, Nk, D, Dv, qk_scale, 1.0 / scale),
            dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_blocks[0], BLOCK_DV=head_blocks[1],
                 **flags, **_dot_flags(q.dtype)), cfg)
    if return_cls_probs:
        _launch_cls_probs(q, k, lse, cls_probs, bias, scale, head_blocks)
    return out, lse, cls_probs


def _launch_cls_probs(q, k, lse, cls_probs, bias: _BiasArgs, scale: float, head_blocks) -> None:
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    cfg = _cls_config(head_blocks[0])
    flags = _flags(even_m=True, even_n=Nk % cfg.block_n == 0, even_d=D == head_blocks[0],
                   has_rel=bias.has_rel, has_dense=bias.has_dense, has_pad=bias.has_pad)
    del flags["EVEN_M"]
    _launch(_attn_cls_probs, B * H * triton.cdiv(Nk, cfg.block_n),
            (q, k, lse, cls_probs, bias.rel_table, bias.rel_index, bias.dense_bias, bias.key_padding,
             *q.stride()[:2], *k.stride()[:3], *bias.strides, H, Nq, Nk, D, scale * _LOG2E, 1.0 / scale),
            dict(BLOCK_N=cfg.block_n, BLOCK_D=head_blocks[0], **flags), cfg)


def cls_probs_from_lse(
    q: Tensor, k: Tensor, lse: Tensor, *, scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
) -> Tensor:
    """``[B, H, Nk]`` probabilities of query 0 (input dtype), from the ``lse`` a forward saved."""
    scale = _check_scale(scale)
    _check_inputs(q, k, k, rel_table, rel_index, dense_bias, key_padding)
    _require_runtime(q.device)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    cls_probs = torch.empty((B, H, Nk), dtype=q.dtype, device=q.device)
    if B * H * Nq * Nk == 0:
        return cls_probs.zero_()
    bias = _bias_args(q, rel_table, rel_index, dense_bias, key_padding)
    _launch_cls_probs(q, k, lse.contiguous(), cls_probs, bias, scale, _head_blocks(D, D))
    return cls_probs


def _ds_buffer(q: Tensor, H: int, Nq: int, Nk: int, dense_bias: Optional[Tensor],
               need_rel_grad: bool, need_dense_grad: bool) -> tuple[Tensor, tuple]:
    """The zeroed fp32 buffer dS is summed into: ``[Bd, Hd, Nq, Nk]`` with Bd, Hd the dims the
    wanted gradients keep (rel_table: heads, summed over the batch; dense bias: its own shape).
    Returns (buffer, kernel strides with 0 on the summed dims)."""
    bd = dense_bias.shape[0] if need_dense_grad else 1
    hd = H if need_rel_grad else (dense_bias.shape[1] if need_dense_grad else 1)
    buf = torch.zeros((bd, hd, Nq, Nk), dtype=torch.float32, device=q.device)
    return buf, tuple(0 if buf.shape[i] == 1 else buf.stride(i) for i in range(4))


def attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
    need_rel_grad: Optional[bool] = None, need_dense_grad: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Fused attention backward (FlashAttention-2: preprocess, dK/dV kernel, dQ kernel).

    Args:
        do: ``[B, H, Nq, Dv]``, the gradient of ``out``. q, k, v, out, lse: as the forward saw and
            returned them. scale and biases: as in the forward.
        need_rel_grad / need_dense_grad: compute ``d rel_table`` / ``d dense_bias``; default: whether
            the tensor requires grad.

    Returns:
        ``(dq, dk, dv, d_rel_table [T, H] or None, d_dense_bias (dense_bias's shape) or None)``, each
        in its input's dtype.
    """
    scale = _check_scale(scale)
    _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    for name, t, shape in (("do", do, (B, H, Nq, Dv)), ("out", out, (B, H, Nq, Dv)), ("lse", lse, (B, H, Nq))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {_fmt_shape(t)}")
    _require_runtime(q.device)
    if need_rel_grad is None:
        need_rel_grad = rel_table is not None and rel_table.requires_grad
    if need_dense_grad is None:
        need_dense_grad = dense_bias is not None and dense_bias.requires_grad
    need_rel_grad = bool(need_rel_grad) and rel_table is not None
    need_dense_grad = bool(need_dense_grad) and dense_bias is not None

    q, k, v, out = (_last_dim_contiguous(t) for t in (q, k, v, out))
    do = _last_dim_contiguous(do.to(q.dtype))
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_rel = torch.zeros_like(rel_table) if need_rel_grad else None
    d_dense = torch.zeros_like(dense_bias) if need_dense_grad else None
    if B * H * Nq * Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), d_rel, d_dense

    bias = _bias_args(q, rel_table, rel_index, dense_bias, key_padding)
    head_blocks = _head_blocks(D, Dv)
    qk_scale = scale * _LOG2E
    dots = _dot_flags(q.dtype)

    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    pre = _PREPROCESS_CONFIG
    _launch(_attn_bwd_preprocess, B * H * triton.cdiv(Nq, pre.block_m),
            (out, do, delta, *out.stride()[:3], *do.stride()[:3], H, Nq, Dv),
            dict(BLOCK_M=pre.block_m, BLOCK_DV=head_blocks[1], EVEN_M=Nq % pre.block_m == 0,
                 EVEN_D=Dv == head_blocks[1]), pre)

    cfg_kv, cfg_q = _pick_bwd_configs(Nq, Nk, head_blocks, q.dtype, _capability(q.device), bias.biased)
    store_ds = need_rel_grad or need_dense_grad
    if store_ds:
        ds, ds_strides = _ds_buffer(q, H, Nq, Nk, dense_bias, need_rel_grad, need_dense_grad)
    else:
        ds, ds_strides = torch.empty(0, dtype=torch.float32, device=q.device), (0, 0, 0, 0)
    flags = _flags(**_geometry(q, k, v, cfg_kv.block_m, cfg_kv.block_n, head_blocks),
                   has_rel=bias.has_rel, has_dense=bias.has_dense, has_pad=bias.has_pad)
    _launch(_attn_bwd_dkdv, B * H * triton.cdiv(Nk, cfg_kv.block_n),
            (q, k, v, do, lse, delta, dk, dv,
             bias.rel_table, bias.rel_index, bias.dense_bias, bias.key_padding,
             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
             *dk.stride()[:3], *dv.stride()[:3], *bias.strides,
             H, Nq, Nk, D, Dv, qk_scale, 1.0 / scale, scale),
            dict(BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, BLOCK_D=head_blocks[0], BLOCK_DV=head_blocks[1],
                 **flags, **dots), cfg_kv)

    flags = _flags(**_geometry(q, k, v, cfg_q.block_m, cfg_q.block_n, head_blocks),
                   has_rel=bias.has_rel, has_dense=bias.has_dense, has_pad=bias.has_pad)
    _launch(_attn_bwd_dq, B * H * triton.cdiv(Nq, cfg_q.block_m),
            (q, k, v, do, lse, delta, dq, ds,
             bias.rel_table, bias.rel_index, bias.dense_bias, bias.key_padding,
             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
             *ds_strides, *bias.strides, H, Nq, Nk, D, Dv, qk_scale, 1.0 / scale, scale),
            dict(BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, BLOCK_D=head_blocks[0], BLOCK_DV=head_blocks[1],
                 **flags, STORE_DS=store_ds, **dots), cfg_q)

    if need_dense_grad:
        sum_dims = [i for i in (0, 1) if dense_bias.shape[i] == 1 and ds.shape[i] > 1]
        d_dense = (ds.sum(dim=sum_dims, keepdim=True) if sum_dims else ds).to(dense_bias.dtype)
    if need_rel_grad:
        ds_heads = ds.sum(dim=0)  # (H, Nq, Nk)
        d_rel = torch.zeros(rel_table.shape, dtype=torch.float32, device=q.device)
        d_rel.index_add_(0, rel_index.reshape(-1).long(), ds_heads.reshape(H, -1).t())
        d_rel = d_rel.to(rel_table.dtype)
    return dq, dk, dv, d_rel, d_dense


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def not_supported_reasons(
    q: Tensor, k: Tensor, v: Tensor, *,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
    dropout_p: float = 0.0, scale: Optional[float] = None,
) -> list[str]:
    """Why the kernels cannot serve this call, as sentences; an empty list means they can."""
    reasons = []
    ok, why = _runtime_available(q.device)
    if not ok:
        reasons.append(why)
    if q.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (supports torch.float32, torch.float16, torch.bfloat16)")
    widest = max(q.shape[-1], v.shape[-1]) if q.dim() and v.dim() else 0
    if widest > MAX_HEAD_DIM:
        reasons.append(f"head_dim={widest} > {MAX_HEAD_DIM} (the kernel keeps a head row in registers)")
    if dropout_p > 0:
        reasons.append("attention dropout is not supported by the triton kernels")
    if scale is not None and scale == 0:
        reasons.append("scale=0.0 is not supported (the kernels add the bias to the matmul as bias / scale)")
    if not reasons:
        try:
            _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
        except ValueError as e:
            reasons.append(str(e))
    return reasons


# --------------------------------------------------------------------------------------------------
# every variant the launchers can launch (the AOT report compiles them)
# --------------------------------------------------------------------------------------------------

# Pointer arguments by name -> element type; "in" is the input dtype. Other non-constexpr arguments
# are i32, except the two scales.
_POINTER_TYPES = {
    "Q": "in", "K": "in", "V": "in", "Out": "in", "DOut": "in", "DQ": "in", "DK": "in", "DV": "in",
    "Probs": "in", "DenseBias": "in", "Lse": "fp32", "Delta": "fp32", "DS": "fp32",
    "RelTable": "fp32", "RelIndex": "i32", "KeyPad": "u8",
}
_FLOAT_ARGS = ("qk_scale", "inv_scale", "scale")

KERNELS = {fn.__name__: fn for fn in (_attn_fwd, _attn_cls_probs, _attn_bwd_preprocess,
                                      _attn_bwd_dkdv, _attn_bwd_dq)} if _TRITON_IMPORT_ERROR is None else {}


def _kernel_params(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) for each parameter, from the Python signature of the jit function."""
    import inspect

    fn = getattr(kernel, "fn", kernel)
    params = []
    for name, p in inspect.signature(fn).parameters.items():
        ann = p.annotation
        params.append((name, ann is tl.constexpr or "constexpr" in str(ann)))
    return params


# How triton specialises a typical call at run time, mirrored ahead of time so that the report
# compiles the code the launchers really run: an integer argument equal to 1 becomes a constant (the
# unit strides of contiguous bias tensors), and pointers (torch allocations are aligned) and the
# strides of q, k, v, out and their gradients (multiples of the head dim: 16, 32, 48, 64, 80, ...)
# are divisible by 16, which is what lets the compiler vectorise loads. Calls with other strides
# (a head dim of 8 or 24, a strided bias) compile another specialisation at run time.
_UNIT_STRIDES = ("stride_th", "stride_in", "stride_dn", "stride_pn", "stride_sn")
_ALIGNED_STRIDE_PREFIXES = ("stride_q", "stride_k", "stride_v", "stride_o", "stride_do", "stride_dq", "stride_dk",
                            "stride_dv")


def kernel_signature(kernel, dtype: torch.dtype) -> dict:
    """The ``triton.compile`` signature of ``kernel`` for inputs of ``dtype`` (unit strides are
    constexprs: see `unit_stride_constants`)."""
    code = _DTYPE_CODES[dtype]
    sig = {}
    for name, is_constexpr in _kernel_params(kernel):
        if is_constexpr or name in _UNIT_STRIDES:
            sig[name] = "constexpr"
        elif name in _POINTER_TYPES:
            t = _POINTER_TYPES[name]
            sig[name] = "*" + (code if t == "in" else t)
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def unit_stride_constants(kernel) -> dict:
    return {name: 1 for name, _ in _kernel_params(kernel) if name in _UNIT_STRIDES}


def divisible_by_16(kernel) -> list[str]:
    """The arguments the AOT compile declares divisible by 16 (pointers and q/k/v/o strides)."""
    return [name for name, is_constexpr in _kernel_params(kernel)
            if not is_constexpr and (name in _POINTER_TYPES or name.startswith(_ALIGNED_STRIDE_PREFIXES))]


_BIASES = ("HAS_REL", "HAS_DENSE", "HAS_PAD")
_EVENS = ("EVEN_M", "EVEN_N", "EVEN_D")


def _variants(biased: bool, full: bool, even_plain: bool = True) -> list[dict]:
    """Bias and mask switches compiled for one config.

    Default: the variant with the most code, masks on (the ViT sizes 49, 50, 197 are never block
    multiples) and, if biased, all three biases (a subset only removes code from it); with
    ``even_plain`` also the unbiased mask-free variant of aligned shapes. ``full``: every bias subset
    times every EVEN_M/N/D combination.
    """
    import itertools

    if full:
        subsets = [s for s in itertools.product((False, True), repeat=3) if any(s) == biased]
        evens = list(itertools.product((False, True), repeat=3))
    else:
        subsets = [(True, True, True)] if biased else [(False, False, False)]
        evens = [(False, False, False)] + ([(True, True, True)] if even_plain and not biased else [])
    return [dict(zip(_EVENS, e), **dict(zip(_BIASES, s))) for s in subsets for e in evens]


def _ds_variants(flags: dict, full: bool) -> list[dict]:
    """dQ stores dS when a bias takes a gradient (by default: the biased variant does)."""
    if not (flags["HAS_REL"] or flags["HAS_DENSE"]):
        return [dict(STORE_DS=False)]
    return [dict(STORE_DS=False), dict(STORE_DS=True)] if full else [dict(STORE_DS=True)]


def _launchable(pref_lists, kernel, dtype, blocks, biased, include_pruned) -> list[Config]:
    """The configs the heuristic picks from each preference list (or all of them), deduplicated."""
    picked = []
    for prefs in pref_lists:
        for cfg in (prefs if include_pruned else [_first_kept(prefs, kernel, dtype, blocks, biased)]):
            if cfg not in picked:
                picked.append(cfg)
    return picked


def tile_spec(kernel: str, cfg: Config, dtype: torch.dtype, blocks: tuple[int, int], switches: dict) -> CompileSpec:
    """The spec of one of the three tiled kernels (forward, dK/dV, dQ) with the given switches
    (EVEN_*, HAS_*, STORE_DS)."""
    fn = KERNELS[kernel]
    return CompileSpec(kernel, cfg, kernel_signature(fn, dtype), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1], **switches,
        FP32_IEEE=dtype == torch.float32, UPCAST_DOT=False, **unit_stride_constants(fn)))


def iter_compile_specs(*, full: bool = False, include_pruned: bool = False, dtypes=SUPPORTED_DTYPES,
                       head_blocks=HEAD_BLOCKS) -> Iterator[CompileSpec]:
    """Every (kernel, config, signature, constexprs) the launchers may launch.

    By default: every (kernel, config, dtype, head blocks) the launchers can launch -- over dtypes,
    head-block pairs, unbiased and biased calls, and the config the heuristics pick for each query
    bucket -- each with the switch variants of `_variants` that hold the most code (about 200 specs,
    3 minutes for sm_80 + sm_90a on 2 cores). ``full=True`` lists every specialisation the launchers
    can launch: every bias subset and EVEN_* combination (several thousand compiles).
    ``include_pruned=True`` lists every config of the preference lists instead of the picked ones
    (to regenerate the spill table).
    """
    import itertools

    for dtype, blocks in itertools.product(dtypes, head_blocks):
        cls = _dtype_class(dtype)
        sig = {name: kernel_signature(KERNELS[name], dtype) for name in ("_attn_cls_probs", "_attn_bwd_preprocess")}
        for biased in (False, True):
            fwd_prefs = [_FWD_PREFS[(cls, bucket)] for bucket in ("short", "long")]
            for kernel, pref_lists in (("_attn_fwd", fwd_prefs), ("_attn_bwd_dkdv", [_DKDV_PREFS[cls]]),
                                       ("_attn_bwd_dq", [_DQ_PREFS[cls]])):
                for cfg in _launchable(pref_lists, kernel, dtype, blocks, biased, include_pruned):
                    # the mask-free forward is the one aligned-shape variant worth its compile time
                    for flags in _variants(biased, full, even_plain=kernel == "_attn_fwd"):
                        extras = _ds_variants(flags, full) if kernel == "_attn_bwd_dq" else [{}]
                        for extra in extras:
                            yield tile_spec(kernel, cfg, dtype, blocks, dict(flags, **extra))
            # The CLS-row and preprocess kernels see one head width: one set per distinct width.
            if blocks[0] == blocks[1]:
                for flags in _variants(biased, full, even_plain=False):
                    flags = {k: v for k, v in flags.items() if k != "EVEN_M"}
                    cls_cfg = _cls_config(blocks[0])
                    yield CompileSpec("_attn_cls_probs", cls_cfg, sig["_attn_cls_probs"],
                                      dict(BLOCK_N=cls_cfg.block_n, BLOCK_D=blocks[0], **flags,
                                           **unit_stride_constants(KERNELS["_attn_cls_probs"])))
        if blocks[0] == blocks[1]:
            evens = list(itertools.product((False, True), repeat=2)) if full else [(False, False), (True, True)]
            for even_m, even_d in evens:
                yield CompileSpec("_attn_bwd_preprocess", _PREPROCESS_CONFIG, sig["_attn_bwd_preprocess"],
                                  dict(BLOCK_M=_PREPROCESS_CONFIG.block_m, BLOCK_DV=blocks[1],
                                       EVEN_M=even_m, EVEN_D=even_d))


def launch_plan(nq: int, nk: int, d: int, dv: int, dtype: torch.dtype, *, biased: bool = False,
                capability: Optional[tuple[int, int]] = None) -> dict:
    """What the launchers use for a shape: ``{kernel: (config, (BLOCK_D, BLOCK_DV))}``."""
    blocks = _head_blocks(d, dv)
    cfg_kv, cfg_q = _pick_bwd_configs(nq, nk, blocks, dtype, capability, biased)
    return {"_attn_fwd": (_pick_fwd_config(nq, nk, blocks, dtype, capability, biased), blocks),
            "_attn_bwd_dkdv": (cfg_kv, blocks), "_attn_bwd_dq": (cfg_q, blocks),
            "_attn_cls_probs": (_cls_config(blocks[0]), (blocks[0], blocks[0])),
            "_attn_bwd_preprocess": (_PREPROCESS_CONFIG, (blocks[1], blocks[1]))}


# --------------------------------------------------------------------------------------------------
# torch.library ops (so torch.compile(fullgraph=True) traces through the kernels) and autograd
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastvit::attn_fwd", mutates_args=())
def _attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_table: Optional[Tensor],
                 rel_index: Optional[Tensor], dense_bias: Optional[Tensor],
                 key_padding: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out, lse, _ = attention_fwd(q, k, v, scale=scale, rel_table=rel_table, rel_index=rel_index,
                                dense_bias=dense_bias, key_padding=key_padding)
    return out, lse


@_attn_fwd_op.register_fake
def _(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding):
    B, H, Nq, _ = q.shape
    return q.new_empty((B, H, Nq, v.shape[3])), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("fastvit::attn_cls_probs", mutates_args=())
def _attn_cls_probs_op(q: Tensor, k: Tensor, lse: Tensor, scale: float, rel_table: Optional[Tensor],
                       rel_index: Optional[Tensor], dense_bias: Optional[Tensor],
                       key_padding: Optional[Tensor]) -> Tensor:
    return cls_probs_from_lse(q, k, lse, scale=scale, rel_table=rel_table, rel_index=rel_index,
                              dense_bias=dense_bias, key_padding=key_padding)


@_attn_cls_probs_op.register_fake
def _(q, k, lse, scale, rel_table, rel_index, dense_bias, key_padding):
    return q.new_empty((q.shape[0], q.shape[1], k.shape[2]))


@torch.library.custom_op("fastvit::attn_bwd", mutates_args=())
def _attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                 rel_table: Optional[Tensor], rel_index: Optional[Tensor], dense_bias: Optional[Tensor],
                 key_padding: Optional[Tensor], need_rel_grad: bool,
                 need_dense_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As ``attention_bwd``; a gradient that is not wanted comes back as an empty 1-D tensor
    (an op's outputs cannot be None)."""
    dq, dk, dv, d_rel, d_dense = attention_bwd(
        do, q, k, v, out, lse, scale=scale, rel_table=rel_table, rel_index=rel_index, dense_bias=dense_bias,
        key_padding=key_padding, need_rel_grad=need_rel_grad, need_dense_grad=need_dense_grad)
    # Two separate placeholders: an op's outputs may not alias each other.
    return (dq, dk, dv, q.new_empty(0) if d_rel is None else d_rel,
            q.new_empty(0) if d_dense is None else d_dense)


@_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale, rel_table, rel_index, dense_bias, key_padding, need_rel_grad,
      need_dense_grad):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(rel_table) if need_rel_grad and rel_table is not None else q.new_empty(0),
            torch.empty_like(dense_bias) if need_dense_grad and dense_bias is not None else q.new_empty(0))


def _save_for_backward(ctx, q, k, v, scale, rel_table, rel_index, dense_bias, key_padding, out, lse,
                       need_rel_grad: bool, need_dense_grad: bool) -> None:
    """What the backward needs: the inputs, ``out`` and ``lse`` -- never the probabilities."""
    ctx.save_for_backward(q, k, v, out, lse, rel_table, rel_index, dense_bias, key_padding)
    ctx.scale = scale
    ctx.need_rel_grad = need_rel_grad
    ctx.need_dense_grad = need_dense_grad


def _input_grads(ctx, d_out: Tensor) -> tuple:
    """(dq, dk, dv, None, d_rel_table, None, d_dense_bias, None), in the op's argument order."""
    q, k, v, out, lse, rel_table, rel_index, dense_bias, key_padding = ctx.saved_tensors
    dq, dk, dv, d_rel, d_dense = torch.ops.fastvit.attn_bwd(
        d_out, q, k, v, out, lse, ctx.scale, rel_table, rel_index, dense_bias, key_padding,
        ctx.need_rel_grad, ctx.need_dense_grad)
    return (dq, dk, dv, None, d_rel if ctx.need_rel_grad else None, None,
            d_dense if ctx.need_dense_grad else None, None)


def _op_setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, rel_table, rel_index, dense_bias, key_padding = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    _save_for_backward(ctx, q, k, v, scale, rel_table, rel_index, dense_bias, key_padding, out, lse,
                       rel_table is not None and ctx.needs_input_grad[4],
                       dense_bias is not None and ctx.needs_input_grad[6])


def _op_backward(ctx, d_out, _d_lse):
    return _input_grads(ctx, d_out)


_attn_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class AttentionFn(torch.autograd.Function):
    """Differentiable fused attention: returns ``(out, lse)``; ``lse`` is not differentiable.

    Saves q, k, v, the bias inputs, ``out`` and ``lse`` (fp32, ``[B, H, Nq]``); the backward
    recomputes the probabilities. Both directions go through the ``fastvit::attn_*`` ops.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, rel_table, rel_index, dense_bias, key_padding):
        out, lse = torch.ops.fastvit.attn_fwd(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding)
        ctx.mark_non_differentiable(lse)
        _save_for_backward(ctx, q, k, v, scale, rel_table, rel_index, dense_bias, key_padding, out, lse,
                           rel_table is not None and ctx.needs_input_grad[4],
                           dense_bias is not None and ctx.needs_input_grad[6])
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        return _input_grads(ctx, d_out)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
) -> Tensor:
    """Fused, differentiable attention (see the module docstring for the math and the limits).

    Args:
        q: ``[B, H, Nq, D]``. k: ``[B, H, Nk, D]``. v: ``[B, H, Nk, Dv]``.
        scale: defaults to ``D ** -0.5``.
        rel_table: ``[T, H]``; rel_index: ``[Nq, Nk]`` integer in ``[0, T)``.
        dense_bias: ``[1|B, 1|H, Nq, Nk]``. key_padding: ``[B, Nk]`` bool, True = attend.

    Returns:
        ``out [B, H, Nq, Dv]`` in q's dtype. Gradients flow to q, k, v, rel_table and dense_bias.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = AttentionFn.apply(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding)
    return out


def attention_with_cls_probs(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``attention(...)`` plus the probabilities of query 0 over all keys.

    Returns:
        ``(out [B, H, Nq, Dv], cls_probs [B, H, Nk])``, both in q's dtype. ``out`` is
        differentiable; ``cls_probs`` is not (adaptive token sampling only ranks tokens by it).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = AttentionFn.apply(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding)
    detach = (lambda t: None if t is None else t.detach())
    cls_probs = torch.ops.fastvit.attn_cls_probs(q.detach(), k.detach(), lse, scale, detach(rel_table),
                                                 rel_index, detach(dense_bias), key_padding)
    return out, cls_probs


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------

def attention_ref(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
    return_cls_probs: bool = False,
):
    """The same math in plain PyTorch, computed in fp32 and cast back to q's dtype.

    Returns ``out``, or ``(out, cls_probs)`` with ``return_cls_probs=True``. A row with no valid
    key gives 0 (and zero gradients). Differentiable in every float input.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (b, h, nq, nk)
    if rel_table is not None:
        s = s + rel_table.float()[rel_index.long()].permute(2, 0, 1)  # (nq, nk, h) -> (h, nq, nk)
    if dense_bias is not None:
        s = s + dense_bias.float()
    empty = None
    if key_padding is not None:
        valid = key_padding[:, None, None, :]  # (b, 1, 1, nk)
        s = s.masked_fill(~valid, float("-inf"))
        # Softmax over an all -inf row is NaN (and so is its gradient): give it zeros instead.
        empty = ~valid.any(dim=-1, keepdim=True)
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1)
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    out = torch.matmul(p, v.float()).to(q.dtype)
    if return_cls_probs:
        return out, p[:, :, 0, :].to(q.dtype)
    return out
