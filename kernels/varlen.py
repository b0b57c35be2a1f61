"""Fused attention over packed variable-length sequences (FlashAttention-2's ``cu_seqlens`` path).

Many sequences of different lengths share one call with no padding between them::

    q [1, H, sum(lengths), D]    k [1, H, sum(kv_lengths), D]    v [1, H, sum(kv_lengths), Dv]

Sequence ``i`` holds queries ``cu_q[i]:cu_q[i + 1]`` and keys ``cu_k[i]:cu_k[i + 1]`` (the cumulative
offsets of ``lengths`` and ``kv_lengths``) and attends only to its own keys; per sequence the math is
``kernels/attention.py``'s without a bias: ``out = softmax(scale * q k^T) v``, ``lse`` saved.

Grid: a block table per (lengths, block size), built once on the host and cached on the device: one
``(sequence, first row)`` int32 pair per block of BLOCK rows of each sequence, sequences in order. The
forward and dQ kernels launch ``table rows x H`` programs over query blocks, the dK/dV kernel over key
blocks, so the programs cover the real tokens only: a 45%-padded batch packed costs 55% of the padded
grid. Inside a program the tiles are the attention family's (``_fwd_step``, ``_dkdv_step``,
``_dq_step``): the key loop runs a sequence's partial block first, with masks, then its full blocks
without. ``delta = rowsum(dO * O)`` runs as one batch of ``sum(lengths)`` rows (``_attn_bwd_preprocess``).

Limits: no bias, no key padding (packing has none), no dropout; every length positive; head dims
1..128; fp32 (IEEE, or TF32 when torch allows it), fp16, bf16. ``cls_probs`` (``return_cls_probs``)
are each sequence's first query's probabilities over its own keys, packed as ``[1, H, sum(kv_lengths)]``.
Configs come from the attention family's preference lists (by the longest query sequence), checked
against this family's own spill-table entries (``_varlen_*`` kernels in ``spill_table.PRUNED``).

Entry points: `varlen_attention` (differentiable; ``fastvit::varlen_attn_fwd`` / ``_bwd`` custom ops,
so torch.compile traces through them), `varlen_attention_with_cls_probs`, the launchers
`varlen_attention_fwd` / `varlen_attention_bwd`, and the references `varlen_attention_ref` /
`varlen_attention_bwd_ref` (one `attention_ref` call per sequence).
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import attention as _attn
from .attention_configs import (
    _DKDV_PREFS,
    _DQ_PREFS,
    _FWD_PREFS,
    _PREPROCESS_CONFIG,
    HEAD_BLOCKS,
    SPILL_CAPABILITIES,
    _capability,
    _cls_config,
    _dtype_class,
    _head_blocks,
    _m_bucket,
    keep,
)
from .configs import CompileSpec, Config
from .triton_compat import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from .triton_compat import triton

if _TRITON_IMPORT_ERROR is None:
    from .attention_bwd import _attn_bwd_preprocess
    from .varlen_bwd import _varlen_bwd_dkdv, _varlen_bwd_dq
    from .varlen_fwd import _varlen_cls_probs, _varlen_fwd

__all__ = [
    "varlen_attention",
    "varlen_attention_with_cls_probs",
    "varlen_attention_fwd",
    "varlen_attention_bwd",
    "varlen_attention_ref",
    "varlen_attention_bwd_ref",
    "iter_compile_specs",
]

_LOG2E = 1.4426950408889634
_launch = _attn._launch  # a name of this module's own: tests record the launches here

# ---- configs ---------------------------------------------------------------------------------------

# The tiled kernels of this family and the attention family's preference lists they pick from.
TILED_KERNELS = ("_varlen_fwd", "_varlen_bwd_dkdv", "_varlen_bwd_dq")


def _prefs(kernel: str, dtype: torch.dtype, max_q: int) -> tuple:
    cls = _dtype_class(dtype)
    if kernel == "_varlen_fwd":
        return _FWD_PREFS[(cls, _m_bucket(max_q))]
    if kernel == "_varlen_bwd_dkdv":
        return _DKDV_PREFS[cls]
    if kernel == "_varlen_bwd_dq":
        return _DQ_PREFS[cls]
    raise ValueError(f"unknown kernel {kernel!r}: expected one of {TILED_KERNELS}")


def pick_config(kernel: str, max_q: int, head_blocks: tuple[int, int], dtype: torch.dtype,
                capability=None) -> Config:
    """The first config of the kernel's preference list that the spill table keeps for ``capability``
    ((major, minor); None: clean on every capability), else the list's smallest tile."""
    prefs = _prefs(kernel, dtype, max_q)
    return next((c for c in prefs if keep(c, kernel, dtype, head_blocks, "none", capability)), prefs[-1])


# ---- layouts: offsets and block tables, cached per (lengths, block, device) -------------------------

_TABLES: dict = {}
_MAX_TABLES = 256


def _cached(key, build):
    try:
        return _TABLES[key]
    except KeyError:
        pass
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.clear()
    return _TABLES.setdefault(key, build())


def cumulative_offsets(lengths: tuple, device: torch.device) -> Tensor:
    """``[len(lengths) + 1]`` int32: 0, then the running sums (``cu_seqlens``)."""
    return _cached(("cu", lengths, device), lambda: torch.tensor(
        list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32, device=device))


def block_table(lengths: tuple, block: int, device: torch.device) -> Tensor:
    """``[blocks, 2]`` int32: ``(sequence, first row)`` of every ``block``-row block of every sequence."""
    def build():
        rows = [(i, start) for i, n in enumerate(lengths) for start in range(0, n, block)]
        return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 2)

    return _cached(("blocks", lengths, block, device), build)


# ---- checks ----------------------------------------------------------------------------------------

def _as_lengths(values, name: str) -> tuple:
    lengths = tuple(int(n) for n in (values.tolist() if isinstance(values, Tensor) else values))
    if not lengths:
        raise ValueError(f"{name} is empty: a packed call needs at least one sequence")
    for i, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"{name}[{i}] = {n}: every sequence needs at least one token")
    return lengths


def _check(q: Tensor, k: Tensor, v: Tensor, lengths: tuple, kv_lengths: tuple, scale: float) -> None:
    _attn._check_qkv(q, k, v, layout="[1, H, N, D]")
    _attn._check_scale(scale)
    if q.shape[0] != 1:
        raise ValueError(f"packed sequences share one batch element: q must be [1, H, sum(lengths), D], "
                         f"got {tuple(q.shape)}")
    if len(lengths) != len(kv_lengths):
        raise ValueError(f"{len(lengths)} query sequences but {len(kv_lengths)} key sequences")
    if q.shape[2] != sum(lengths) or k.shape[2] != sum(kv_lengths) or v.shape[2] != k.shape[2]:
        raise ValueError(f"q needs sum(lengths) = {sum(lengths)} tokens and k, v sum(kv_lengths) = "
                         f"{sum(kv_lengths)}, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


# ---- launchers -------------------------------------------------------------------------------------

def _layout(q: Tensor, lengths: tuple, kv_lengths: tuple, block_q: int, block_k: Optional[int] = None):
    dev = q.device
    cu_q = cumulative_offsets(lengths, dev)
    cu_k = cu_q if kv_lengths == lengths else cumulative_offsets(kv_lengths, dev)
    table = block_table(lengths if block_k is None else kv_lengths, block_q if block_k is None else block_k, dev)
    return cu_q, cu_k, table


def varlen_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int], kv_lengths: Optional[Sequence[int]] = None, *,
    scale: Optional[float] = None, return_cls_probs: bool = False, checked: bool = True,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fused packed forward.

    Args:
        q: ``[1, H, sum(lengths), D]``. k: ``[1, H, sum(kv_lengths), D]``. v: ``[1, H, sum(kv_lengths), Dv]``.
        lengths: query tokens per sequence (positive ints); kv_lengths: keys per sequence (default lengths).
        scale: multiplies ``q . k`` (default ``D ** -0.5``).
        return_cls_probs: also return ``[1, H, sum(kv_lengths)]``: each sequence's first query's
            probabilities over its own keys (input dtype).
        checked: validate the inputs (False: the caller did).

    Returns:
        ``(out [1, H, sum(lengths), Dv] in q's dtype, lse [1, H, sum(lengths)] fp32, cls_probs or None)``.
    """
    lengths = _as_lengths(lengths, "lengths") if checked else tuple(lengths)
    kv_lengths = lengths if kv_lengths is None else (_as_lengths(kv_lengths, "kv_lengths") if checked
                                                     else tuple(kv_lengths))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if checked:
        _check(q, k, v, lengths, kv_lengths, scale)
    _attn._require_runtime(q.device)
    q, k, v = (_attn._last_dim_contiguous(t) for t in (q, k, v))
    _, H, Nq, D = q.shape
    Dv = v.shape[3]
    blocks = _head_blocks(D, Dv)
    dtype = q.dtype
    cfg = pick_config("_varlen_fwd", max(lengths), blocks, dtype, _capability(q.device))
    cu_q, cu_k, table = _layout(q, lengths, kv_lengths, cfg.block_m)
    out = q.new_empty((1, H, Nq, Dv))
    lse = q.new_empty((1, H, Nq), dtype=torch.float32)
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    n = table.shape[0]
    _launch(_varlen_fwd, n * H,
                  (q, k, v, out, lse, cu_q, cu_k, table, qs[1], qs[2], ks[1], ks[2], vs[1], vs[2], os_[1], os_[2],
                   n, Nq, D, Dv, scale * _LOG2E),
                  dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                       EVEN_D=(D, Dv) == blocks, **_attn._dot_flags(dtype)), cfg)
    cls_probs = _launch_cls_probs(q, k, lse, lengths, kv_lengths, scale) if return_cls_probs else None
    return out, lse, cls_probs


def _launch_cls_probs(q: Tensor, k: Tensor, lse: Tensor, lengths: tuple, kv_lengths: tuple, scale: float) -> Tensor:
    _, H, Nq, D = q.shape
    Nk = k.shape[2]
    block_d = _head_blocks(D, D)[0]
    cfg = _cls_config(block_d)
    cu_q, cu_k, table = _layout(q, lengths, kv_lengths, None, cfg.block_n)
    probs = q.new_empty((1, H, Nk))
    n = table.shape[0]
    _launch(_varlen_cls_probs, n * H,
                  (q, k, lse, probs, cu_q, cu_k, table, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
                   n, Nq, Nk, D, scale * _LOG2E),
                  dict(BLOCK_N=cfg.block_n, BLOCK_D=block_d, EVEN_D=D == block_d), cfg)
    return probs


def varlen_cls_probs_from_lse(q: Tensor, k: Tensor, lse: Tensor, lengths: Sequence[int],
                              kv_lengths: Optional[Sequence[int]] = None, *, scale: float) -> Tensor:
    """``[1, H, sum(kv_lengths)]``: each sequence's first query's probabilities, from a forward's ``lse``."""
    lengths = tuple(lengths)
    kv_lengths = lengths if kv_lengths is None else tuple(kv_lengths)
    _attn._require_runtime(q.device)
    q, k = _attn._last_dim_contiguous(q), _attn._last_dim_contiguous(k)
    return _launch_cls_probs(q, k, lse.contiguous(), lengths, kv_lengths, scale)


def varlen_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lengths: Sequence[int],
    kv_lengths: Optional[Sequence[int]] = None, *, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused packed backward: ``(dq, dk, dv)`` in the inputs' dtypes (q, k, v, out, lse as the forward
    saw and returned them; ``do`` the gradient of ``out``). Inputs are trusted (the forward checked them)."""
    lengths = tuple(lengths)
    kv_lengths = lengths if kv_lengths is None else tuple(kv_lengths)
    _attn._require_runtime(q.device)
    q, k, v, out = (_attn._last_dim_contiguous(t) for t in (q, k, v, out))
    do = _attn._last_dim_contiguous(do.to(q.dtype))
    lse = lse.contiguous()
    _, H, Nq, D = q.shape
    Dv = v.shape[3]
    blocks = _head_blocks(D, Dv)
    dtype = q.dtype
    dots = _attn._dot_flags(dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    delta = torch.empty((1, H, Nq), dtype=torch.float32, device=q.device)
    pre = _PREPROCESS_CONFIG
    _launch(_attn_bwd_preprocess, H * triton.cdiv(Nq, pre.block_m),
                  (out, do, delta, *out.stride()[:3], *do.stride()[:3], H, Nq, Dv),
                  dict(BLOCK_M=pre.block_m, BLOCK_DV=blocks[1], EVEN_M=Nq % pre.block_m == 0,
                       EVEN_D=Dv == blocks[1]), pre)

    cap = _capability(q.device)
    even_d = (D, Dv) == blocks
    cfg = pick_config("_varlen_bwd_dkdv", max(lengths), blocks, dtype, cap)
    cu_q, cu_k, table = _layout(q, lengths, kv_lengths, None, cfg.block_n)
    n = table.shape[0]
    _launch(_varlen_bwd_dkdv, n * H,
                  (q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, table, q.stride(1), q.stride(2), k.stride(1),
                   k.stride(2), v.stride(1), v.stride(2), do.stride(1), do.stride(2), dk.stride(1), dk.stride(2),
                   dv.stride(1), dv.stride(2), n, Nq, D, Dv, scale * _LOG2E, scale),
                  dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                       EVEN_D=even_d, **dots), cfg)

    cfg = pick_config("_varlen_bwd_dq", max(lengths), blocks, dtype, cap)
    cu_q, cu_k, table = _layout(q, lengths, kv_lengths, cfg.block_m)
    n = table.shape[0]
    _launch(_varlen_bwd_dq, n * H,
                  (q, k, v, do, lse, delta, dq, cu_q, cu_k, table, q.stride(1), q.stride(2), k.stride(1),
                   k.stride(2), v.stride(1), v.stride(2), do.stride(1), do.stride(2), dq.stride(1), dq.stride(2),
                   n, Nq, D, Dv, scale * _LOG2E, scale),
                  dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                       EVEN_D=even_d, **dots), cfg)
    return dq, dk, dv


# ---- torch.library ops and autograd ----------------------------------------------------------------

@torch.library.custom_op("fastvit::varlen_attn_fwd", mutates_args=())
def _varlen_fwd_op(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], kv_lengths: list[int],
                   scale: float) -> tuple[Tensor, Tensor]:
    out, lse, _ = varlen_attention_fwd(q, k, v, lengths, kv_lengths, scale=scale, checked=False)
    return out, lse


@_varlen_fwd_op.register_fake
def _(q, k, v, lengths, kv_lengths, scale):
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastvit::varlen_attn_bwd", mutates_args=())
def _varlen_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lengths: list[int],
                   kv_lengths: list[int], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return varlen_attention_bwd(do, q, k, v, out, lse, lengths, kv_lengths, scale=scale)


@_varlen_bwd_op.register_fake
def _(do, q, k, v, out, lse, lengths, kv_lengths, scale):
    return tuple(torch.empty_like(_attn._last_dim_contiguous(t)) for t in (q, k, v))


@torch.library.custom_op("fastvit::varlen_cls_probs", mutates_args=())
def _varlen_cls_probs_op(q: Tensor, k: Tensor, lse: Tensor, lengths: list[int], kv_lengths: list[int],
                         scale: float) -> Tensor:
    return varlen_cls_probs_from_lse(q, k, lse, lengths, kv_lengths, scale=scale)


@_varlen_cls_probs_op.register_fake
def _(q, k, lse, lengths, kv_lengths, scale):
    return q.new_empty((1, q.shape[1], k.shape[2]))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, lengths, kv_lengths, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.lengths, ctx.kv_lengths, ctx.scale = lengths, kv_lengths, scale


def _backward(ctx, d_out, _d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastvit.varlen_attn_bwd(d_out, q, k, v, out, lse, ctx.lengths, ctx.kv_lengths, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _prepare(q, k, v, lengths, kv_lengths, scale, validated):
    lengths = tuple(lengths) if validated else _as_lengths(lengths, "lengths")
    kv_lengths = lengths if kv_lengths is None else (tuple(kv_lengths) if validated
                                                     else _as_lengths(kv_lengths, "kv_lengths"))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not validated:
        _check(q, k, v, lengths, kv_lengths, scale)
    return lengths, kv_lengths, scale


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int],
                     kv_lengths: Optional[Sequence[int]] = None, *, scale: Optional[float] = None,
                     validated: bool = False) -> Tensor:
    """Fused, differentiable attention over packed sequences (see the module docstring).

    Args:
        q: ``[1, H, sum(lengths), D]``. k: ``[1, H, sum(kv_lengths), D]``. v: ``[1, H, sum(kv_lengths), Dv]``.
        lengths, kv_lengths: tokens and keys per sequence (kv_lengths defaults to lengths).
        scale: defaults to ``D ** -0.5``.
        validated: the caller has validated the inputs (``fastvit.attention`` does).

    Returns:
        ``out [1, H, sum(lengths), Dv]`` in q's dtype; gradients flow to q, k, v.
    """
    lengths, kv_lengths, scale = _prepare(q, k, v, lengths, kv_lengths, scale, validated)
    if _attn._plain_eager(q, k, v, None, None):
        return varlen_attention_fwd(q, k, v, lengths, kv_lengths, scale=scale, checked=False)[0]
    out, _ = torch.ops.fastvit.varlen_attn_fwd(q, k, v, list(lengths), list(kv_lengths), scale)
    return out


def varlen_attention_with_cls_probs(q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int],
                                    kv_lengths: Optional[Sequence[int]] = None, *, scale: Optional[float] = None,
                                    validated: bool = False) -> tuple[Tensor, Tensor]:
    """`varlen_attention` plus ``[1, H, sum(kv_lengths)]``: each sequence's first query's probabilities
    over its own keys (no gradient)."""
    lengths, kv_lengths, scale = _prepare(q, k, v, lengths, kv_lengths, scale, validated)
    if _attn._plain_eager(q, k, v, None, None):
        out, _, probs = varlen_attention_fwd(q, k, v, lengths, kv_lengths, scale=scale, return_cls_probs=True,
                                             checked=False)
        return out, probs
    out, lse = torch.ops.fastvit.varlen_attn_fwd(q, k, v, list(lengths), list(kv_lengths), scale)
    probs = torch.ops.fastvit.varlen_cls_probs(q.detach(), k.detach(), lse, list(lengths), list(kv_lengths), scale)
    return out, probs


# ---- references ------------------------------------------------------------------------------------

def varlen_attention_ref(q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int],
                         kv_lengths: Optional[Sequence[int]] = None, *, scale: Optional[float] = None,
                         return_cls_probs: bool = False):
    """The same math in plain PyTorch: one `attention_ref` call per sequence (fp32 inside, cast back).
    Returns ``out``, or ``(out, cls_probs [1, H, sum(kv_lengths)])``."""
    lengths = tuple(lengths)
    kv_lengths = lengths if kv_lengths is None else tuple(kv_lengths)
    cu_q = list(itertools.accumulate(lengths, initial=0))
    cu_k = list(itertools.accumulate(kv_lengths, initial=0))
    outs, probs = [], []
    for i in range(len(lengths)):
        qi = q[:, :, cu_q[i]:cu_q[i + 1]]
        ki, vi = k[:, :, cu_k[i]:cu_k[i + 1]], v[:, :, cu_k[i]:cu_k[i + 1]]
        res = _attn.attention_ref(qi, ki, vi, scale=scale, return_cls_probs=return_cls_probs)
        if return_cls_probs:
            outs.append(res[0])
            probs.append(res[1])
        else:
            outs.append(res)
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(probs, dim=2)) if return_cls_probs else out


def varlen_attention_bwd_ref(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lengths: Sequence[int],
                             kv_lengths: Optional[Sequence[int]] = None, *,
                             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The twin of `varlen_attention_bwd`: autograd through `varlen_attention_ref` in fp32."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        out = varlen_attention_ref(*leaves, lengths, kv_lengths, scale=scale).float()
        return tuple(torch.autograd.grad(out, leaves, do.float()))


# ---- ahead-of-time specs ---------------------------------------------------------------------------

KERNELS = ({fn.__name__: fn for fn in (_varlen_fwd, _varlen_cls_probs, _varlen_bwd_dkdv, _varlen_bwd_dq)}
           if _TRITON_IMPORT_ERROR is None else {})


def tile_spec(kernel: str, cfg: Config, dtype: torch.dtype, blocks: tuple[int, int], even_d: bool = True,
              tf32: bool = False) -> CompileSpec:
    """The compile spec of one tiled varlen kernel (its only switches: EVEN_D and the fp32 matmul mode)."""
    from .variants import kernel_signature

    return CompileSpec(kernel, cfg, kernel_signature(KERNELS[kernel], dtype), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1], EVEN_D=even_d,
        FP32_IEEE=dtype == torch.float32 and not tf32, UPCAST_DOT=False))


def spill_table_configs(dtype_class: str) -> dict:
    """``{kernel: [config, ...]}``: every config this family's launchers may pick, for `aot.spill_table`."""
    fwd = _FWD_PREFS[(dtype_class, "short")] + _FWD_PREFS[(dtype_class, "long")]
    return {"_varlen_fwd": list(dict.fromkeys(fwd)), "_varlen_bwd_dkdv": list(_DKDV_PREFS[dtype_class]),
            "_varlen_bwd_dq": list(_DQ_PREFS[dtype_class])}


def iter_compile_specs(*, full: bool = False, dtypes=None, head_blocks=HEAD_BLOCKS, include_pruned: bool = False):
    """Every variant the launchers of this family can launch: per dtype (fp32 and bf16 by default; every
    supported dtype and the TF32 and unaligned-head variants with ``full``), head blocks and capability,
    the config `pick_config` chooses (every listed config with ``include_pruned``), and the CLS-row kernel."""
    from .variants import REPORT_DTYPES, kernel_signature

    dtypes = (_attn.SUPPORTED_DTYPES if full else REPORT_DTYPES) if dtypes is None else dtypes
    for dtype, blocks in itertools.product(dtypes, head_blocks):
        tf32s = (False, True) if full and dtype == torch.float32 else (False,)
        evens = (True, False) if full else (True,)
        for kernel in TILED_KERNELS:
            configs: dict = {}
            if include_pruned:
                for cfg in spill_table_configs(_dtype_class(dtype))[kernel]:
                    configs[cfg] = list(SPILL_CAPABILITIES)
            else:
                # None: no capability known (the interpreter) picks a config clean on every capability
                for cap, max_q in itertools.product((*SPILL_CAPABILITIES, None), (128, 256)):
                    cfg = pick_config(kernel, max_q, blocks, dtype, None if cap is None else (cap // 10, 0))
                    seen = configs.setdefault(cfg, [])
                    seen += [c for c in (SPILL_CAPABILITIES if cap is None else (cap,)) if c not in seen]
            for cfg, caps in configs.items():
                caps = () if len(caps) == len(SPILL_CAPABILITIES) else tuple(caps)
                for even_d, tf32 in itertools.product(evens, tf32s):
                    yield tile_spec(kernel, cfg, dtype, blocks, even_d, tf32)._replace(capabilities=caps)
        if blocks[0] == blocks[1]:
            cls_cfg = _cls_config(blocks[0])
            for even_d in evens:
                yield CompileSpec("_varlen_cls_probs", cls_cfg, kernel_signature(KERNELS["_varlen_cls_probs"], dtype),
                                  dict(BLOCK_N=cls_cfg.block_n, BLOCK_D=blocks[0], EVEN_D=even_d))

