"""Fused attention (FlashAttention-2) with in-kernel relative-position, dense and key-padding biases.

Math, per batch ``b`` and head ``h`` (``i`` a query, ``j`` a key)::

    s[i, j]  = scale * q[i] . k[j] + rel_table[rel_index[i, j], h] + dense_bias[b, h, i, j]
    s[i, j]  = -inf                      where key_padding[b, j] is False
    p        = softmax_j(s)              (a row with no valid key: p = 0, out = 0)
    out[i]   = sum_j p[i, j] v[j]
    lse[i]   = log(sum_j exp(s[i, j]))   (+inf for a row with no valid key, see below)

The forward streams over key blocks with an online softmax (in base 2: ``exp2`` with the scale
folded into ``log2(e)``) and saves only ``out`` and ``lse``. The backward recomputes ``p`` from
``lse``: ``delta = rowsum(dO * O)``. For short sequences (``onepass_max_n``) one program per
(batch, head) does everything in one pass (``attention_bwd_onepass.py``); otherwise one kernel per key
block accumulates ``dK, dV`` over query blocks, one per query block accumulates ``dQ`` over key
blocks. ``dS = P * (dP - delta)`` is also the gradient of every additive bias (written by the dQ or
one-pass kernel, see below). Biases enter each
``QK^T`` tile as the matmul accumulator (``_logits``), which keeps the softmax in the matmul's
register layout.

Layout: ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]``, ``out [B, H, Nq, Dv]``,
``lse [B, H, Nq]`` fp32. Strided views are accepted; a tensor is copied only when its last dim is
not contiguous. ``Nq != Nk`` and ``D != Dv`` are allowed.

Masking only where needed (FlashAttention-2's split loop), for every N:

- forward and dQ (loops over key blocks): the full key blocks run with no key-bound mask at all
  (no masked loads, no ``-inf`` select); the last, partial block runs once after the loop with the
  masks (``_fwd_step`` / ``_dq_step`` with ``MASK_N``). Query rows past Nq (the program's own rows)
  read the last row of the bias instead of masking it (their results are never stored).
- dK/dV (loop over query blocks): no tile is masked on any block; rows past Nq are clamped onto
  the last row and get ``p = 0`` from ``lse = +inf`` (only the [BLOCK_M] lse/delta loads are masked).
  A peeled masked last block made ptxas spill on sm_80; the clamp costs one vector min per block.
- EVEN_M / EVEN_N / EVEN_D (extents that are block multiples, known at launch) compile the tail
  and the remaining masks out. Key padding, when present, applies on every block.
- Exception: IEEE fp32 (the correctness path; its matmuls are unrolled FMAs) keeps one key loop
  with the masks on every block in the forward and dQ: a peeled copy doubled the code and made
  ptxas spill. TF32 and 16-bit inputs use the split loop.

Biases (any combination in one call):

- ``rel_table [T, H]`` + ``rel_index [Nq, Nk]`` (int32/int64), never expanded to ``[B, H, Nq, Nk]``.
  Two paths, chosen by a documented rule: when ``Nq * Nk <= REL_BIAS_PRECOMPUTE_MAX_LOGITS``
  (``2**18``; a tuned table may set ``rel_bias_precompute_max_logits``) the table is expanded once
  per call to ``[1, H, Nq, Nk]`` in the compute dtype (``table[index].permute(2, 0, 1)``, a torch
  gather; a batch-free dense bias is added into it; 16-bit rows padded to ``BIAS_COL_MULTIPLE`` = 64
  elements, so its loads are aligned) and the kernels read it like a dense bias: one
  coalesced tile per logit, no index tile, no dependent gather, and one pointer tile fewer in the
  biased kernels. Above the threshold, or when a dense bias with a batch dim is also given (their
  sum would be ``[B, H, Nq, Nk]``), the kernels gather ``table[h, index[i, j]]`` from the table
  transposed to ``[H, T]`` fp32 (a head's entries adjacent, so neighbouring keys, whose indices
  are usually neighbours, share sectors).
- ``dense_bias``: additive, shape ``[1|B, 1|H, Nq, Nk]`` (broadcast dims read with stride 0), read
  in q's dtype (converted when it differs). Its gradient is ``dS`` summed over the broadcast dims.
- ``key_padding [B, Nk]`` bool, True = attend.

Deterministic bias gradients (``DETERMINISTIC_BIAS_GRADS``): the dQ kernel writes its fp32 ``dS``
tiles with plain stores (no atomics, no masks) into a ``[B, H, Nq_pad, Nk_pad]`` buffer padded to
block multiples, each (batch, head, query, key) its own element; torch then sums it over the batch
(and the dense bias's broadcast dims) in a fixed order. The buffer is bounded by
``DS_BUFFER_MAX_BYTES`` (256 MiB): above it the dQ kernel runs over the batch in chunks whose
partial sums are added in order (the chunking depends only on the shapes). The one-pass backward
writes its dS tiles the same way (keys x queries), and when no per-sample bias takes a gradient each
program first sums ``BIAS_GRAD_BATCH_PER_PROGRAM`` (4) batch elements in their order, so the buffer
holds a quarter of the rows. The table gradient
scatters ``dS`` summed over the batch into ``[T, H]`` with ``index_put_(accumulate=True)`` on CUDA
(sorts the indices, then adds each run of equal indices in order: torch's deterministic
scatter-add; ``index_add_`` on CUDA uses float atomics) and ``index_add_`` (a serial loop) on the
CPU. Both bias gradients are bitwise reproducible run to run.

Row offsets: every bias, index and dS pointer is formed from int64 row offsets (``row * stride``
in int64, plus the column), and batch/head offsets are int64, so ``Nq * Nk >= 2**31`` cannot
overflow. Launches run under ``torch.cuda.device(q.device)`` (q on cuda:1 while cuda:0 is current).

Limits and caveats:

- Head dims 1..128 (``MAX_HEAD_DIM``; a head row is kept in registers). They are padded to a power
  of two >= 16 inside the kernels with masks (``D = 8, 48, 80`` work).
- fp32, fp16, bf16 inputs; fp32 accumulation; outputs in the input dtype. fp32 matmuls use TF32
  tensor cores when ``torch.backends.cuda.matmul.allow_tf32`` is True (as cuBLAS would) and IEEE
  fp32 otherwise (torch's default: exact but slow on tensor-core GPUs); the ``FP32_IEEE`` constexpr
  is chosen by the launcher at each call.
- Dropout is not supported: ``dropout_p > 0`` raises ``ValueError`` (the dispatcher falls back).
- ``scale`` must be non-zero (the bias is added to the matmul as ``bias / scale``).
- Head-block pairs are (16,16), (32,32), (64,64), (128,128) and (32,64); other D != Dv pairs run in
  (max, max) blocks (LeViT's D=16, Dv=64 runs as 64x64: wasted compute, no extra memory traffic).
- A row with no valid key gets ``out = 0`` and ``lse = +inf``: ``exp(s - lse)`` is then 0 for
  every key, so the backward yields zero gradients for it without a special case.
- ``cls_probs`` (``return_cls_probs=True``) are the probabilities of query row 0, ``[B, H, Nk]``
  in the input dtype, recomputed from the saved ``lse`` by a one-row kernel. They carry no
  gradient.
- Configs: a forced config (``forced_configs``, for timing), else the entry of the device's tuned
  table (``kernels/tuned/<device-slug>.json``, see ``load_tuned``), else a deterministic heuristic:
  the first config of a preference list that the spill table ``PRUNED`` (per capability: sm_80
  and sm_90a, from the AOT report) keeps. So the biased 16-bit backward at head dim 64 keeps
  64-key tensor-core tiles (wgmma on sm_90a). ``candidate_configs``/``tune_key`` serve a tuner.
- The ahead-of-time report (``fastvit.kernels.aot``) compiles every config the launchers pick, per
  capability, with the run-time specialisation of a typical ViT call (``variants.divisible_by_16``);
  every variant a launcher can launch is listed by ``variants.iter_compile_specs(full=True)``.
- Validation: `attention` / `attention_with_cls_probs` / `attention_fwd` / `attention_bwd` check
  their inputs once (``validated=True`` / ``checked=False`` when the caller already did, as
  ``fastvit.attention`` does); the custom ops (``fastvit::attn_*``, the one autograd path) trust them.
- Triton runs on CUDA, or on the CPU with ``TRITON_INTERPRET=1`` (tests; slow). Kernels use only
  Triton APIs present in triton 3.2 through 3.9.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .attention_bwd_onepass import _attn_bwd_onepass
from .attention_configs import (  # noqa: F401  (re-exported: the family's config API)
    _DKDV_PREFS,
    _DQ_PREFS,
    _DTYPE_CODES,
    _FORCED,
    _FWD_PREFS,
    _FWD_SPECS,
    _ONEPASS_PREFS,
    _PREPROCESS_CONFIG,
    _TUNED_CACHE,
    BACKWARD_PATHS,
    BIAS_KINDS,
    DETERMINISTIC_BIAS_GRADS,
    HEAD_BLOCKS,
    PRUNED,
    REL_BIAS_PRECOMPUTE_MAX_LOGITS,
    SPILL_CAPABILITIES,
    TUNABLE_KERNELS,
    TUNED_DIR,
    TileWork,
    _bias_kind,
    _capability,
    _cls_config,
    _dtype_class,
    _first_kept,
    _head_blocks,
    _pick_bwd_configs,
    _pick_config,
    _pick_fwd_config,
    _pick_onepass_config,
    _tf32,
    _tuned_table,
    backward_path,
    candidate_configs,
    device_slug,
    forced_configs,
    keep,
    load_tuned,
    onepass_max_n,
    rel_bias_precompute_max_logits,
    reload_tuned,
    tile_work,
    triton_next_power_of_2,
    tune_key,
    tuned_path,
)
from .attention_fwd import _attn_cls_probs, _attn_fwd
from .configs import CompileSpec, Config  # noqa: F401  (CompileSpec: part of this family's API)
from .triton_compat import TRITON_IMPORT_ERROR as _TRITON_IMPORT_ERROR
from .triton_compat import tl, triton  # noqa: F401

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
    "not_supported_reasons",
    "attention_ref",
    "attention_bwd_ref",
    "backward_path",
    "bias_grad_buffer_bytes",
    "onepass_max_n",
    "BIAS_KINDS",
    "DETERMINISTIC_BIAS_GRADS",
    "REL_BIAS_PRECOMPUTE_MAX_LOGITS",
    "TUNABLE_KERNELS",
    "candidate_configs",
    "forced_configs",
    "load_tuned",
    "tune_key",
    "tuned_path",
    "reload_tuned",
]

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # the kernels spell these constants out: a jit function reads no globals
_LN2 = 0.6931471805599453

# The fp32 buffer the bias gradients are reduced from holds ``B * H * Nq_pad * Nk_pad`` floats; above
# this many bytes the dQ kernel runs over the batch in chunks (the chunking depends only on the shapes,
# so the result stays bitwise reproducible).
DS_BUFFER_MAX_BYTES = 256 << 20

# The launcher's own dense bias (a relative-position table expanded per call) has its rows padded to
# this many elements, the widest key block: see _bias_args.
BIAS_COL_MULTIPLE = 64

# The one-pass backward sums dS over this many batch elements per program (in their order) when the
# bias gradients are batch-free: the buffer torch reduces shrinks by this factor (LeViT-256 at batch
# 128: 134 MB -> 34 MB per call) and the grid has B / 4 x H programs, each 4x longer (at one program
# per SM, LeViT's grids are several waves either way).
BIAS_GRAD_BATCH_PER_PROGRAM = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _flags(*, even_m, even_n, even_d, has_rel, has_dense, has_pad) -> dict:
    return dict(EVEN_M=even_m, EVEN_N=even_n, EVEN_D=even_d,
                HAS_REL=has_rel, HAS_DENSE=has_dense, HAS_PAD=has_pad)


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(FP32_IEEE=dtype == torch.float32 and not _tf32(dtype),
                UPCAST_DOT=dtype == torch.bfloat16 and _interpreting())


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------

def _fmt_shape(t: Optional[Tensor]) -> str:
    return "None" if t is None else str(list(t.shape))


def _check_qkv(q, k, v, layout: str = "[B, H, N, D]") -> None:
    """q, k, v: 4-D tensors of ``layout``, one supported dtype, one device, the same batch and heads, q and
    k of one head dim, every head dim in 1..MAX_HEAD_DIM. Raises ValueError naming the values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got shape {_fmt_shape(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported (supports float32, float16, bfloat16)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"batch/heads differ: q {_fmt_shape(q)}, k {_fmt_shape(k)}, v {_fmt_shape(v)} "
                         f"(expected {layout} with the same B and H)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dim of q ({q.shape[3]}) != head dim of k ({k.shape[3]})")
    for name, d in (("q/k head dim", q.shape[3]), ("v head dim", v.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name}={d} is outside 1..{MAX_HEAD_DIM} (the kernel keeps a head row in registers)")


def _check_on_device(t: Tensor, q: Tensor, name: str) -> None:
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}, q is on {q.device}")


def _check_rel_bias(q, rel_table, rel_index, index_shape: tuple, index_layout: str) -> None:
    """``rel_table [T, H]`` (float) with ``rel_index`` of ``index_shape`` (integer), both on q's device, or
    neither. ``index_layout`` names the index's dims in the message (``"[Nq, Nk]"``)."""
    if (rel_table is None) != (rel_index is None):
        raise ValueError("rel_table and rel_index go together: got "
                         f"rel_table {_fmt_shape(rel_table)}, rel_index {_fmt_shape(rel_index)}")
    if rel_table is None:
        return
    H = q.shape[1]
    if rel_table.dim() != 2 or rel_table.shape[1] != H:
        raise ValueError(f"rel_table must be [T, H={H}], got shape {_fmt_shape(rel_table)}")
    if not rel_table.is_floating_point():
        raise ValueError(f"rel_table must be a float tensor, got {rel_table.dtype}")
    if tuple(rel_index.shape) != tuple(index_shape):
        raise ValueError(f"rel_index must be {index_layout} = {list(index_shape)}, got shape {_fmt_shape(rel_index)}")
    if rel_index.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(f"rel_index must be an integer tensor, got {rel_index.dtype}")
    _check_on_device(rel_table, q, "rel_table")
    _check_on_device(rel_index, q, "rel_index")


def _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding) -> None:
    """Raises ValueError, naming the values, when the inputs break the kernels' contract."""
    _check_qkv(q, k, v)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"key count of k ({k.shape[2]}) != key count of v ({v.shape[2]})")
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    _check_rel_bias(q, rel_table, rel_index, (Nq, Nk), "[Nq, Nk]")
    if dense_bias is not None:
        shape = tuple(dense_bias.shape)
        if (dense_bias.dim() != 4 or shape[0] not in (1, B) or shape[1] not in (1, H)
                or shape[2:] != (Nq, Nk)):
            raise ValueError(f"dense_bias shape {list(shape)} is not broadcastable as [1|B, 1|H, Nq, Nk] "
                             f"to [B, H, Nq, Nk] = {[B, H, Nq, Nk]}")
        if not dense_bias.is_floating_point():
            raise ValueError(f"dense_bias must be a float tensor, got {dense_bias.dtype}")
        _check_on_device(dense_bias, q, "dense_bias")
    if key_padding is not None:
        if tuple(key_padding.shape) != (B, Nk):
            raise ValueError(f"key_padding must be [B, Nk] = [{B}, {Nk}], got shape {_fmt_shape(key_padding)}")
        if key_padding.dtype != torch.bool:
            raise ValueError(f"key_padding must be bool (True = attend), got {key_padding.dtype}")
        _check_on_device(key_padding, q, "key_padding")


def _check_bwd_shapes(q: Tensor, v: Tensor, do: Tensor, out: Tensor, lse: Tensor) -> None:
    """A backward's ``do`` and ``out`` are ``[B, H, Nq, Dv]`` and ``lse`` ``[B, H, Nq]`` (ValueError otherwise)."""
    B, H, Nq = q.shape[:3]
    Dv = v.shape[3]
    for name, t, shape in (("do", do, (B, H, Nq, Dv)), ("out", out, (B, H, Nq, Dv)), ("lse", lse, (B, H, Nq))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {_fmt_shape(t)}")


def _bias_grads_wanted(rel_table, dense_bias, need_rel_grad, need_dense_grad) -> tuple[bool, bool]:
    """Which bias gradients a backward computes: as asked, or (None) where the bias requires grad; never
    for an absent bias."""
    if need_rel_grad is None:
        need_rel_grad = rel_table is not None and rel_table.requires_grad
    if need_dense_grad is None:
        need_dense_grad = dense_bias is not None and dense_bias.requires_grad
    return bool(need_rel_grad) and rel_table is not None, bool(need_dense_grad) and dense_bias is not None


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

    rel_table: Tensor  # [H, T] fp32 contiguous (the transpose of the caller's [T, H])
    rel_index: Tensor  # [Nq, Nk] int32 contiguous
    dense_bias: Tensor  # [1|B, 1|H, Nq, Nk] in q's dtype, last dim contiguous; or the expanded table
    key_padding: Tensor  # [B, Nk] uint8 contiguous
    strides: tuple  # stride_th, stride_im, stride_db, stride_dh, stride_dm, stride_pb
    has_rel: bool  # gather the table in-kernel
    has_dense: bool
    has_pad: bool
    cols_padded: bool = False  # the dense bias is the launcher's own, rows padded to BIAS_COL_MULTIPLE

    @property
    def kind(self) -> str:
        return "gather" if self.has_rel else ("dense" if self.has_dense or self.has_pad else "none")

    @property
    def cls_strides(self) -> tuple:  # stride_th, stride_db, stride_dh, stride_pb
        return (self.strides[0], self.strides[2], self.strides[3], self.strides[5])


def _precompute_rel(q: Tensor, nq: int, nk: int, dense_bias: Optional[Tensor]) -> bool:
    """Whether a relative-position table runs as a dense ``[1, H, Nq, Nk]`` bias expanded once per
    call (see REL_BIAS_PRECOMPUTE_MAX_LOGITS). A dense bias with a batch dim is then kept separate:
    adding the two would materialise ``[B, H, Nq, Nk]``, so the table is gathered in-kernel instead."""
    if dense_bias is not None and dense_bias.shape[0] != 1:
        return False
    return nq * nk <= rel_bias_precompute_max_logits(q.device)


_PLACEHOLDERS: dict = {}  # (dtype, device) -> an empty tensor: the pointer of a bias a call does not have


def _placeholder(dtype: torch.dtype, device: torch.device) -> Tensor:
    """One empty tensor per dtype and device, made once (never written, never read by a kernel)."""
    try:
        return _PLACEHOLDERS[dtype, device]
    except KeyError:
        return _PLACEHOLDERS.setdefault((dtype, device), torch.empty(0, dtype=dtype, device=device))


_NO_BIAS: dict = {}  # (dtype, device) -> the _BiasArgs of a call without any bias

# Expanded tables of frozen relative-position tables (eval, inference), per table tensor: reused while
# the table, its index and the dtype are the same (tensor versions included), dropped with the table.
_EXPANDED = WeakIdKeyDictionary()  # by identity: a tensor's == is elementwise


def _expanded_table(rel_table: Tensor, rel_index: Tensor, dense_bias: Optional[Tensor],
                    dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``table[index]`` as a ``[1, H, Nq, Nk]`` dense bias in ``dtype`` (plus a batch-free dense bias),
    and whether its rows are padded. 16-bit: rows padded to BIAS_COL_MULTIPLE elements (zeros), so
    aligned rows give 128-bit loads and a key block past Nk reads the padding instead of clamping its
    columns (BIAS_PADDED); not fp32, whose IEEE forward at head dim 128 spills with aligned rows
    (sm_90a, 16x16 tiles).

    Without a dense bias and when the table takes no gradient here (eval: ``torch.no_grad()``, or a
    frozen table) the result is cached per table tensor and reused while neither the table nor the
    index has changed (their ``_version`` counters), so a frozen model expands each table once."""
    # not cached: a CUDA graph being captured (its memory belongs to the graph's pool) and inference
    # tensors (made under torch.inference_mode: no version counter to tell a change)
    cacheable = (dense_bias is None and not (torch.is_grad_enabled() and rel_table.requires_grad)
                 and not (rel_table.is_cuda and torch.cuda.is_current_stream_capturing())
                 and not rel_table.is_inference() and not rel_index.is_inference())
    key = (rel_table._version, id(rel_index), rel_index._version, rel_index.shape, dtype) if cacheable else None
    if cacheable:
        hit = _EXPANDED.get(rel_table)
        if hit is not None and hit[0] == key and hit[1]() is rel_index:
            return hit[2], hit[3]
    nq, nk = rel_index.shape
    expanded = rel_table.detach().float()[rel_index.long()].permute(2, 0, 1).unsqueeze(0)  # (1, h, nq, nk)
    if dense_bias is not None:
        expanded = expanded + dense_bias.detach().float()
    if dtype == torch.float32:
        out, padded = expanded, False
    else:
        nk_pad = -(-nk // BIAS_COL_MULTIPLE) * BIAS_COL_MULTIPLE
        buf = torch.zeros((1, expanded.shape[1], nq, nk_pad), dtype=dtype, device=expanded.device)
        buf[..., :nk] = expanded
        out, padded = buf[..., :nk], True
    if cacheable:
        _EXPANDED[rel_table] = (key, weakref.ref(rel_index), out, padded)
    return out, padded


# A caller's frozen dense bias in 16-bit with unaligned rows (Nk = 49, 196, 197: scalar 16-bit loads),
# seen unchanged by a second forward, is copied once into rows padded to BIAS_COL_MULTIPLE, and the
# copy is read while the tensor is unchanged (its version counter): a bias computed once per forward
# and shared by every block (timm BEiT's shared relative-position bias) or kept by its module pays one
# copy instead of unaligned reads in every call, and a bias made fresh for each call is never copied
# (its first sighting is its last). Not for a bias that takes a gradient, a view (a copy would
# materialise its broadcast), inference tensors or CUDA graph capture (as `_expanded_table`).
_PADDED_DENSE = WeakIdKeyDictionary()  # bias tensor -> (its key, the padded copy or None: seen once)


def _aligned_dense_bias(dense_bias: Tensor, dtype: torch.dtype, forward: bool) -> tuple[Tensor, bool]:
    """``(bias, rows padded)``: the padded copy of a frozen dense bias on its second forward (and
    after, while unchanged; ``forward=False``, the backward, only reads the cache), else the bias."""
    nk = dense_bias.shape[-1]
    if (dtype == torch.float32 or nk == 1 or nk % BIAS_COL_MULTIPLE == 0 or dense_bias.requires_grad
            or not dense_bias.is_contiguous() or dense_bias.is_inference()
            or (dense_bias.is_cuda and torch.cuda.is_current_stream_capturing())):
        return dense_bias, False
    key = (dense_bias._version, dense_bias.shape, dtype)
    hit = _PADDED_DENSE.get(dense_bias)
    if hit is not None and hit[0] == key and hit[1] is not None:
        return hit[1], True
    if not forward:
        return dense_bias, False
    if hit is None or hit[0] != key:  # first sighting (or changed since): remember it
        _PADDED_DENSE[dense_bias] = (key, None)
        return dense_bias, False
    nk_pad = -(-nk // BIAS_COL_MULTIPLE) * BIAS_COL_MULTIPLE
    buf = dense_bias.new_zeros((*dense_bias.shape[:-1], nk_pad), dtype=dtype)
    buf[..., :nk] = dense_bias
    _PADDED_DENSE[dense_bias] = (key, buf[..., :nk])
    return buf[..., :nk], True


def _bias_args(q, rel_table, rel_index, dense_bias, key_padding, forward: bool = False) -> _BiasArgs:
    """Normalises the biases to what the kernels are compiled for: table fp32 ``[H, T]``, index
    int32, dense bias in q's dtype, padding as uint8. A small relative-position table is expanded
    (plus a batch-free dense bias) to one dense bias in q's dtype, and a frozen 16-bit dense bias
    seen again unchanged is read from a copy with padded rows (`_aligned_dense_bias`; ``forward``:
    the call may make that copy). Absent biases become empty placeholders with the same dtypes, so a
    variant's signature does not depend on which are present."""
    device = q.device
    if rel_table is None and dense_bias is None and key_padding is None:
        try:
            return _NO_BIAS[q.dtype, device]
        except KeyError:
            pass
    nq, nk = q.shape[2], rel_index.shape[1] if rel_index is not None else 0
    has_rel = rel_table is not None
    cols_padded = False
    if has_rel and _precompute_rel(q, nq, nk, dense_bias):
        dense_bias, cols_padded = _expanded_table(rel_table, rel_index, dense_bias, q.dtype)
        has_rel = False
    elif dense_bias is not None:
        dense_bias, cols_padded = _aligned_dense_bias(dense_bias, q.dtype, forward)
    if has_rel:
        table = rel_table.detach().to(torch.float32).t().contiguous()  # (h, t): a head's entries adjacent
        index = rel_index.to(torch.int32).contiguous()
        rel_strides = (table.stride(0), index.stride(0))
    else:
        table, index = _placeholder(torch.float32, device), _placeholder(torch.int32, device)
        rel_strides = (0, 0)
    if dense_bias is not None:
        dense = dense_bias.detach().to(q.dtype)
        if dense.stride(-1) != 1 and dense.shape[-1] != 1:
            dense = dense.contiguous()
        # Broadcast dims are read with stride 0, whatever stride the caller's tensor has there.
        dense_strides = tuple(0 if dense.shape[i] == 1 else dense.stride(i) for i in range(3))
    else:
        dense = _placeholder(q.dtype, device)
        dense_strides = (0, 0, 0)
    if key_padding is not None:
        pad = key_padding.contiguous().view(torch.uint8)  # same bytes; triton loads bool pointers unevenly
        pad_strides = (pad.stride(0),)
    else:
        pad = _placeholder(torch.uint8, device)
        pad_strides = (0,)
    args = _BiasArgs(table, index, dense, pad, rel_strides + dense_strides + pad_strides,
                     has_rel, dense_bias is not None, key_padding is not None, cols_padded)
    if not (has_rel or args.has_dense or args.has_pad):
        _NO_BIAS[q.dtype, device] = args
    return args


def _launch(kernel, grid: int, args: tuple, constexprs: dict, cfg: Config) -> None:
    device = args[0].device
    # The kernels launch on the current CUDA device: make it q's (q on cuda:1 with cuda:0 current); the
    # guard (a device switch each way) only when it is not already.
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    kernel[(grid,)](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _geometry(q: Tensor, k: Tensor, v: Tensor, block_m: int, block_n: int, head_blocks) -> dict:
    nq, nk, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    return dict(even_m=nq % block_m == 0, even_n=nk % block_n == 0,
                even_d=(d, dv) == head_blocks)


_SCRATCH: dict = {}  # (B, H, Nq, device) -> an fp32 [B, H, Nq] buffer: the lse nobody reads


def _scratch_lse(q: Tensor, B: int, H: int, Nq: int) -> Tensor:
    """A write-only ``lse`` for calls that discard it. Shared by every such call of this shape (on any
    stream or thread: its values are never read), so it costs no allocation after the first."""
    key = (B, H, Nq, q.device)
    try:
        return _SCRATCH[key]
    except KeyError:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            # memory a CUDA graph allocates belongs to its pool (freed with the graph): never kept here
            return q.new_empty((B, H, Nq), dtype=torch.float32)
        if len(_SCRATCH) >= 64:
            _SCRATCH.clear()
        return _SCRATCH.setdefault(key, q.new_empty((B, H, Nq), dtype=torch.float32))


_MAX_SPECS = 4096


def _fwd_spec(q: Tensor, nq: int, nk: int, d: int, dv: int, bias: _BiasArgs) -> tuple:
    """``(cfg, constexprs, head_blocks)`` of a forward launch: the config (forced > tuned > heuristic)
    and every compile-time flag, derived from the sizes, dtype, device, bias kinds and TF32 mode alone,
    so they are worked out once per such key (``reload_tuned()`` forgets them; forced configs bypass
    the cache). The first launch of a key also checks that the device can run the kernels."""
    forced = _FORCED.get()
    dtype, device = q.dtype, q.device
    key = (nq, nk, d, dv, dtype, device, bias.has_rel, bias.has_dense, bias.has_pad,
           dtype is torch.float32 and _tf32(dtype))
    if forced is None:
        spec = _FWD_SPECS.get(key)
        if spec is not None:
            return spec
    _require_runtime(device)
    head_blocks = _head_blocks(d, dv)
    cfg = _pick_config("_attn_fwd", nq, nk, head_blocks, dtype, bias.kind, device)
    flags = _flags(even_m=nq % cfg.block_m == 0, even_n=nk % cfg.block_n == 0, even_d=(d, dv) == head_blocks,
                   has_rel=bias.has_rel, has_dense=bias.has_dense, has_pad=bias.has_pad)
    spec = (cfg, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_blocks[0], BLOCK_DV=head_blocks[1],
                      **flags, **_dot_flags(dtype)), head_blocks)
    if forced is None:
        if len(_FWD_SPECS) >= _MAX_SPECS:
            _FWD_SPECS.clear()
        _FWD_SPECS[key] = spec
    return spec


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
    return_cls_probs: bool = False, dropout_p: float = 0.0, checked: bool = True, need_lse: bool = True,
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
        checked: validate the inputs (False: the caller did, e.g. `attention` or the custom op).
        need_lse: False when the caller discards ``lse`` (eager inference): the kernel then writes it
            into a scratch buffer shared by such calls of the same shape, one allocation fewer per call.

    Returns:
        ``(out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] fp32, cls_probs or None)``.
    """
    if checked:
        scale = _check_scale(scale)
        _check_dropout(dropout_p)
        _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    out = q.new_empty((B, H, Nq, Dv))
    lse = q.new_empty((B, H, Nq), dtype=torch.float32) if need_lse or return_cls_probs else _scratch_lse(q, B, H, Nq)
    cls_probs = q.new_empty((B, H, Nk)) if return_cls_probs else None
    if B * H * Nq == 0 or Nk == 0:
        _require_runtime(q.device)
        if B * H * Nq and not Nk:  # no keys: every row is empty
            out.zero_()
            lse.fill_(float("inf"))
        return out, lse, cls_probs

    bias = _bias_args(q, rel_table, rel_index, dense_bias, key_padding, forward=True)
    cfg, constexprs, head_blocks = _fwd_spec(q, Nq, Nk, D, Dv, bias)
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    _launch(_attn_fwd, B * H * -(-Nq // cfg.block_m),
            (q, k, v, out, lse, bias.rel_table, bias.rel_index, bias.dense_bias, bias.key_padding,
             qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], os_[0], os_[1], os_[2], *bias.strides,
             H, Nq, Nk, D, Dv, scale * _LOG2E, 1.0 / scale), constexprs, cfg)
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
             *q.stride()[:2], *k.stride()[:3], *bias.cls_strides, H, Nq, Nk, D, scale * _LOG2E, 1.0 / scale),
            dict(BLOCK_N=cfg.block_n, BLOCK_D=head_blocks[0], **flags), cfg)


def cls_probs_from_lse(
    q: Tensor, k: Tensor, lse: Tensor, *, scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None, checked: bool = True,
) -> Tensor:
    """``[B, H, Nk]`` probabilities of query 0 (input dtype), from the ``lse`` a forward saved."""
    if checked:
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


def _table_grad(ds_heads: Tensor, rel_index: Tensor, num_entries: int) -> Tensor:
    """``d table[t, h] = sum over (i, j) with index[i, j] == t of dS[h, i, j]`` as fp32 ``[T, H]``,
    bitwise reproducible: on CUDA ``index_put_(accumulate=True)``, which sorts the indices and adds
    each run of equal indices in order in one thread (torch's deterministic scatter-add, also used
    under ``torch.use_deterministic_algorithms``; ``index_add_`` on CUDA uses atomics instead); on
    the CPU ``index_add_``, a serial loop over the index. One sort of Nq * Nk int64 indices per
    backward: microseconds at the sizes the tables have (Swin 49 x 49, LeViT 196 x 196)."""
    heads = ds_heads.shape[0]
    flat = ds_heads.reshape(heads, -1).t()  # (nq * nk, h)
    index = rel_index.reshape(-1).long()
    out = torch.zeros((num_entries, heads), dtype=torch.float32, device=ds_heads.device)
    if out.is_cuda:
        out.index_put_((index,), flat, accumulate=True)
    else:
        out.index_add_(0, index, flat)
    return out


def _chunk_bias(bias: _BiasArgs, sl: slice) -> tuple[Tensor, Tensor]:
    """The dense bias and key padding of a batch chunk (broadcast ones whole)."""
    dense_batched = bias.has_dense and bias.dense_bias.dim() == 4 and bias.dense_bias.shape[0] != 1
    return (bias.dense_bias[sl] if dense_batched else bias.dense_bias,
            bias.key_padding[sl] if bias.has_pad else bias.key_padding)


def _ds_rows(B: int, H: int, pads: tuple[int, int], per: int) -> int:
    """Rows of the dS buffer (a row: ``per`` batch elements' dS, ``[H, *pads]`` fp32), at most
    DS_BUFFER_MAX_BYTES (the batch then runs in chunks of that many rows)."""
    return max(1, min(triton.cdiv(B, per), DS_BUFFER_MAX_BYTES // (H * pads[0] * pads[1] * 4)))


def bias_grad_buffer_bytes(batch: int, heads: int, nq: int, nk: int, d: int, dv: int, dtype: torch.dtype, *,
                           biased="dense", batch_free: bool = True, capability=None) -> int:
    """Bytes of the fp32 dS buffer `attention_bwd` allocates for the bias gradients of such a call
    (``batch_free``: no per-sample dense bias takes a gradient, so the one-pass backward sums dS over
    the batch in-kernel), from the launch plan; `backward_path` applies."""
    blocks = _head_blocks(d, dv)
    kind = _bias_kind(biased, nq, nk)
    cfg = _pick_onepass_config(nq, nk, blocks, dtype, kind, capability)
    if cfg is not None:
        pads = (triton.cdiv(nk, cfg.block_n) * cfg.block_n, triton.cdiv(nq, cfg.block_m) * cfg.block_m)
        per = BIAS_GRAD_BATCH_PER_PROGRAM if batch_free else 1
    else:
        cfg = _pick_config("_attn_bwd_dq", nq, nk, blocks, dtype, kind, None, capability=capability)
        pads, per = (triton.cdiv(nq, cfg.block_m) * cfg.block_m, triton.cdiv(nk, cfg.block_n) * cfg.block_n), 1
    return _ds_rows(batch, heads, pads, per) * heads * pads[0] * pads[1] * 4


def _threepass_launcher(q, k, v, out, do, lse, dq, dk, dv, bias: _BiasArgs, scale: float, head_blocks,
                        store_ds: bool):
    """The three-pass backward: the preprocess and dK/dV kernels run now, over the whole batch; returns
    ``(run_chunk, (Nq_pad, Nk_pad), 1)``, ``run_chunk(batch slice, ds)`` launching the dQ kernel (which
    writes dS) for a chunk and returning dS as a ``[b, H, Nq, Nk]`` view of ``ds``; 1: one batch
    element per row of that buffer."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    qk_scale = scale * _LOG2E
    dots = _dot_flags(q.dtype)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    pre = _PREPROCESS_CONFIG
    _launch(_attn_bwd_preprocess, B * H * triton.cdiv(Nq, pre.block_m),
            (out, do, delta, *out.stride()[:3], *do.stride()[:3], H, Nq, Dv),
            dict(BLOCK_M=pre.block_m, BLOCK_DV=head_blocks[1], EVEN_M=Nq % pre.block_m == 0,
                 EVEN_D=Dv == head_blocks[1]), pre)

    cfg_kv, cfg_q = _pick_bwd_configs(Nq, Nk, head_blocks, q.dtype, biased=bias.kind, device=q.device)
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

    nq_pad = triton.cdiv(Nq, cfg_q.block_m) * cfg_q.block_m
    nk_pad = triton.cdiv(Nk, cfg_q.block_n) * cfg_q.block_n
    ds_strides = (nq_pad * nk_pad, nk_pad) if store_ds else (0, 0)
    flags = _flags(**_geometry(q, k, v, cfg_q.block_m, cfg_q.block_n, head_blocks),
                   has_rel=bias.has_rel, has_dense=bias.has_dense, has_pad=bias.has_pad)
    constexprs = dict(BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, BLOCK_D=head_blocks[0],
                      BLOCK_DV=head_blocks[1], **flags, STORE_DS=store_ds, **dots)

    def run_chunk(sl: slice, ds: Tensor) -> Tensor:
        dense_c, pad_c = _chunk_bias(bias, sl)
        n = sl.stop - sl.start
        _launch(_attn_bwd_dq, n * H * triton.cdiv(Nq, cfg_q.block_m),
                (q[sl], k[sl], v[sl], do[sl], lse[sl], delta[sl], dq[sl], ds,
                 bias.rel_table, bias.rel_index, dense_c, pad_c,
                 *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
                 *ds_strides, *bias.strides, H, Nq, Nk, D, Dv, qk_scale, 1.0 / scale, scale),
                constexprs, cfg_q)
        return ds[:n, :, :Nq, :Nk] if store_ds else ds

    return run_chunk, (nq_pad, nk_pad), 1


def _onepass_launcher(q, k, v, out, do, lse, dq, dk, dv, bias: _BiasArgs, scale: float, head_blocks, cfg: Config,
                      store_ds: bool, batch_sum: bool):
    """The one-pass backward (kernels/attention_bwd_onepass.py), one launch per batch chunk; returns
    ``(run_chunk, (Nk_pad, Nq_pad), per)`` like `_threepass_launcher`. Its dS buffer is keys x
    queries (returned as the transposed ``[rows, H, Nq, Nk]`` view); with ``batch_sum`` each program
    sums dS over ``per = BIAS_GRAD_BATCH_PER_PROGRAM`` batch elements in-kernel, so a buffer row holds
    the sum of that many elements."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    per = BIAS_GRAD_BATCH_PER_PROGRAM if batch_sum else 1
    nq_pad = triton.cdiv(Nq, cfg.block_m) * cfg.block_m
    nk_pad = triton.cdiv(Nk, cfg.block_n) * cfg.block_n
    # program-owned scratch: lse in log2 units and delta (padded rows: +inf and 0), the fp32 dQ sum
    programs = triton.cdiv(B, per) * H
    lse2, delta = torch.empty((2, programs, nq_pad), dtype=torch.float32, device=q.device).unbind(0)
    dq_acc = torch.empty((programs, nq_pad, head_blocks[0]), dtype=torch.float32, device=q.device)
    ds_strides = (nq_pad * nk_pad, nq_pad) if store_ds else (0, 0)
    flags = _flags(**_geometry(q, k, v, cfg.block_m, cfg.block_n, head_blocks),
                   has_rel=bias.has_rel, has_dense=bias.has_dense, has_pad=bias.has_pad)
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_blocks[0], BLOCK_DV=head_blocks[1],
                      **flags, STORE_DS=store_ds, BATCH_SUM=per > 1,
                      BIAS_PADDED=bias.cols_padded and not bias.has_rel, **_dot_flags(q.dtype))

    def run_chunk(sl: slice, ds: Tensor) -> Tensor:
        dense_c, pad_c = _chunk_bias(bias, sl)
        n = sl.stop - sl.start
        rows = triton.cdiv(n, per)
        _launch(_attn_bwd_onepass, rows * H,
                (q[sl], k[sl], v[sl], out[sl], do[sl], lse[sl], lse2, delta, dq_acc, dq[sl], dk[sl], dv[sl],
                 ds, bias.rel_table, bias.rel_index, dense_c, pad_c,
                 *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *do.stride()[:3],
                 *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *ds_strides, *bias.strides,
                 n, H, Nq, Nk, nq_pad, D, Dv, per, scale * _LOG2E, 1.0 / scale, scale),
                constexprs, cfg)
        return ds[:rows, :, :Nk, :Nq].transpose(-1, -2) if store_ds else ds

    return run_chunk, (nk_pad, nq_pad), per


def attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
    need_rel_grad: Optional[bool] = None, need_dense_grad: Optional[bool] = None, checked: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Fused attention backward: one kernel per (batch, head) for short sequences (`onepass_max_n`,
    kernels/attention_bwd_onepass.py), else FlashAttention-2's three passes (preprocess, dK/dV kernel,
    dQ kernel); `backward_path` forces either.

    Args:
        do: ``[B, H, Nq, Dv]``, the gradient of ``out``. q, k, v, out, lse: as the forward saw and
            returned them. scale and biases: as in the forward.
        need_rel_grad / need_dense_grad: compute ``d rel_table`` / ``d dense_bias``; default: whether
            the tensor requires grad.
        checked: validate the inputs (False: the caller did, e.g. the custom op behind `attention`).

    Returns:
        ``(dq, dk, dv, d_rel_table [T, H] or None, d_dense_bias (dense_bias's shape) or None)``, each
        in its input's dtype; the bias gradients are contiguous and bitwise reproducible.
    """
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if checked:
        scale = _check_scale(scale)
        _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
        _check_bwd_shapes(q, v, do, out, lse)
    _require_runtime(q.device)
    need_rel_grad, need_dense_grad = _bias_grads_wanted(rel_table, dense_bias, need_rel_grad, need_dense_grad)

    q, k, v, out = (_last_dim_contiguous(t) for t in (q, k, v, out))
    do = _last_dim_contiguous(do.to(q.dtype))
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H * Nq * Nk == 0:
        d_rel = rel_table.new_zeros(rel_table.shape) if need_rel_grad else None
        d_dense = dense_bias.new_zeros(dense_bias.shape) if need_dense_grad else None
        return dq.zero_(), dk.zero_(), dv.zero_(), d_rel, d_dense

    bias = _bias_args(q, rel_table, rel_index, dense_bias, key_padding)
    head_blocks = _head_blocks(D, Dv)
    store_ds = need_rel_grad or need_dense_grad
    cfg_1 = _pick_onepass_config(Nq, Nk, head_blocks, q.dtype, bias.kind, _capability(q.device))
    if cfg_1 is not None:
        # dS summed over the batch in-kernel unless a per-sample dense bias takes a gradient
        batch_sum = store_ds and not (need_dense_grad and dense_bias.shape[0] != 1)
        run_chunk, pads, per = _onepass_launcher(q, k, v, out, do, lse, dq, dk, dv, bias, scale, head_blocks,
                                                 cfg_1, store_ds, batch_sum)
    else:
        run_chunk, pads, per = _threepass_launcher(q, k, v, out, do, lse, dq, dk, dv, bias, scale, head_blocks,
                                                   store_ds)

    # dS, the bias gradients: each launch writes an fp32 buffer padded to block multiples with plain
    # stores, a row per batch element (or per `per` elements, summed in-kernel), which torch then sums
    # in a fixed order. The batch runs in chunks (of whole rows) when the buffer would exceed
    # DS_BUFFER_MAX_BYTES.
    rows = _ds_rows(B, H, pads, per) if store_ds else 0
    chunk = rows * per if store_ds else B
    if store_ds:
        ds = torch.empty((rows, H, *pads), dtype=torch.float32, device=q.device)
    else:
        ds = _placeholder(torch.float32, q.device)
    rel_sum = dense_sum = None
    d_dense_parts = []
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        ds_c = run_chunk(slice(b0, b1), ds)  # (rows, h, nq, nk), a view of ds
        if not store_ds:
            continue
        if need_rel_grad:
            part = ds_c.sum(dim=0)
            rel_sum = part if rel_sum is None else rel_sum + part
        if need_dense_grad:
            dims = [i for i in (0, 1) if dense_bias.shape[i] == 1]
            part = ds_c.sum(dim=dims, keepdim=True) if dims else ds_c.clone()
            if dense_bias.shape[0] == 1:
                dense_sum = part if dense_sum is None else dense_sum + part
            else:
                d_dense_parts.append(part)

    d_rel = d_dense = None
    if need_dense_grad:
        d_dense = (dense_sum if dense_sum is not None else torch.cat(d_dense_parts)).to(dense_bias.dtype)
        d_dense = d_dense.contiguous()
    if need_rel_grad:
        d_rel = _table_grad(rel_sum, rel_index, rel_table.shape[0]).to(rel_table.dtype)
    return dq, dk, dv, d_rel, d_dense


def capability_reasons(device: torch.device, dtype: torch.dtype, head_dim: int, *, dropout_p: float = 0.0,
                       scale: Optional[float] = None) -> list[str]:
    """Why the kernels cannot serve calls of this kind, from what they declare alone (no tensor is
    read): for callers that validated the inputs already (``fastvit.attention``)."""
    reasons = []
    ok, why = _runtime_available(torch.device(device))
    if not ok:
        reasons.append(why)
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not supported (supports torch.float32, torch.float16, torch.bfloat16)")
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"head_dim={head_dim} > {MAX_HEAD_DIM} (the kernel keeps a head row in registers)")
    if dropout_p > 0:
        reasons.append("attention dropout is not supported by the triton kernels")
    if scale is not None and scale == 0:
        reasons.append("scale=0.0 is not supported (the kernels add the bias to the matmul as bias / scale)")
    return reasons


def not_supported_reasons(
    q: Tensor, k: Tensor, v: Tensor, *,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
    dropout_p: float = 0.0, scale: Optional[float] = None,
) -> list[str]:
    """Why the kernels cannot serve this call, as sentences; an empty list means they can. Checks the
    capabilities (`capability_reasons`) and then the inputs themselves."""
    widest = max(q.shape[-1], v.shape[-1]) if q.dim() and v.dim() else 0
    reasons = capability_reasons(q.device, q.dtype, widest, dropout_p=dropout_p, scale=scale)
    if not reasons:
        try:
            _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
        except ValueError as e:
            reasons.append(str(e))
    return reasons


# The kernels of this family by name (the AOT report and the tests look them up here).
KERNELS = {fn.__name__: fn for fn in (_attn_fwd, _attn_cls_probs, _attn_bwd_preprocess, _attn_bwd_dkdv,
                                      _attn_bwd_dq, _attn_bwd_onepass)} if _TRITON_IMPORT_ERROR is None else {}


def launch_plan(nq: int, nk: int, d: int, dv: int, dtype: torch.dtype, *, biased=False,
                capability: Optional[tuple[int, int]] = None) -> dict:
    """What the launchers use for a shape: ``{kernel: (config, (BLOCK_D, BLOCK_DV))}`` (built-in
    configs: no tuned table; ``biased``: a bool or a bias kind; ``capability``: (major, minor),
    default the current CUDA device's, else a config clean on every capability).
    ``"_attn_bwd_onepass"`` is present when the backward runs in one pass; the three-pass kernels'
    entries are then what ``backward_path("threepass")`` would launch."""
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    blocks = _head_blocks(d, dv)
    kind = _bias_kind(biased, nq, nk)
    plan = {kernel: (_pick_config(kernel, nq, nk, blocks, dtype, kind, None, capability=capability), blocks)
            for kernel in TUNABLE_KERNELS}
    onepass = _pick_onepass_config(nq, nk, blocks, dtype, kind, capability)
    if onepass is not None:  # the backward runs this instead of the preprocess, dK/dV and dQ kernels
        plan["_attn_bwd_onepass"] = (onepass, blocks)
    return {**plan,
            "_attn_cls_probs": (_cls_config(blocks[0]), (blocks[0], blocks[0])),
            "_attn_bwd_preprocess": (_PREPROCESS_CONFIG, (blocks[1], blocks[1]))}


# --------------------------------------------------------------------------------------------------
# torch.library ops (so torch.compile(fullgraph=True) traces through the kernels) and autograd
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastvit::attn_fwd", mutates_args=())
def _attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_table: Optional[Tensor],
                 rel_index: Optional[Tensor], dense_bias: Optional[Tensor],
                 key_padding: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out, lse, _ = attention_fwd(q, k, v, scale=scale, rel_table=rel_table, rel_index=rel_index, checked=False,
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
    return cls_probs_from_lse(q, k, lse, scale=scale, rel_table=rel_table, rel_index=rel_index, checked=False,
                              dense_bias=dense_bias, key_padding=key_padding)


@_attn_cls_probs_op.register_fake
def _(q, k, lse, scale, rel_table, rel_index, dense_bias, key_padding):
    return q.new_empty((q.shape[0], q.shape[1], k.shape[2]))


def _op_grads(q: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, d_rel: Optional[Tensor],
              d_dense: Optional[Tensor]) -> tuple:
    """A backward op's outputs: a gradient that is not wanted is an empty 1-D tensor (an op's outputs
    cannot be None), two separate placeholders (they may not alias each other either)."""
    return (dq, dk, dv, q.new_empty(0) if d_rel is None else d_rel, q.new_empty(0) if d_dense is None else d_dense)


def _fake_grads(q: Tensor, k: Tensor, v: Tensor, rel_table: Optional[Tensor], dense_bias: Optional[Tensor],
                need_rel_grad: bool, need_dense_grad: bool) -> tuple:
    """The fake (meta) outputs of a backward op: dq/dk/dv like the kernel views of q/k/v it is given, the
    bias gradients contiguous when wanted."""
    return _op_grads(q, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                     rel_table.new_empty(rel_table.shape) if need_rel_grad and rel_table is not None else None,
                     dense_bias.new_empty(dense_bias.shape) if need_dense_grad and dense_bias is not None else None)


@torch.library.custom_op("fastvit::attn_bwd", mutates_args=())
def _attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                 rel_table: Optional[Tensor], rel_index: Optional[Tensor], dense_bias: Optional[Tensor],
                 key_padding: Optional[Tensor], need_rel_grad: bool,
                 need_dense_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As ``attention_bwd``; a gradient that is not wanted comes back as an empty 1-D tensor
    (an op's outputs cannot be None)."""
    dq, dk, dv, d_rel, d_dense = attention_bwd(
        do, q, k, v, out, lse, scale=scale, rel_table=rel_table, rel_index=rel_index, dense_bias=dense_bias,
        key_padding=key_padding, need_rel_grad=need_rel_grad, need_dense_grad=need_dense_grad, checked=False)
    return _op_grads(q, dq, dk, dv, d_rel, d_dense)


@_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale, rel_table, rel_index, dense_bias, key_padding, need_rel_grad,
      need_dense_grad):
    # The same layouts as the real op: dq/dk/dv like q/k/v after `_last_dim_contiguous`.
    return _fake_grads(*(_last_dim_contiguous(t) for t in (q, k, v)), rel_table, dense_bias, need_rel_grad,
                       need_dense_grad)


def _op_setup_context(ctx, inputs, output) -> None:
    """What the backward needs: the inputs, ``out`` and ``lse`` -- never the probabilities."""
    q, k, v, scale, rel_table, rel_index, dense_bias, key_padding = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, rel_table, rel_index, dense_bias, key_padding)
    ctx.scale = scale
    ctx.need_rel_grad = rel_table is not None and ctx.needs_input_grad[4]
    ctx.need_dense_grad = dense_bias is not None and ctx.needs_input_grad[6]


def _op_backward(ctx, d_out, _d_lse):
    """(dq, dk, dv, None, d_rel_table, None, d_dense_bias, None), in the op's argument order."""
    q, k, v, out, lse, rel_table, rel_index, dense_bias, key_padding = ctx.saved_tensors
    dq, dk, dv, d_rel, d_dense = torch.ops.fastvit.attn_bwd(
        d_out, q, k, v, out, lse, ctx.scale, rel_table, rel_index, dense_bias, key_padding,
        ctx.need_rel_grad, ctx.need_dense_grad)
    return (dq, dk, dv, None, d_rel if ctx.need_rel_grad else None, None,
            d_dense if ctx.need_dense_grad else None, None)


# The one autograd path: ``fastvit::attn_fwd`` differentiates through ``fastvit::attn_bwd`` (eager and
# under torch.compile alike). The ops trust their inputs: `attention` validates them first.
_attn_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _plain_eager(q: Tensor, k: Tensor, v: Tensor, rel_table: Optional[Tensor], dense_bias: Optional[Tensor]) -> bool:
    """Whether a call may run the launcher directly instead of through ``fastvit::attn_fwd``: no
    gradient to record, plain tensors, and nothing watching the dispatcher (torch.compile, jit.trace,
    torch.export, dispatch or function modes, functorch transforms), which must see the op. The op's
    dispatch costs ~10 us per call on the host; eager inference has no use for it."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or rel_table is not None and rel_table.requires_grad
                                    or dense_bias is not None and dense_bias.requires_grad):
        return False
    return (q.__class__ is Tensor and k.__class__ is Tensor and v.__class__ is Tensor
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._len_torch_dispatch_stack() and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active())


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None, validated: bool = False,
) -> Tensor:
    """Fused, differentiable attention (see the module docstring for the math and the limits).

    Args:
        q: ``[B, H, Nq, D]``. k: ``[B, H, Nk, D]``. v: ``[B, H, Nk, Dv]``.
        scale: defaults to ``D ** -0.5``.
        rel_table: ``[T, H]``; rel_index: ``[Nq, Nk]`` integer in ``[0, T)``.
        dense_bias: ``[1|B, 1|H, Nq, Nk]``. key_padding: ``[B, Nk]`` bool, True = attend.
        validated: the caller has validated the inputs (``fastvit.attention`` does, once per call);
            otherwise they are checked here, once, before the launchers (which trust them).

    Returns:
        ``out [B, H, Nq, Dv]`` in q's dtype. Gradients flow to q, k, v, rel_table and dense_bias.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not validated:
        scale = _check_scale(scale)
        _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    if _plain_eager(q, k, v, rel_table, dense_bias):
        return attention_fwd(q, k, v, scale=scale, rel_table=rel_table, rel_index=rel_index, dense_bias=dense_bias,
                             key_padding=key_padding, checked=False, need_lse=False)[0]
    out, _ = torch.ops.fastvit.attn_fwd(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding)
    return out


def attention_with_cls_probs(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None, validated: bool = False,
) -> tuple[Tensor, Tensor]:
    """``attention(...)`` plus the probabilities of query 0 over all keys.

    Returns:
        ``(out [B, H, Nq, Dv], cls_probs [B, H, Nk])``, both in q's dtype. ``out`` is
        differentiable; ``cls_probs`` is not (adaptive token sampling only ranks tokens by it).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not validated:
        scale = _check_scale(scale)
        _check_inputs(q, k, v, rel_table, rel_index, dense_bias, key_padding)
    if _plain_eager(q, k, v, rel_table, dense_bias):
        out, _, cls_probs = attention_fwd(q, k, v, scale=scale, rel_table=rel_table, rel_index=rel_index,
                                          dense_bias=dense_bias, key_padding=key_padding, return_cls_probs=True,
                                          checked=False)
        return out, cls_probs
    out, lse = torch.ops.fastvit.attn_fwd(q, k, v, scale, rel_table, rel_index, dense_bias, key_padding)
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


def attention_bwd_ref(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The twin of `attention_bwd` (both of its paths) in plain PyTorch: autograd through
    `attention_ref` in fp32. Returns ``(dq, dk, dv, d_rel_table, d_dense_bias)`` in fp32, the bias
    gradients None where the bias is absent."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    table = rel_table.detach().float().requires_grad_() if rel_table is not None else None
    dense = dense_bias.detach().float().requires_grad_() if dense_bias is not None else None
    with torch.enable_grad():
        out = attention_ref(*leaves, scale=scale, rel_table=table, rel_index=rel_index, dense_bias=dense,
                            key_padding=key_padding).float()
        wrt = leaves + [t for t in (table, dense) if t is not None]
        grads = list(torch.autograd.grad(out, wrt, do.float()))
    dq, dk, dv = grads[:3]
    d_rel = grads[3] if table is not None else None
    d_dense = grads[-1] if dense is not None else None
    return dq, dk, dv, d_rel, d_dense
