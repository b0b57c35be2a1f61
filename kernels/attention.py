"""Fused attention (FlashAttention-2 style) with in-kernel relative-position bias, dense bias and
key padding, forward and backward, in Triton.

Math, per batch ``b`` and head ``h`` (natural-log units)::

    S = scale * Q K^T + table[index] (+ dense) ; S[:, j] = -inf where key j is padded
    P = softmax(S) ; O = P V ; lse = logsumexp(S, -1)

The forward keeps a running max and sum per query row (online softmax) and saves only ``O`` and
``lse``. The backward recomputes ``P`` from ``lse`` block by block: ``dV = P^T dO``,
``dS = P * (dO V^T - delta)`` with ``delta = rowsum(dO * O)``, ``dK = scale dS^T Q``,
``dQ = scale dS K``, ``d table[index[i, j], h] += dS[i, j]`` (atomic adds into an fp32 buffer) and
``d dense = dS`` summed over broadcast dimensions.

Layout: ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]``, ``out [B, H, Nq, Dv]``, any
strides with a unit last stride (other strides are read as they are, no copy). ``Nq != Nk`` and
``Dv != D`` are allowed. Head dims 1..128 (padded inside the kernel to a power of two >= 16; larger
heads are refused with a reason: a row of Q, K, V and the accumulator live in registers).
fp32, fp16 and bf16 inputs, fp32 accumulation (fp32 dots use IEEE precision, not TF32).

Limits and caveats:
- Attention dropout is not supported (the backend declares it, dispatch falls back with the reason).
- A query row whose keys are all padded produces a zero output and zero gradients (never NaN).
- ``return_cls_probs`` recomputes the probabilities of query 0 from the saved ``lse`` in
  ``O(Nk * D)``; they are not differentiable.
- Configs are picked by a deterministic heuristic (no autotuning at run time) from a small list
  that `fastvit kernels` compiles ahead of time for sm_80 and sm_90a.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

try:  # importing fastvit.kernels never fails without triton; the launchers say why they cannot run
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
    HAS_TRITON = False

__all__ = [
    "MAX_HEAD_DIM", "SUPPORTED_DTYPES", "attention", "attention_with_cls_probs", "attention_fwd",
    "attention_bwd", "attention_ref", "not_supported_reasons", "iter_compile_specs", "Config",
]

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``a @ b`` with fp32 accumulation. ``UPCAST`` is set only under the Triton interpreter for
        bf16, whose numpy emulation of a bf16 ``tl.dot`` is wrong; compiled kernels never upcast."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _logits(q, k, offs_m, offs_n, b, h, Nq, Nk, qk_scale,
                TABLE, INDEX, DENSE, PAD,
                stride_tt, stride_th, stride_im, stride_in,
                stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
                EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """One ``[BLOCK_M, BLOCK_N]`` tile of the logits in log2 units, -inf where masked."""
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        in_bounds = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        if HAS_REL:
            if EVEN_M and EVEN_N:
                idx = tl.load(INDEX + offs_m[:, None] * stride_im + offs_n[None, :] * stride_in)
            else:
                idx = tl.load(INDEX + offs_m[:, None] * stride_im + offs_n[None, :] * stride_in,
                              mask=in_bounds, other=0)
            bias = tl.load(TABLE + idx.to(tl.int64) * stride_tt + h * stride_th)
            s += bias.to(tl.float32) * 1.4426950408889634
        if HAS_DENSE:
            ptrs = DENSE + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
            if EVEN_M and EVEN_N:
                dense = tl.load(ptrs)
            else:
                dense = tl.load(ptrs, mask=in_bounds, other=0.0)
            s += dense.to(tl.float32) * 1.4426950408889634
        if HAS_PAD:
            keep = tl.load(PAD + b * stride_pb + offs_n * stride_pn, mask=offs_n < Nk, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        if not EVEN_N:
            s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
        return s

    @triton.jit
    def _attn_fwd(Q, K, V, OUT, LSE, TABLE, INDEX, DENSE, PAD,
                  stride_qb, stride_qh, stride_qm, stride_km, stride_kb, stride_kh,
                  stride_vb, stride_vh, stride_vm, stride_ob, stride_oh, stride_om,
                  stride_tt, stride_th, stride_im, stride_in,
                  stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                  H, Nq, Nk, D, DV, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        if EVEN_M and EVEN_D:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start_n in range(0, Nk, BLOCK_N):
            offs_n = start_n + offs_n0
            k_ptrs = k_base + offs_n[:, None] * stride_km + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vm + offs_dv[None, :]
            if EVEN_N and EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < D), other=0.0)
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)
            s = _logits(q, k, offs_m, offs_n, b, h, Nq, Nk, qk_scale, TABLE, INDEX, DENSE, PAD,
                        stride_tt, stride_th, stride_im, stride_in,
                        stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                        HAS_REL, HAS_DENSE, HAS_PAD, EVEN_M, EVEN_N, PRECISION, UPCAST)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with every key masked so far has m_new = -inf: subtract 0 instead (p = 0, no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new

        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        # lse in natural-log units; +inf for an empty row makes every recomputed p exactly 0 in backward.
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < DV))
        tl.store(LSE + bh * Nq + offs_m, lse, mask=offs_m < Nq)

    @triton.jit
    def _attn_bwd_preprocess(OUT, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                             H, Nq, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
        """``delta = rowsum(dO * O)`` per query row, fp32."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask = (offs_m[:, None] < Nq) & (offs_dv[None, :] < DV)
        o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_, DTABLE, DDENSE,
                       TABLE, INDEX, DENSE, PAD,
                       stride_dkb, stride_dkh, stride_dkm, stride_dvb, stride_dvh, stride_dvm, stride_gtt, stride_gth,
                       stride_qb, stride_qh, stride_qm, stride_km, stride_kb, stride_kh,
                       stride_vb, stride_vh, stride_vm, stride_dob, stride_doh, stride_dom,
                       stride_tt, stride_th, stride_im, stride_in,
                       stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                       H, Nq, Nk, D, DV, qk_scale, sm_scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr,
                       HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
                       GRAD_TABLE: tl.constexpr, GRAD_DENSE: tl.constexpr,
                       EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """One key block: loops over all query blocks. Also scatters the bias gradients, since
        every (query, key) pair is visited exactly once across this grid."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_km + offs_d[None, :]
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vm + offs_dv[None, :]
        if EVEN_N and EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < D), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = start_m + offs_m0
            q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
            do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_dv[None, :]
            if EVEN_M and EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
                do = tl.load(do_ptrs, mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < DV), other=0.0)
            lse = tl.load(LSE + bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
            s = _logits(q, k, offs_m, offs_n, b, h, Nq, Nk, qk_scale, TABLE, INDEX, DENSE, PAD,
                        stride_tt, stride_th, stride_im, stride_in,
                        stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                        HAS_REL, HAS_DENSE, HAS_PAD, EVEN_M, EVEN_N, PRECISION, UPCAST)
            p = tl.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N); 0 where masked or the row is empty
            dv += _mm(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST)
            dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])  # dL/dS in natural units: the bias gradient
            dk += _mm(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST)
            in_bounds = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
            if GRAD_TABLE:
                idx = tl.load(INDEX + offs_m[:, None] * stride_im + offs_n[None, :] * stride_in,
                              mask=in_bounds, other=0)
                tl.atomic_add(DTABLE + idx.to(tl.int64) * stride_gtt + h * stride_gth, ds, mask=in_bounds)
            if GRAD_DENSE:
                # A dense, unreduced [B, H, Nq, Nk] fp32 buffer; the launcher sums broadcast dims.
                tl.store(DDENSE + bh * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :], ds, mask=in_bounds)
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkm + offs_d[None, :]
        dv_ptrs = DV_ + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvm + offs_dv[None, :]
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < D))
        tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < DV))

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, TABLE, INDEX, DENSE, PAD,
                     stride_dqb, stride_dqh, stride_dqm,
                     stride_qb, stride_qh, stride_qm, stride_km, stride_kb, stride_kh,
                     stride_vb, stride_vh, stride_vm, stride_dob, stride_doh, stride_dom,
                     stride_tt, stride_th, stride_im, stride_in,
                     stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                     H, Nq, Nk, D, DV, qk_scale, sm_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr,
                     HAS_REL: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_PAD: tl.constexpr,
                     EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """One query block: loops over all key blocks."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :]
        if EVEN_M and EVEN_D:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_ptrs, mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for start_n in range(0, Nk, BLOCK_N):
            offs_n = start_n + offs_n0
            k_ptrs = k_base + offs_n[:, None] * stride_km + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vm + offs_dv[None, :]
            if EVEN_N and EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < D), other=0.0)
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)
            s = _logits(q, k, offs_m, offs_n, b, h, Nq, Nk, qk_scale, TABLE, INDEX, DENSE, PAD,
                        stride_tt, stride_th, stride_im, stride_in,
                        stride_db, stride_dh, stride_dm, stride_dn, stride_pb, stride_pn,
                        HAS_REL, HAS_DENSE, HAS_PAD, EVEN_M, EVEN_N, PRECISION, UPCAST)
            p = tl.exp2(s - lse[:, None])
            dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D))


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One launch configuration; ``keep`` prunes it by head dim (register pressure)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def keep(self, block_d: int) -> bool:
        # Q, K, V tiles and the accumulator live in registers: 64x64 tiles with 4 warps at head dim
        # 128 are pruned. `fastvit kernels` still reports spills for fp32 at head dim 128 (all
        # configs); tuning those (smaller tiles, fewer stages) is open work, measured on a GPU.
        if block_d >= 128:
            return self.num_warps == 8 or self.block_n <= 32
        return True

    def __str__(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"


FWD_CONFIGS = (Config(64, 64, 4, 2), Config(128, 64, 8, 2), Config(64, 32, 4, 2))
BWD_CONFIGS = (Config(32, 64, 4, 1), Config(64, 32, 4, 1), Config(32, 32, 4, 1))


def _block_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d)) if HAS_TRITON else max(16, 1 << (d - 1).bit_length())


def _pick_fwd_config(nq: int, block_d: int) -> Config:
    """Deterministic choice (no run-time autotuning): long query sequences take 128-row tiles."""
    candidates = [c for c in FWD_CONFIGS if c.keep(block_d)]
    if nq >= 1024:
        for c in candidates:
            if c.block_m == 128:
                return c
    return candidates[0]


def _pick_bwd_config(block_d: int) -> Config:
    return next(c for c in BWD_CONFIGS if c.keep(block_d))


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, *, rel_table: Optional[Tensor] = None,
                          rel_index: Optional[Tensor] = None, dense_bias: Optional[Tensor] = None,
                          key_padding: Optional[Tensor] = None) -> list:
    """Why the kernels cannot serve these inputs, in sentences a user can act on (empty = they can)."""
    reasons = []
    if not HAS_TRITON:
        return ["triton is not installed (pip install triton; Linux only)"]
    if q.device.type != "cuda" and not _interpreting():
        reasons.append(f"q is on {q.device.type}; the triton kernels need CUDA (or TRITON_INTERPRET=1)")
    if q.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (fp32, fp16, bf16)")
    widest = max(q.shape[-1], v.shape[-1])
    if widest > MAX_HEAD_DIM:
        reasons.append(f"head_dim={widest} > {MAX_HEAD_DIM} (the kernel keeps a head row in registers)")
    if rel_table is not None and rel_table.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"rel_table dtype {rel_table.dtype} is not supported")
    return reasons


def _check(q, k, v, rel_table, rel_index, dense_bias, key_padding) -> None:
    """The launchers' contract; ``fastvit.attention`` validates the same before dispatch."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[-1] != D or k.shape[2] != v.shape[2]:
        raise ValueError(f"mismatched q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device: {q.dtype}/{k.dtype}/{v.dtype}, "
                         f"{q.device}/{k.device}/{v.device}")
    Nk = k.shape[2]
    if (rel_table is None) != (rel_index is None):
        raise ValueError("rel_table and rel_index come together")
    if rel_index is not None and (tuple(rel_index.shape) != (Nq, Nk) or rel_table.dim() != 2
                                  or rel_table.shape[1] != H):
        raise ValueError(f"rel_index {tuple(rel_index.shape)} must be (Nq, Nk) = {(Nq, Nk)} and rel_table "
                         f"{tuple(rel_table.shape)} must be [T, {H}]")
    if dense_bias is not None:
        if dense_bias.dim() != 4 or any(s not in (1, t) for s, t in zip(dense_bias.shape, (B, H, Nq, Nk))):
            raise ValueError(f"dense_bias {tuple(dense_bias.shape)} does not broadcast to {(B, H, Nq, Nk)}")
    if key_padding is not None and tuple(key_padding.shape) != (B, Nk):
        raise ValueError(f"key_padding {tuple(key_padding.shape)} must be [B, Nk] = {(B, Nk)}")
    reasons = not_supported_reasons(q, k, v)
    if reasons:
        raise ValueError("; ".join(reasons))


def _bias_args(q: Tensor, rel_table, rel_index, dense_bias, key_padding) -> tuple:
    """Pointers and strides of the optional inputs (a dummy tensor where absent)."""
    dummy = q
    if rel_table is not None:
        table, index = rel_table, rel_index.to(torch.int64)
        t_strides = (table.stride(0), table.stride(1))
        i_strides = (index.stride(0), index.stride(1))
    else:
        table = index = dummy
        t_strides = i_strides = (0, 0)
    if dense_bias is not None:
        dense = dense_bias
        d_strides = tuple(0 if dense.shape[i] == 1 else dense.stride(i) for i in range(4))
    else:
        dense, d_strides = dummy, (0, 0, 0, 0)
    if key_padding is not None:
        pad = key_padding.to(torch.int8)
        p_strides = (pad.stride(0), pad.stride(1))
    else:
        pad, p_strides = dummy, (0, 0)
    return (table, index, dense, pad), t_strides + i_strides + d_strides + p_strides


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


def _rows(t: Tensor) -> Tensor:
    """The kernels read rows with a unit last stride; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, *, scale: float, rel_table=None, rel_index=None,
                  dense_bias=None, key_padding=None, return_cls_probs: bool = False) -> tuple:
    """Fused forward. Returns ``(out [B, H, Nq, Dv], lse [B, H, Nq] fp32, cls_probs | None)``.

    ``cls_probs`` is ``[B, H, Nk]`` in the input dtype: the probabilities of query 0, recomputed from ``lse``.
    """
    _check(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, Nq, D = q.shape
    Nk, DV = k.shape[2], v.shape[3]
    out = torch.empty((B, H, Nq, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    block_d, block_dv = _block_dim(D), _block_dim(DV)
    cfg = _pick_fwd_config(Nq, max(block_d, block_dv))
    (table, index, dense, pad), bias_strides = _bias_args(q, rel_table, rel_index, dense_bias, key_padding)
    grid = (triton.cdiv(Nq, cfg.block_m), B * H)
    if Nq > 0 and B * H > 0:
        _attn_fwd[grid](
            q, k, v, out, lse, table, index, dense, pad,
            q.stride(0), q.stride(1), q.stride(2), k.stride(2), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *bias_strides, H, Nq, Nk, D, DV, scale * _LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            HAS_REL=rel_table is not None, HAS_DENSE=dense_bias is not None, HAS_PAD=key_padding is not None,
            EVEN_M=Nq % cfg.block_m == 0, EVEN_N=Nk % cfg.block_n == 0, EVEN_D=(D == block_d and DV == block_dv),
            PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    cls_probs = None
    if return_cls_probs:
        cls_probs = _cls_probs(q, k, lse, scale, rel_table, rel_index, dense_bias, key_padding)
    return out, lse, cls_probs


def _cls_probs(q, k, lse, scale, rel_table, rel_index, dense_bias, key_padding) -> Tensor:
    """Probabilities of query 0 over all keys from the saved lse: one row, O(Nk * D) per head."""
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * scale  # (b, h, nk)
    if rel_table is not None:
        logits = logits + rel_table.float()[rel_index[0].long()].t().unsqueeze(0)
    if dense_bias is not None:
        logits = logits + dense_bias[:, :, 0].float()
    if key_padding is not None:
        logits = logits.masked_fill(~key_padding[:, None, :], float("-inf"))
    return torch.exp(logits - lse[:, :, :1]).to(q.dtype)


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, scale: float,
                  rel_table=None, rel_index=None, dense_bias=None, key_padding=None,
                  grad_table: bool = False, grad_dense: bool = False) -> tuple:
    """Fused backward. Returns ``(dq, dk, dv, d_rel_table | None, d_dense_bias | None)``."""
    q, k, v, out, do = _rows(q), _rows(k), _rows(v), _rows(out), do.contiguous()
    B, H, Nq, D = q.shape
    Nk, DV = k.shape[2], v.shape[3]
    block_d, block_dv = _block_dim(D), _block_dim(DV)
    cfg = _pick_bwd_config(max(block_d, block_dv))
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    # Contiguous gradients, whatever the (possibly strided) layout of q, k, v.
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    grad_table = grad_table and rel_table is not None
    grad_dense = grad_dense and dense_bias is not None
    dtable = torch.zeros(rel_table.shape, dtype=torch.float32, device=q.device) if grad_table else q
    ddense = torch.empty((B, H, Nq, Nk), dtype=torch.float32, device=q.device) if grad_dense else q
    (table, index, dense, pad), bias_strides = _bias_args(q, rel_table, rel_index, dense_bias, key_padding)
    flags = dict(HAS_REL=rel_table is not None, HAS_DENSE=dense_bias is not None, HAS_PAD=key_padding is not None,
                 EVEN_M=Nq % cfg.block_m == 0, EVEN_N=Nk % cfg.block_n == 0,
                 EVEN_D=(D == block_d and DV == block_dv), PRECISION=_precision(q.dtype),
                 UPCAST=_upcast(q.dtype))
    if B * H > 0 and Nq > 0:
        _attn_bwd_preprocess[(triton.cdiv(Nq, cfg.block_m), B * H)](
            out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
            H, Nq, DV, BLOCK_M=cfg.block_m, BLOCK_DV=block_dv,
        )
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(2), k.stride(0), k.stride(1),
                  v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                  *bias_strides, H, Nq, Nk, D, DV, scale * _LOG2E, scale)
        _attn_bwd_dkdv[(triton.cdiv(Nk, cfg.block_n), B * H)](
            q, k, v, do, lse, delta, dk, dv, dtable, ddense, table, index, dense, pad,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            dtable.stride(0) if grad_table else 0, dtable.stride(1) if grad_table else 0, *common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            GRAD_TABLE=grad_table, GRAD_DENSE=grad_dense, **flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        _attn_bwd_dq[(triton.cdiv(Nq, cfg.block_m), B * H)](
            q, k, v, do, lse, delta, dq, table, index, dense, pad, dq.stride(0), dq.stride(1), dq.stride(2), *common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, **flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    d_table = dtable.to(rel_table.dtype) if grad_table else None
    d_dense = None
    if grad_dense:
        dims = [i for i in range(4) if dense_bias.shape[i] == 1]
        d_dense = (ddense.sum(dim=dims, keepdim=True) if dims else ddense).to(dense_bias.dtype)
    return dq, dk, dv, d_table, d_dense


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees opaque ops with fake implementations) and autograd
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
    return q.new_empty((B, H, Nq, v.shape[-1])), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("fastvit::attn_bwd", mutates_args=())
def _attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                 rel_table: Optional[Tensor], rel_index: Optional[Tensor], dense_bias: Optional[Tensor],
                 key_padding: Optional[Tensor], grad_table: bool,
                 grad_dense: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dt, dd = attention_bwd(do, q, k, v, out, lse, scale=scale, rel_table=rel_table,
                                       rel_index=rel_index, dense_bias=dense_bias, key_padding=key_padding,
                                       grad_table=grad_table, grad_dense=grad_dense)
    # Custom ops return tensors only: an absent gradient travels as an empty tensor.
    return dq, dk, dv, q.new_empty(0) if dt is None else dt, q.new_empty(0) if dd is None else dd


@_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale, rel_table, rel_index, dense_bias, key_padding, grad_table, grad_dense):
    dt = torch.empty_like(rel_table) if grad_table and rel_table is not None else q.new_empty(0)
    dd = torch.empty_like(dense_bias) if grad_dense and dense_bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dt, dd


def _setup_context(ctx, inputs, output):
    q, k, v, scale, rel_table, rel_index, dense_bias, key_padding = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_table, rel_index, dense_bias, key_padding)
    ctx.scale = scale
    ctx.grad_table = rel_table is not None and rel_table.requires_grad
    ctx.grad_dense = dense_bias is not None and dense_bias.requires_grad


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, rel_table, rel_index, dense_bias, key_padding = ctx.saved_tensors
    dq, dk, dv, dt, dd = _attn_bwd_op(d_out, q, k, v, out, lse, ctx.scale, rel_table, rel_index, dense_bias,
                                      key_padding, ctx.grad_table, ctx.grad_dense)
    return dq, dk, dv, None, dt if ctx.grad_table else None, None, dd if ctx.grad_dense else None, None


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, rel_table=None, rel_index=None,
              dense_bias=None, key_padding=None) -> Tensor:
    """Differentiable fused attention (q, k, v, rel_table and dense_bias get gradients)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    _check(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    out, _ = _attn_fwd_op(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding)
    return out


def attention_with_cls_probs(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, rel_table=None,
                             rel_index=None, dense_bias=None, key_padding=None) -> tuple:
    """``(out, cls_probs [B, H, Nk])``; ``out`` is differentiable, ``cls_probs`` is not."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    _check(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    out, lse = _attn_fwd_op(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding)
    with torch.no_grad():
        cls_probs = _cls_probs(q, k, lse, scale, rel_table, rel_index, dense_bias, key_padding)
    return out, cls_probs


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (used by fastvit.kernels.aot / `fastvit kernels`)
# --------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BIAS_VARIANTS = {"plain": (False, False, False), "relpos": (True, False, False), "dense": (False, True, False),
                 "padding": (False, False, True), "relpos+padding": (True, False, True),
                 "relpos+dense+padding": (True, True, True)}


if HAS_TRITON:
    KERNELS = {fn.__name__: fn for fn in (_attn_fwd, _attn_bwd_preprocess, _attn_bwd_dkdv, _attn_bwd_dq)}
else:  # pragma: no cover
    KERNELS = {}


_POINTERS = {"Q", "K", "V", "OUT", "LSE", "TABLE", "INDEX", "DENSE", "PAD", "DO", "DELTA", "DK", "DV_", "DQ",
             "DTABLE", "DDENSE"}


def divisible_by_16(fn) -> list:
    """Pointer arguments the runtime would mark 16-byte aligned (torch allocations are)."""
    return [name for name in fn.arg_names if name in _POINTERS]


@dataclass(frozen=True)
class CompileSpec:
    kernel: str
    config: Config
    dtype: str
    block_d: int
    variant: str
    signature: dict
    constexprs: dict


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Argument types for ``ASTSource``: tensors as pointers, ints as i32, floats as fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("LSE", "DELTA", "DTABLE", "DDENSE"):
            sig[name] = "*fp32"
        elif name == "INDEX":
            sig[name] = "*i64"
        elif name == "PAD":
            sig[name] = "*i8"
        elif name in _POINTERS:
            sig[name] = f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def iter_compile_specs(dtypes=(torch.float16, torch.bfloat16, torch.float32), block_dims=(16, 32, 64, 128),
                       variants=tuple(BIAS_VARIANTS), full: bool = False) -> Iterator[CompileSpec]:
    """Every (kernel, config, dtype, head-dim bucket, bias variant) the launchers may launch, with
    masking compiled in (the heaviest variant of each). ``full`` adds the dense+padding combination."""
    if full:
        variants = tuple(variants) + ("relpos+dense+padding",)
    if not HAS_TRITON:
        return
    for torch_dtype in dtypes:
        dtype = _TRITON_DTYPES[torch_dtype]
        for block_d in block_dims:
            for variant in variants:
                has_rel, has_dense, has_pad = BIAS_VARIANTS[variant]
                flags = dict(HAS_REL=has_rel, HAS_DENSE=has_dense, HAS_PAD=has_pad, EVEN_M=False, EVEN_N=False,
                             EVEN_D=False, PRECISION=_precision(torch_dtype), UPCAST=False)
                for cfg in FWD_CONFIGS:
                    if not cfg.keep(block_d):
                        continue
                    ce = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_d, **flags)
                    yield CompileSpec("_attn_fwd", cfg, dtype, block_d, variant,
                                      _signature(_attn_fwd, dtype, ce), ce)
                cfg = _pick_bwd_config(block_d)
                for name, fn, extra in (("_attn_bwd_dkdv", _attn_bwd_dkdv, dict(GRAD_TABLE=has_rel,
                                                                                  GRAD_DENSE=has_dense)),
                                        ("_attn_bwd_dq", _attn_bwd_dq, {})):
                    ce = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_d,
                              **flags, **extra)
                    yield CompileSpec(name, cfg, dtype, block_d, variant, _signature(fn, dtype, ce), ce)
            if variants:
                cfg = _pick_bwd_config(block_d)
                ce = dict(BLOCK_M=cfg.block_m, BLOCK_DV=block_d)
                yield CompileSpec("_attn_bwd_preprocess", Config(cfg.block_m, 0, 4, 1), dtype, block_d, "-",
                                  _signature(_attn_bwd_preprocess, dtype, ce), ce)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, rel_table=None,
                  rel_index=None, dense_bias=None, key_padding=None, return_cls_probs: bool = False):
    """The same math in plain PyTorch, computed in fp32, cast to the input dtype.

    Returns ``out``, or ``(out, cls_probs fp32)`` with ``return_cls_probs``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if rel_table is not None:
        s = s + rel_table.float()[rel_index.long()].permute(2, 0, 1).unsqueeze(0)
    if dense_bias is not None:
        s = s + dense_bias.float()
    if key_padding is not None:
        s = s.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if key_padding is not None:
        p = p.masked_fill(~key_padding.any(-1)[:, None, None, None], 0.0)
    out = torch.matmul(p, v.float()).to(q.dtype)
    if return_cls_probs:
        return out, p[:, :, 0]
    return out

