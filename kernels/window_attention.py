"""Fused windowed attention (Swin, shifted Swin, CrossFormer long distance, MaxViT grid, NesT blocks):
attention only inside windows of a raster token grid, addressed in place.

Math, per batch ``b``, head ``h`` and window ``w`` (``i``, ``j`` window-local positions)::

    s[i, j]  = scale * q[tok(w, i)] . k[tok(w, j)] + bias[w, h, i, j]
    s[i, j]  = -inf                      where region(w, i) != region(w, j)   (shifted windows)
    p        = softmax_j(s)
    out[tok(w, i)] = sum_j p[i, j] v[tok(w, j)]

``bias = rel_table[rel_index[i, j], h] + dense_bias[w, h, i, j]`` (either may be absent), broadcast
over the batch (and over the windows / heads where ``dense_bias`` has size 1 there).

Window geometry: a grid of ``H x W`` tokens in raster order, windows of ``wh x ww`` (``n = wh * ww``
tokens, local index ``t = i * ww + j``), ``(H // wh) * (W // ww)`` windows numbered in raster order of
window rows ``wr`` and columns ``wc``:

- plain: position ``(i, j)`` of window ``(wr, wc)`` is grid token ``(wr * wh + i, wc * ww + j)``;
- dilation ``(dh, dw)`` (CrossFormer long distance, MaxViT grid): rows are cut into blocks of
  ``wh * dh``; window row ``wr = block * dh + o`` holds rows ``block * wh * dh + o + i * dh`` (the same
  for columns). ``(1, 1)`` is the plain case;
- shift ``(sh, sw)`` (Swin's shifted windows, never with dilation): the grid is rolled by ``-shift``
  and cut as in the plain case, so position ``(i, j)`` is token ``((wr * wh + i + sh) % H,
  (wc * ww + j + sw) % W)``. A token's region is which side of the wrap its rolled coordinates
  ``r' = wr * wh + i`` (``r' >= H - sh``) and ``c'`` lie on; keys of another region are masked with
  an exact ``-inf`` (probability exactly 0; Swin's -100 is an approximation of it).

Layout: ``q [B, heads, H*W, D]``, ``k [B, heads, H*W, D]``, ``v [B, heads, H*W, Dv]``, ``out`` like
``v`` in q's dtype, raster order. Strided views are read in place (a tensor is copied only when its
last dim is not contiguous). ``lse [B, heads, H*W]`` fp32 (raster order) is saved for the backward.

Design:

- One program per (batch, head, window[, query block]). Every address comes from the window
  coordinates in-kernel (``_window_tokens``: integer vector arithmetic on the tile's positions):
  there is no partition/reverse copy, no roll and no index tensor built per call. The shift mask is
  the comparison of two region ids computed from the same coordinates (one tile compare also masks
  the padded keys). Token offsets inside a (batch, head) slice are int32 (fewer registers than
  int64 tiles; a view whose token stride would overflow them is copied), batch/head offsets int64.
- A window is padded to the tile (49 -> 64): positions past ``n`` are clamped onto position
  ``n - 1`` for every q/k/v load, so no load needs a row mask and nothing outside the tensors is
  read; padded keys get ``-inf`` and padded rows are never stored (their ``lse`` is read as
  ``+inf`` in the backward, so they contribute exactly 0).
- Biases: ``rel_table[rel_index]`` and ``dense_bias`` are summed once per call into one contiguous
  tensor in the compute dtype, ``[1|nW, 1|heads, n_pad, n_pad]`` with the window padded with zeros
  to the kernels' block (a torch gather of ``heads * n * n`` entries: Swin's 3 heads of 64 x 64 are
  24 KiB; never ``[B, ...]``). The kernels read whole, aligned tiles of it (vectorised, no clamp, no
  mask: a bias tile of 49-wide rows would be 4096 scalar loads with a 64-bit address each) and add
  it as the matmul accumulator (``bias / scale``), as ``kernels/attention.py`` does.
- Windows that fit one tile (Swin, CrossFormer, MaxViT 7x7 -> 64; 8x8; smaller windows in 16- or
  32-tiles) run one forward program per (batch, head, window) and a single fused backward kernel
  (``_win_bwd_tile``): it loads q, k, v, O, dO once, computes ``delta = rowsum(dO * O)`` itself,
  recomputes ``p`` from ``lse`` and stores dV, dQ, dK each as soon as it is done (5 matmuls instead
  of FlashAttention-2's 7, no preprocess launch, no atomics: the program owns the whole window).
  Larger windows (NesT's 14x14 = 196 tokens), and tiles whose fused backward would spill (wide
  heads, fp32), use the FlashAttention-2 pair: the forward streams key blocks with an online
  softmax, ``_win_bwd_dq`` (per query block: delta, dQ, dS) and then ``_win_bwd_dkdv`` (per key
  block, over query blocks; reads the delta the dQ kernel wrote).
- Key loops: the forward runs FlashAttention-2's split loop (full blocks unmasked, the partial last
  one peeled and masked) except when every block is masked anyway (a shift) or the matmuls are IEEE
  fp32 (unrolled FMAs: the peeled copy doubles the code and spills); the dQ kernel always runs one
  loop with the key masks on every block (its peeled copy spilled at head dim 128; the windows' key
  loops are short). dQ and dK/dV run one stage: cp.async pipelining of these short loops made ptxas
  spill a register in some variants.
- Configs (`window_plan`): a short table by dtype class and head block (`_PLAN_TABLE`), 4 warps,
  square blocks; each entry the largest block that compiles without spills for sm_80 and sm_90a
  (heaviest variant), re-checked by the ahead-of-time report (`iter_compile_specs`, compiled by
  ``fastvit.kernels.aot`` with the attention family).

Deterministic bias gradients (the gradient of the summed bias is ``dS = P * (dP - delta)``): no
float atomics anywhere. The one-tile backward reduces dS over a chunk of the batch inside the
program (a register accumulator, batch elements in order) and writes one fp32 ``[BLOCK, BLOCK]``
tile per (chunk, window, head) with plain stores; torch then sums the chunks (and the broadcast
dims) in a fixed order. The chunking depends only on the shapes: about ``DS_TARGET_PROGRAMS``
programs, the buffer at most ``DS_BUFFER_MAX_BYTES`` (Swin-T stage 1, batch 64: 11 chunks of 6,
2112 programs, a 35 MB buffer, where one tile per batch element would be 201 MB). The multi-block
dQ kernel stores dS per batch element (like ``kernels/attention.py``), its buffer bounded by
``DS_BUFFER_MAX_BYTES`` by running the batch in chunks. The table gradient scatters ``dS`` summed
over batch and windows with ``attention._table_grad`` (torch's sorted, deterministic scatter-add on
CUDA). Bitwise reproducible run to run.

Limits and caveats:

- Head dims 1..128, padded to a power of two >= 16 in-kernel with masks (D = 8, 48, 80 work);
  ``D != Dv`` runs in the wider head block for both. fp32 / fp16 / bf16 with fp32 accumulation;
  fp32 multiplies in TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set (IEEE otherwise).
- ``scale`` non-zero (the bias enters the matmul as ``bias / scale``). No dropout, no key padding.
- The grid must divide into windows (``H % (wh * dh) == 0``, ``W % (ww * dw) == 0``), ``0 <= shift
  < size``, shift and dilation not together; `window_attention` checks it (the caller may have).
  ``H * W * D < 2**31`` per (batch, head).
- ``rel_index`` values must lie in ``[0, T)``: the per-call gather raises on the CPU and asserts on
  CUDA otherwise (no out-of-range read in a kernel).
- A row whose logits are all ``-inf`` (only possible through a ``-inf`` dense bias) gets
  ``out = 0`` and zero gradients, as in `window_attention_ref`.
- Launches run under ``torch.cuda.device(q.device)``. Triton APIs from 3.2 through 3.9 only.

Files: the kernels are in ``window_tiles.py`` (window geometry), ``window_fwd.py`` (``_win_fwd``)
and ``window_bwd.py`` (``_win_bwd_tile``, ``_win_bwd_dq``, ``_win_bwd_dkdv``); this module holds the
configs (`window_plan`), the launchers with their checks, the custom ops and autograd, the AOT
report's specs and `window_attention_ref`.
"""
from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .attention import (
    _LOG2E,
    _TRITON_IMPORT_ERROR,
    DS_BUFFER_MAX_BYTES,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    _bias_grads_wanted,
    _check_bwd_shapes,
    _check_on_device,
    _check_qkv,
    _check_rel_bias,
    _check_scale,
    _dot_flags,
    _fake_grads,
    _fmt_shape,
    _last_dim_contiguous,
    _launch,
    _op_grads,
    _placeholder,
    _require_runtime,
    _runtime_available,
    _table_grad,
    triton,
    triton_next_power_of_2,
)
from .configs import CompileSpec, Config
from .window_bwd import _win_bwd_dkdv, _win_bwd_dq, _win_bwd_tile
from .window_fwd import _win_fwd

__all__ = [
    "DS_TARGET_PROGRAMS",
    "WINDOW_HEAD_BLOCKS",
    "window_attention",
    "window_attention_fwd",
    "window_attention_bwd",
    "window_not_supported_reasons",
    "window_plan",
    "window_token_index",
    "window_attention_ref",
    "iter_compile_specs",
]

# The one-tile backward reduces dS over this many programs' worth of batch chunks at most: enough
# programs to fill an H100 several times over, few enough that the dS buffer stays small.
DS_TARGET_PROGRAMS = 2048


# --------------------------------------------------------------------------------------------------
# kernels: window_tiles.py (geometry), window_fwd.py (forward), window_bwd.py (backward)
# --------------------------------------------------------------------------------------------------

# The kernels of this family by name (the AOT report and the tests look them up here).
KERNELS = {fn.__name__: fn for fn in (_win_fwd, _win_bwd_tile, _win_bwd_dq, _win_bwd_dkdv)} \
    if _TRITON_IMPORT_ERROR is None else {}


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------

def _tile(n: int) -> int:
    """A window padded to a power of two >= 16 (``tl.dot`` needs 16)."""
    return max(16, triton_next_power_of_2(n))


# Head blocks: D and Dv padded to a power of two >= 16 (as in kernels/attention.py); a pair with
# D != Dv runs in the wider block for both (no model windows a D != Dv head, and one head block per
# config keeps the table below and the AOT report short).
WINDOW_HEAD_BLOCKS = (16, 32, 64, 128)

# Per (dtype class, head block): the forward's block, the largest window tile the fused backward
# runs (0: none; larger windows take the dQ and dK/dV kernels) and the dQ and dK/dV blocks, each
# (block, warps), square. 4 warps (one per 16 rows of a 64-row tile: Triton gives chained dots all
# warps along M, so more warps only replicate the MMAs) except where fp32's wide heads needed
# another count. Each entry is the largest block whose variants (bias, shift, dS; and without the
# shift: the split key loop) compile for sm_80 and sm_90a without spills, measured with the AOT
# compiler; the report (`iter_compile_specs`) re-checks every pick. fp32 (IEEE) holds twice the
# registers per tile.
_PLAN_TABLE = {
    #                 fwd        tile  dq        dkdv
    ("16bit", 16):   ((64, 4),  64,   (64, 4),  (64, 4)),
    ("16bit", 32):   ((64, 4),  64,   (32, 4),  (32, 4)),
    ("16bit", 64):   ((64, 4),  32,   (32, 4),  (32, 4)),
    ("16bit", 128):  ((32, 4),  16,   (32, 4),  (32, 4)),
    ("fp32", 16):    ((32, 4),  32,   (32, 4),  (32, 4)),
    ("fp32", 32):    ((32, 4),  16,   (32, 4),  (32, 4)),
    ("fp32", 64):    ((16, 2),  0,    (16, 2),  (16, 2)),
    ("fp32", 128):   ((32, 8),  0,    (16, 4),  (32, 8)),
}


def _window_head_blocks(d: int, dv: int) -> tuple[int, int]:
    widest = max(16, triton_next_power_of_2(max(d, dv)))
    return widest, widest


def window_plan(n: int, d: int, dv: int, dtype: torch.dtype) -> dict:
    """What the launchers run for windows of ``n`` tokens: ``{kernel: (Config, (BLOCK_D, BLOCK_DV))}``.

    The rule (`_PLAN_TABLE`): a window padded to its tile (16, 32, 64) runs the fused backward when
    the tile is at most the table's, forward blocks of ``min(tile, fwd block)``; otherwise (NesT's
    196 tokens, or wide heads) the forward streams key blocks and the backward runs the dQ and
    dK/dV kernels. Only the 16-bit forward pipelines its key loop (2 stages), when it has one."""
    blocks = _window_head_blocks(d, dv)
    cls = "fp32" if dtype == torch.float32 else "16bit"
    (fwd_block, fwd_warps), tile_max, (dq_block, dq_warps), (dkdv_block, dkdv_warps) = _PLAN_TABLE[(cls, blocks[0])]
    tile = _tile(n)
    fwd = min(tile, fwd_block)
    plan = {"_win_fwd": (Config(fwd, fwd, fwd_warps, 2 if tile > fwd and cls == "16bit" else 1), blocks)}
    if tile <= tile_max:
        plan["_win_bwd_tile"] = (Config(tile, tile, 4, 1), blocks)
    else:
        # One stage: the loops are short, and pipelined (cp.async) variants made ptxas spill a
        # register in some of them (a sign-extended offset kept across the loop).
        plan["_win_bwd_dq"] = (Config(dq_block, dq_block, dq_warps, 1), blocks)
        plan["_win_bwd_dkdv"] = (Config(dkdv_block, dkdv_block, dkdv_warps, 1), blocks)
    return plan


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------

class _Window(NamedTuple):
    """The window geometry as the kernels take it (``args``), with its derived sizes."""

    grid_h: int
    grid_w: int
    win_h: int
    win_w: int
    shift_h: int
    shift_w: int
    dil_h: int
    dil_w: int

    @classmethod
    def of(cls, grid, size, shift, dilation) -> _Window:
        return cls(*(int(x) for x in (*grid, *size, *shift, *dilation)))

    @property
    def n(self) -> int:
        return self.win_h * self.win_w

    @property
    def num_win_w(self) -> int:
        return self.grid_w // self.win_w

    @property
    def num_windows(self) -> int:
        return (self.grid_h // self.win_h) * self.num_win_w

    @property
    def shifted(self) -> bool:
        return self.shift_h > 0 or self.shift_w > 0

    @property
    def args(self) -> tuple:
        """num_windows, num_win_w, grid_h, grid_w, win_h, win_w, shift_h, shift_w, dil_h, dil_w, n."""
        return (self.num_windows, self.num_win_w, self.grid_h, self.grid_w, self.win_h, self.win_w,
                self.shift_h, self.shift_w, self.dil_h, self.dil_w, self.n)


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def _geometry_reasons(grid, size, shift, dilation) -> list[str]:
    """Why a window geometry is not one the kernels define (pure: no tensor is read)."""
    try:
        (H, W), (wh, ww), (sh, sw), (dh, dw) = (_pair(grid, "grid"), _pair(size, "size"), _pair(shift, "shift"),
                                                _pair(dilation, "dilation"))
    except ValueError as e:
        return [str(e)]
    reasons = []
    if min(H, W, wh, ww) < 1:
        reasons.append(f"grid={(H, W)} and size={(wh, ww)} must be positive")
    if min(dh, dw) < 1:
        reasons.append(f"dilation={(dh, dw)} must be >= 1")
    if reasons:
        return reasons
    if H % (wh * dh) or W % (ww * dw):
        reasons.append(f"grid={(H, W)} is not divisible into windows of size={(wh, ww)} with dilation={(dh, dw)} "
                       f"(needs H % (wh * dh) == 0 and W % (ww * dw) == 0)")
    if not (0 <= sh < wh and 0 <= sw < ww):
        reasons.append(f"shift={(sh, sw)} must satisfy 0 <= shift < size={(wh, ww)}")
    if (sh or sw) and (dh, dw) != (1, 1):
        reasons.append(f"shift={(sh, sw)} with dilation={(dh, dw)}: shifted windows are not dilated")
    return reasons


def _check_inputs(q, k, v, window: _Window, rel_table, rel_index, dense_bias) -> None:
    """Raises ValueError, naming the values, when the inputs break the kernels' contract (the
    geometry has been checked by `_geometry_reasons`)."""
    _check_qkv(q, k, v, "[B, heads, H*W, D]")
    tokens = q.shape[2]
    if not tokens == k.shape[2] == v.shape[2]:
        raise ValueError(f"q {_fmt_shape(q)}, k {_fmt_shape(k)}, v {_fmt_shape(v)} must have one token count "
                         "(the grid's)")
    if tokens * max(q.shape[3], v.shape[3]) > _MAX_SLICE_OFFSET:
        raise ValueError(f"{tokens} tokens x head dim {max(q.shape[3], v.shape[3])} exceed 2**31 elements per "
                         "(batch, head): the kernels address a head's tokens with int32 offsets")
    if tokens != window.grid_h * window.grid_w:
        raise ValueError(f"q has {tokens} tokens, grid={(window.grid_h, window.grid_w)} has "
                         f"{window.grid_h * window.grid_w}")
    n, nw = window.n, window.num_windows
    _check_rel_bias(q, rel_table, rel_index, (n, n), "[n, n] (window-local positions)")
    if dense_bias is not None:
        if not isinstance(dense_bias, Tensor) or not dense_bias.is_floating_point():
            raise ValueError(f"dense_bias must be a float tensor, got {getattr(dense_bias, 'dtype', dense_bias)}")
        shape = tuple(dense_bias.shape)
        target = (nw, q.shape[1], n, n)
        padded = (1,) * (4 - len(shape)) + shape
        if not 2 <= len(shape) <= 4 or any(s not in (1, t) for s, t in zip(padded, target)):
            raise ValueError(f"dense_bias shape {list(shape)} is not broadcastable to [num_windows, heads, n, n] = "
                             f"{list(target)} (2 to 4 dims)")
        _check_on_device(dense_bias, q, "dense_bias")


def _validate(q, k, v, grid, size, shift, dilation, scale, rel_table, rel_index, dense_bias) -> tuple:
    """The public entry's one validation: ``(window, scale)`` or ValueError."""
    reasons = _geometry_reasons(grid, size, shift, dilation)
    if reasons:
        raise ValueError("; ".join(reasons))
    window = _Window.of(_pair(grid, "grid"), _pair(size, "size"), _pair(shift, "shift"),
                        _pair(dilation, "dilation"))
    scale = _check_scale(scale)
    _check_inputs(q, k, v, window, rel_table, rel_index, dense_bias)
    return window, scale


def _dense_4d(dense_bias: Tensor) -> Tensor:
    return dense_bias.reshape((1,) * (4 - dense_bias.dim()) + tuple(dense_bias.shape))


def _combined_bias(q: Tensor, window: _Window, rel_table, rel_index, dense_bias, block: int) -> tuple:
    """``rel_table[rel_index] + dense_bias`` (summed in fp32) as one contiguous tensor in q's dtype,
    ``[1|nW, 1|heads, n_pad, n_pad]`` with the window padded with zeros to ``n_pad``, a multiple of
    the kernel's ``block``: the kernels read whole tiles with no clamp and no mask, and the row
    stride (a multiple of 16) lets them vectorise the loads. Returns ``(bias, (stride_bw, stride_bh,
    stride_bm), has_bias)``; broadcast dims have stride 0."""
    n = window.n
    bias = None
    if rel_table is not None:
        bias = rel_table.detach().float()[rel_index.long()].permute(2, 0, 1).unsqueeze(0)  # (1, heads, n, n)
    if dense_bias is not None:
        dense = _dense_4d(dense_bias.detach().float())
        bias = dense if bias is None else bias + dense
    if bias is None:
        return _placeholder(q.dtype, q.device), (0, 0, 0), False
    n_pad = triton.cdiv(n, block) * block
    padded = torch.zeros((bias.shape[0], bias.shape[1], n_pad, n_pad), dtype=q.dtype, device=q.device)
    padded[:, :, :n, :n] = bias
    strides = tuple(0 if padded.shape[i] == 1 else padded.stride(i) for i in (0, 1)) + (n_pad,)
    return padded, strides, True


# Token offsets inside one (batch, head) slice are int32 in the kernels (fewer registers than int64
# pointer arithmetic on every tile); the batch and head offsets are int64.
_MAX_SLICE_OFFSET = 2**31 - 1


def _kernel_view(t: Tensor) -> Tensor:
    """``t`` as the kernels read it: the last dim contiguous, and a (batch, head) slice addressable
    with int32 offsets (a view whose token stride makes that overflow is copied)."""
    t = _last_dim_contiguous(t)
    if t.shape[2] and (t.shape[2] - 1) * t.stride(2) + t.shape[3] > _MAX_SLICE_OFFSET:
        t = t.contiguous()
    return t


def _strides(*tensors: Tensor) -> tuple:
    return tuple(s for t in tensors for s in t.stride()[:3])


def window_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, *, grid, size, shift=(0, 0), dilation=(1, 1), scale: float,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None, dense_bias: Optional[Tensor] = None,
    checked: bool = True,
) -> tuple[Tensor, Tensor]:
    """Fused windowed attention forward (arguments as `window_attention`).

    Args:
        checked: validate the inputs (False: the caller did, e.g. the custom op behind `window_attention`).

    Returns:
        ``(out [B, heads, H*W, Dv] in q's dtype, lse [B, heads, H*W] fp32)``.
    """
    if checked:
        window, scale = _validate(q, k, v, grid, size, shift, dilation, scale, rel_table, rel_index, dense_bias)
    else:
        window = _Window.of(grid, size, shift, dilation)
    _require_runtime(q.device)
    q, k, v = (_kernel_view(t) for t in (q, k, v))
    B, heads, tokens, D = q.shape
    Dv = v.shape[3]
    out = torch.empty((B, heads, tokens, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, tokens), dtype=torch.float32, device=q.device)
    if B * heads == 0:
        return out, lse
    cfg, blocks = window_plan(window.n, D, Dv, q.dtype)["_win_fwd"]
    bias, bias_strides, has_bias = _combined_bias(q, window, rel_table, rel_index, dense_bias, cfg.block_m)
    n = window.n
    _launch(_win_fwd, B * heads * window.num_windows * triton.cdiv(n, cfg.block_m),
            (q, k, v, out, lse, bias, *_strides(q, k, v, out), *bias_strides, heads, *window.args, D, Dv,
             scale * _LOG2E, 1.0 / scale),
            dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                 EVEN_M=n % cfg.block_m == 0, EVEN_N=n % cfg.block_n == 0, EVEN_D=(D, Dv) == blocks,
                 HAS_BIAS=has_bias, SHIFT=window.shifted, **_dot_flags(q.dtype)), cfg)
    return out, lse


def _batch_chunks(batch: int, heads: int, num_windows: int, slab_bytes: int) -> int:
    """Batch elements per program of the one-tile backward when it reduces dS: enough chunks for
    about `DS_TARGET_PROGRAMS` programs, at most `DS_BUFFER_MAX_BYTES` of buffer (``slab_bytes`` per
    (chunk, window, head)). Depends on the shapes only, so the reduction order is fixed."""
    per_chunk = heads * num_windows
    chunks = max(1, min(batch, -(-DS_TARGET_PROGRAMS // per_chunk), DS_BUFFER_MAX_BYTES // (per_chunk * slab_bytes)))
    return -(-batch // chunks)


def window_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, grid, size, shift=(0, 0),
    dilation=(1, 1), scale: float, rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
    dense_bias: Optional[Tensor] = None, need_rel_grad: Optional[bool] = None,
    need_dense_grad: Optional[bool] = None, checked: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Fused windowed attention backward.

    Args:
        do: ``[B, heads, H*W, Dv]``, the gradient of ``out``. q, k, v, out, lse: as the forward saw and
            returned them; the geometry, scale and biases as in the forward.
        need_rel_grad / need_dense_grad: compute ``d rel_table`` / ``d dense_bias``; default: whether
            the tensor requires grad.
        checked: validate the inputs (False: the caller did).

    Returns:
        ``(dq, dk, dv, d_rel_table [T, heads] or None, d_dense_bias (dense_bias's shape) or None)``,
        each in its input's dtype; the bias gradients are contiguous and bitwise reproducible.
    """
    if checked:
        window, scale = _validate(q, k, v, grid, size, shift, dilation, scale, rel_table, rel_index, dense_bias)
        _check_bwd_shapes(q, v, do, out, lse)
    else:
        window = _Window.of(grid, size, shift, dilation)
    _require_runtime(q.device)
    need_rel_grad, need_dense_grad = _bias_grads_wanted(rel_table, dense_bias, need_rel_grad, need_dense_grad)

    q, k, v, out = (_kernel_view(t) for t in (q, k, v, out))
    do = _kernel_view(do.to(q.dtype))
    lse = lse.contiguous()
    B, heads, tokens, D = q.shape
    Dv = v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * heads == 0:
        d_rel = rel_table.new_zeros(rel_table.shape) if need_rel_grad else None
        d_dense = dense_bias.new_zeros(dense_bias.shape) if need_dense_grad else None
        return dq, dk, dv, d_rel, d_dense

    plan = window_plan(window.n, D, Dv, q.dtype)
    block = max(cfg.block_m for kernel, (cfg, _) in plan.items() if kernel != "_win_fwd")
    bias, bias_strides, has_bias = _combined_bias(q, window, rel_table, rel_index, dense_bias, block)
    n, nw = window.n, window.num_windows
    store_ds = need_rel_grad or need_dense_grad
    qk_scale, inv_scale = scale * _LOG2E, 1.0 / scale
    common = dict(EVEN_D=(D, Dv) == plan["_win_fwd"][1], HAS_BIAS=has_bias, SHIFT=window.shifted,
                  **_dot_flags(q.dtype))

    ds_sum = None  # fp32 [nW, heads, n, n]: dS summed over the batch, in a fixed order
    if "_win_bwd_tile" in plan:
        cfg, blocks = plan["_win_bwd_tile"]
        slab = cfg.block_m * cfg.block_n
        per_program = _batch_chunks(B, heads, nw, slab * 4) if store_ds else 1
        chunks = -(-B // per_program)
        ds = (torch.empty((chunks, nw, heads, cfg.block_m, cfg.block_n), dtype=torch.float32, device=q.device)
              if store_ds else _placeholder(torch.float32, q.device))
        _launch(_win_bwd_tile, chunks * heads * nw,
                (q, k, v, out, do, lse, dq, dk, dv, ds, bias, *_strides(q, k, v, out, do, dq, dk, dv),
                 *bias_strides, B, per_program, heads, *window.args, D, Dv, qk_scale, inv_scale, scale),
                dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                     EVEN_N=n % cfg.block_n == 0, STORE_DS=store_ds, **common), cfg)
        if store_ds:
            ds_sum = ds[..., :n, :n].sum(dim=0)
    else:
        cfg, blocks = plan["_win_bwd_dq"]
        n_pad = triton.cdiv(n, cfg.block_m) * cfg.block_m
        delta = torch.empty((B, heads, tokens), dtype=torch.float32, device=q.device)
        per_batch = nw * heads * n_pad * n_pad * 4
        chunk = max(1, min(B, DS_BUFFER_MAX_BYTES // per_batch)) if store_ds else B
        ds = (torch.empty((chunk, nw, heads, n_pad, n_pad), dtype=torch.float32, device=q.device)
              if store_ds else _placeholder(torch.float32, q.device))
        evens = dict(EVEN_M=n % cfg.block_m == 0, EVEN_N=n % cfg.block_n == 0)
        for b0 in range(0, B, chunk):  # dQ (and dS) over batch chunks; partial sums added in order
            sl = slice(b0, min(B, b0 + chunk))
            nb = sl.stop - sl.start
            _launch(_win_bwd_dq, nb * heads * nw * triton.cdiv(n, cfg.block_m),
                    (q[sl], k[sl], v[sl], out[sl], do[sl], lse[sl], delta[sl], dq[sl], ds, bias,
                     *_strides(q, k, v, out, do, dq), *bias_strides, n_pad, heads, *window.args, D, Dv,
                     qk_scale, inv_scale, scale),
                    dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                         **evens, STORE_DS=store_ds, **common), cfg)
            if store_ds:
                part = ds[:nb, :, :, :n, :n].sum(dim=0)
                ds_sum = part if ds_sum is None else ds_sum + part
        cfg, blocks = plan["_win_bwd_dkdv"]
        _launch(_win_bwd_dkdv, B * heads * nw * triton.cdiv(n, cfg.block_n),
                (q, k, v, do, lse, delta, dk, dv, bias, *_strides(q, k, v, do, dk, dv), *bias_strides,
                 heads, *window.args, D, Dv, qk_scale, inv_scale, scale),
                dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                     **evens, **common), cfg)

    d_rel = d_dense = None
    if need_rel_grad:
        d_rel = _table_grad(ds_sum.sum(dim=0), rel_index, rel_table.shape[0]).to(rel_table.dtype)
    if need_dense_grad:
        shape4 = _dense_4d(dense_bias).shape
        dims = [i for i in range(4) if shape4[i] == 1]
        d_dense = ds_sum.sum(dim=dims, keepdim=True) if dims else ds_sum  # over the broadcast dims
        d_dense = d_dense.reshape(dense_bias.shape).to(dense_bias.dtype).contiguous()
    return dq, dk, dv, d_rel, d_dense


def window_not_supported_reasons(
    device, dtype: torch.dtype, head_dim: int, *, value_dim: Optional[int] = None, dropout_p: float = 0.0,
    scale: Optional[float] = None, grid=None, size=None, shift=(0, 0), dilation=(1, 1),
) -> list[str]:
    """Why the window kernels cannot serve calls of this kind, as sentences a user can act on, from
    what they declare alone (no tensor is read; mirrors ``attention.capability_reasons``). With
    ``grid`` and ``size`` the window geometry is checked too."""
    reasons = []
    ok, why = _runtime_available(torch.device(device))
    if not ok:
        reasons.append(why)
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not supported (supports torch.float32, torch.float16, torch.bfloat16)")
    widest = max(head_dim, value_dim or 0)
    if widest > MAX_HEAD_DIM:
        reasons.append(f"head_dim={widest} > {MAX_HEAD_DIM} (the kernel keeps a head row in registers)")
    if dropout_p > 0:
        reasons.append("attention dropout is not supported by the triton window kernels")
    if scale is not None and scale == 0:
        reasons.append("scale=0.0 is not supported (the kernels add the bias to the matmul as bias / scale)")
    if grid is not None and size is not None:
        reasons += _geometry_reasons(grid, size, shift, dilation)
    return reasons


# --------------------------------------------------------------------------------------------------
# torch.library ops (torch.compile traces through them) and autograd
# --------------------------------------------------------------------------------------------------
# The geometry travels as one int list: [H, W, wh, ww, sh, sw, dh, dw].

def _geometry_kwargs(geometry: Sequence[int]) -> dict:
    g = [int(x) for x in geometry]
    return dict(grid=(g[0], g[1]), size=(g[2], g[3]), shift=(g[4], g[5]), dilation=(g[6], g[7]))


@torch.library.custom_op("fastvit::window_attn_fwd", mutates_args=())
def _window_fwd_op(q: Tensor, k: Tensor, v: Tensor, geometry: list[int], scale: float, rel_table: Optional[Tensor],
                   rel_index: Optional[Tensor], dense_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return window_attention_fwd(q, k, v, **_geometry_kwargs(geometry), scale=scale, rel_table=rel_table,
                                rel_index=rel_index, dense_bias=dense_bias, checked=False)


@_window_fwd_op.register_fake
def _(q, k, v, geometry, scale, rel_table, rel_index, dense_bias):
    B, heads, tokens, _ = q.shape
    return q.new_empty((B, heads, tokens, v.shape[3])), q.new_empty((B, heads, tokens), dtype=torch.float32)


@torch.library.custom_op("fastvit::window_attn_bwd", mutates_args=())
def _window_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, geometry: list[int],
                   scale: float, rel_table: Optional[Tensor], rel_index: Optional[Tensor],
                   dense_bias: Optional[Tensor], need_rel_grad: bool,
                   need_dense_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As ``window_attention_bwd``; a gradient that is not wanted comes back as an empty 1-D tensor."""
    dq, dk, dv, d_rel, d_dense = window_attention_bwd(
        do, q, k, v, out, lse, **_geometry_kwargs(geometry), scale=scale, rel_table=rel_table,
        rel_index=rel_index, dense_bias=dense_bias, need_rel_grad=need_rel_grad,
        need_dense_grad=need_dense_grad, checked=False)
    return _op_grads(q, dq, dk, dv, d_rel, d_dense)


@_window_bwd_op.register_fake
def _(do, q, k, v, out, lse, geometry, scale, rel_table, rel_index, dense_bias, need_rel_grad, need_dense_grad):
    return _fake_grads(*(_kernel_view(t) for t in (q, k, v)), rel_table, dense_bias, need_rel_grad,
                       need_dense_grad)


def _op_setup_context(ctx, inputs, output) -> None:
    q, k, v, geometry, scale, rel_table, rel_index, dense_bias = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, rel_table, rel_index, dense_bias)
    ctx.geometry, ctx.scale = list(geometry), scale
    ctx.need_rel_grad = rel_table is not None and ctx.needs_input_grad[5]
    ctx.need_dense_grad = dense_bias is not None and ctx.needs_input_grad[7]


def _op_backward(ctx, d_out, _d_lse):
    """(dq, dk, dv, None, None, d_rel_table, None, d_dense_bias), in the op's argument order."""
    q, k, v, out, lse, rel_table, rel_index, dense_bias = ctx.saved_tensors
    dq, dk, dv, d_rel, d_dense = torch.ops.fastvit.window_attn_bwd(
        d_out, q, k, v, out, lse, ctx.geometry, ctx.scale, rel_table, rel_index, dense_bias,
        ctx.need_rel_grad, ctx.need_dense_grad)
    return (dq, dk, dv, None, None, d_rel if ctx.need_rel_grad else None, None,
            d_dense if ctx.need_dense_grad else None)


# The one autograd path: fastvit::window_attn_fwd differentiates through fastvit::window_attn_bwd.
_window_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, grid, size, shift=(0, 0), dilation=(1, 1), scale: Optional[float] = None,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None, dense_bias: Optional[Tensor] = None,
    validated: bool = False,
) -> Tensor:
    """Fused, differentiable attention inside (shifted or dilated) windows of a raster token grid
    (see the module docstring for the math and the limits).

    Args:
        q: ``[B, heads, H*W, D]``, tokens in raster order of the ``H x W`` grid. k: like q.
            v: ``[B, heads, H*W, Dv]``.
        grid: ``(H, W)``. size: ``(wh, ww)``, the window (``n = wh * ww`` tokens).
        shift: ``(sh, sw)``, ``0 <= shift < size``: Swin's cyclic shift (roll by ``-shift``), with the
            cross-wrap keys masked exactly.
        dilation: ``(dh, dw)``: windows of tokens ``dh`` rows / ``dw`` columns apart (CrossFormer long
            distance, MaxViT grid). Not together with a shift.
        scale: multiplies ``q . k``; defaults to ``D ** -0.5``. Non-zero.
        rel_table: ``[T, heads]``; with ``rel_index [n, n]`` (window-local positions, values in
            ``[0, T)``), ``bias[h, i, j] = rel_table[rel_index[i, j], h]``.
        dense_bias: broadcastable to ``[num_windows, heads, n, n]`` (2 to 4 dims), e.g. a dynamic
            position bias ``[heads, n, n]`` or a per-window mask ``[num_windows, 1, n, n]``.
        validated: the caller has validated the inputs (``fastvit.attention`` does, once per call);
            otherwise they are checked here, once, before the launchers (which trust them).

    Returns:
        ``out [B, heads, H*W, Dv]`` in q's dtype, raster order. Gradients flow to q, k, v,
        rel_table and dense_bias.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if validated:
        window = _Window.of(_pair(grid, "grid"), _pair(size, "size"), _pair(shift, "shift"),
                            _pair(dilation, "dilation"))
    else:
        window, scale = _validate(q, k, v, grid, size, shift, dilation, scale, rel_table, rel_index, dense_bias)
    out, _ = torch.ops.fastvit.window_attn_fwd(q, k, v, list(window), float(scale), rel_table, rel_index,
                                               dense_bias)
    return out


# --------------------------------------------------------------------------------------------------
# ahead-of-time compile specs (fastvit.kernels.aot compiles them with the attention family)
# --------------------------------------------------------------------------------------------------

# Model-named window shapes the default report compiles: (name, grid, size, shift, dilation, head dim,
# biased). Swin-T stage 1 with its shifted blocks, CrossFormer long distance / MaxViT grid (dilated),
# NesT's 14x14 blocks (multi-block: 196 tokens).
REPORT_SHAPES = (
    ("swin_t_stage1", (56, 56), (7, 7), (0, 0), (1, 1), 32, True),
    ("swin_t_stage1_shifted", (56, 56), (7, 7), (3, 3), (1, 1), 32, True),
    ("swinv2_t_w8_stage1_shifted", (64, 64), (8, 8), (4, 4), (1, 1), 32, True),  # n = 64: no padding
    ("maxvit_grid_stage1", (56, 56), (7, 7), (0, 0), (8, 8), 32, True),
    ("nest_t_level1", (56, 56), (14, 14), (0, 0), (1, 1), 32, False),
    ("nest_t_level1_biased", (56, 56), (14, 14), (0, 0), (1, 1), 32, True),
)
# With ``full``, also windows of the 16- and 32-tiles and a shifted multi-block window.
FULL_REPORT_SHAPES = (
    ("window_4x4", (16, 16), (4, 4), (0, 0), (1, 1), 32, True),
    ("window_4x4_shifted", (16, 16), (4, 4), (2, 2), (1, 1), 32, True),
    ("window_5x5", (20, 20), (5, 5), (0, 0), (1, 1), 32, True),
    ("window_5x5_shifted", (20, 20), (5, 5), (2, 2), (1, 1), 32, True),
    ("window_10x10_shifted", (20, 20), (10, 10), (5, 5), (1, 1), 32, True),
)


def _spec_divisible(fn, constexprs: dict) -> tuple:
    """The arguments a typical call declares divisible by 16 at run time (triton's specialisation):
    the pointers; every stride (q/k/v/out and gradients: multiples of a head dim of 16, 32, 64 ...;
    the bias and dS buffers: padded to the tile; a broadcast bias's window stride: 0); D and Dv;
    an unused shift (0). Not the grid (56), the window (7, 49), heads (3) or the batch."""
    import inspect

    names = []
    for name, p in inspect.signature(getattr(fn, "fn", fn)).parameters.items():
        if "constexpr" in str(p.annotation) or name in constexprs:
            continue
        if (name[0].isupper() or name.startswith("stride_") or name in ("D", "Dv")
                or (name in ("shift_h", "shift_w") and not constexprs.get("SHIFT"))):
            names.append(name)
    return tuple(names)


def _signature(fn, dtype: torch.dtype) -> dict:
    from .variants import kernel_signature  # variants imports attention only: no cycle

    return kernel_signature(fn, dtype)


def iter_compile_specs(*, full: bool = False, dtypes=None) -> Iterator[CompileSpec]:
    """The window variants for the ahead-of-time report: for each of the `REPORT_SHAPES` and dtype
    (default fp32 and bf16, bf16 standing for the 16-bit class as in ``variants.REPORT_DTYPES``), each
    kernel `window_plan` launches, with that shape's switches (bias, shift, dS stored when biased,
    the padded window's masks). ``full``: every head-block pair for each shape, fp16, and the
    backward of a frozen bias (no dS). Unit dilations are compiled as constants (triton specialises
    an int argument equal to 1), as they run."""
    if dtypes is None:
        dtypes = SUPPORTED_DTYPES if full else (torch.float32, torch.bfloat16)
    seen = set()
    shapes = REPORT_SHAPES + (FULL_REPORT_SHAPES if full else ())
    for dtype, (_model, grid, size, shift, dilation, d, biased) in itertools.product(dtypes, shapes):
        window = _Window.of(grid, size, shift, dilation)
        n = window.n
        for d_pair in (((b, b) for b in WINDOW_HEAD_BLOCKS) if full else ((d, d),)):
            for kernel, (cfg, blocks) in window_plan(n, *d_pair, dtype).items():
                fn = KERNELS[kernel]
                constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1],
                                  EVEN_D=True, HAS_BIAS=biased, SHIFT=window.shifted, FP32_IEEE=dtype == torch.float32,
                                  UPCAST_DOT=False, EVEN_N=n % cfg.block_n == 0)
                if kernel != "_win_bwd_tile":
                    constexprs["EVEN_M"] = n % cfg.block_m == 0
                signature = _signature(fn, dtype)
                if (window.dil_h, window.dil_w) == (1, 1):  # an int argument equal to 1 is a constant
                    constexprs.update(dil_h=1, dil_w=1)
                    signature.update(dil_h="constexpr", dil_w="constexpr")
                stores = [{}]
                if kernel in ("_win_bwd_tile", "_win_bwd_dq"):
                    stores = [dict(STORE_DS=x) for x in ((False, True) if full and biased else (biased,))]
                for store in stores:
                    variant = dict(constexprs, **store)
                    key = (kernel, cfg, dtype, tuple(sorted(variant.items())))
                    if key not in seen:
                        seen.add(key)
                        yield CompileSpec(kernel, cfg, signature, variant, divisible=_spec_divisible(fn, variant))


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------

def window_token_index(grid, size, shift=(0, 0), dilation=(1, 1), device=None) -> tuple[Tensor, Tensor]:
    """The raster token of each window position and its wrap region, in plain torch:
    ``(index [num_windows, n] int64, region [num_windows, n] int64)`` (region 0 everywhere without a
    shift). ``x[:, :, index]`` partitions ``[B, heads, H*W, D]`` into ``[B, heads, nW, n, D]``."""
    (H, W), (wh, ww), (sh, sw), (dh, dw) = (_pair(grid, "grid"), _pair(size, "size"), _pair(shift, "shift"),
                                            _pair(dilation, "dilation"))

    def axis(extent, win, sft, dil):
        win_idx = torch.arange(extent // win, device=device)
        pos = torch.arange(win, device=device)
        rolled = ((win_idx // dil) * win * dil + win_idx % dil)[:, None] + pos[None, :] * dil  # (windows, win)
        wrap = (rolled >= extent - sft) if sft > 0 else torch.zeros_like(rolled, dtype=torch.bool)
        return (rolled + sft) % extent, wrap.long()

    rows, wrap_r = axis(H, wh, sh, dh)
    cols, wrap_c = axis(W, ww, sw, dw)
    index = rows[:, None, :, None] * W + cols[None, :, None, :]  # (nWr, nWc, wh, ww)
    region = wrap_r[:, None, :, None] * 2 + wrap_c[None, :, None, :]
    nw = index.shape[0] * index.shape[1]
    return index.reshape(nw, wh * ww), region.reshape(nw, wh * ww)


def window_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, *, grid, size, shift=(0, 0), dilation=(1, 1), scale: Optional[float] = None,
    rel_table: Optional[Tensor] = None, rel_index: Optional[Tensor] = None, dense_bias: Optional[Tensor] = None,
) -> Tensor:
    """The same math in plain PyTorch (fp32, cast back to q's dtype): partition by an index
    permutation, dense attention per window with the biases and the exact ``-inf`` region mask,
    reverse by the inverse permutation. Differentiable in every float input. A row whose logits
    are all ``-inf`` gives 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, heads, tokens, _ = q.shape
    index, region = window_token_index(grid, size, shift, dilation, device=q.device)
    flat = index.reshape(-1)
    nw, n = index.shape

    def windows(x):  # (b, h, H*W, d) -> (b, nW, h, n, d)
        return x.float()[:, :, flat].reshape(B, heads, nw, n, -1).transpose(1, 2)

    s = windows(q) @ windows(k).transpose(-1, -2) * scale  # (b, nW, h, n, n)
    if rel_table is not None:
        s = s + rel_table.float()[rel_index.long()].permute(2, 0, 1)  # (n, n, h) -> (h, n, n)
    if dense_bias is not None:
        s = s + _dense_4d(dense_bias.float())  # broadcast over [nW, heads, n, n]
    s = s.masked_fill((region[:, :, None] != region[:, None, :])[:, None], float("-inf"))  # (nW, 1, n, n)
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = (p @ windows(v)).transpose(1, 2).reshape(B, heads, tokens, -1)  # window order
    inverse = torch.argsort(flat)
    return out[:, :, inverse].to(q.dtype)
