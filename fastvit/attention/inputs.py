"""The inputs of one attention call, validated once, and what a call returns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .bias import ADDITIVE, DenseBias, HeadMix, KeyBias, KeyPaddingMask, RelPosBias
from .packed import Packed, validate_packed
from .window import Window

__all__ = ["AttnInputs", "AttnOutput", "validate_inputs", "DTYPES", "dtype_name"]

# The short dtype names used everywhere a dtype is printed or parsed (CLI flags, case ids, results).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {**{v: k for k, v in DTYPES.items()}, torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` / ``fp64``; other dtypes by torch's name (``int32``)."""
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


class AttnOutput(NamedTuple):
    """Returned by ``attend()`` when extra outputs are requested.

    Attributes:
        out: ``[B, H, Nq, Dv]``.
        probs: ``[B, H, Nq, Nk]`` post-softmax probabilities (before dropout and head mixing), or None.
        cls_probs: ``[B, H, Nk]`` probabilities of query 0 over all keys, or None.
    """

    out: Tensor
    probs: Optional[Tensor] = None
    cls_probs: Optional[Tensor] = None


@dataclass(frozen=True)
class AttnInputs:
    """Everything a backend needs to decide whether it can serve a call, and to serve it."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    bias: tuple = ()
    dropout_p: float = 0.0
    return_probs: bool = False
    return_cls_probs: bool = False
    head_mix: Optional[HeadMix] = None
    window: Optional[Window] = None
    packed: Optional[Packed] = None

    @classmethod
    def of_call(cls, q: Tensor, k: Tensor, v: Tensor, bias: tuple, head_mix: Optional[HeadMix],
                static: dict) -> AttnInputs:
        """The inputs of a call whose signature a plan has validated (``plan.py``): the call's tensors and
        descriptors plus the plan's ``static`` fields (``static_fields()``), without re-validating and
        without the frozen dataclass's field-by-field ``__init__`` (~1 us)."""
        inp = object.__new__(cls)
        fields = inp.__dict__
        fields.update(static)
        fields["q"], fields["k"], fields["v"], fields["bias"], fields["head_mix"] = q, k, v, bias, head_mix
        return inp

    def static_fields(self) -> dict:
        """The fields that a call's signature fixes (no tensors: a plan keeps them)."""
        return {"scale": self.scale, "dropout_p": self.dropout_p, "return_probs": self.return_probs,
                "return_cls_probs": self.return_cls_probs, "window": self.window, "packed": self.packed}

    # Convenience views used by backends' capability checks.
    @property
    def device_type(self) -> str:
        return self.q.device.type

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    @property
    def nq(self) -> int:
        return self.q.shape[-2]

    @property
    def nk(self) -> int:
        return self.k.shape[-2]

    def of_type(self, kind) -> list:
        return [b for b in self.bias if isinstance(b, kind)]

    @property
    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [self.q, self.k, self.v]
        for b in self.bias:
            tensors.append(b.table if isinstance(b, RelPosBias) else getattr(b, "tensor", None))
        return any(t is not None and t.requires_grad for t in tensors)

    @property
    def bias_needs_grad(self) -> bool:
        """A trainable bias tensor (relative table or dense bias) will receive a gradient."""
        return torch.is_grad_enabled() and any(
            (b.table if isinstance(b, RelPosBias) else b.tensor).requires_grad
            for b in self.bias if isinstance(b, (RelPosBias, *ADDITIVE)))

    def describe(self) -> str:
        """A short readable id such as ``cpu-fp32-B2-H6-Nq197-Nk197-D64-relpos``."""
        dt = dtype_name(self.dtype)
        b, h = self.q.shape[0], self.q.shape[1]
        parts = [self.device_type, dt, f"B{b}", f"H{h}", f"Nq{self.nq}", f"Nk{self.nk}", f"D{self.head_dim}"]
        if self.value_dim != self.head_dim:
            parts.append(f"Dv{self.value_dim}")
        names = {RelPosBias: "relpos", DenseBias: "dense", KeyBias: "keybias", KeyPaddingMask: "padding"}
        parts += [names[type(x)] for x in self.bias]
        if self.head_mix is not None:
            parts.append("headmix")
        if self.window is not None:
            parts.append(self.window.describe())
        if self.packed is not None:
            parts.append(self.packed.describe())
        return "-".join(parts)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def validate_inputs(inp: AttnInputs) -> None:
    """Raise ``ValueError`` naming the offending shapes / values; never fail deep inside a backend."""
    q, k, v = inp.q, inp.k, inp.v
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {_shape(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"batch and head dims must match: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} ([B, H, N, D] layout)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: q {_shape(q)}, k {_shape(k)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v sequence lengths differ: k {_shape(k)}, v {_shape(v)}")
    if not 0.0 <= inp.dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {inp.dropout_p}")
    if not math.isfinite(inp.scale):  # backends disagree on a NaN / inf scale (SDPA gives zeros on the CPU)
        raise ValueError(f"scale must be finite, got {inp.scale}")

    B, H, Nq, _ = q.shape
    Nk = k.shape[-2]
    if inp.packed is not None:
        validate_packed(inp)
        _validate_head_mix(inp, H)
        return
    if inp.window is not None:
        _validate_window(inp)
        return
    for b in inp.bias:
        if isinstance(b, RelPosBias):
            if b.table.shape[1] != H:
                raise ValueError(f"RelPosBias table has {b.table.shape[1]} heads, q has {H} (table {_shape(b.table)})")
            if _shape(b.index) != (Nq, Nk):
                raise ValueError(f"RelPosBias index has shape {_shape(b.index)}, expected (Nq, Nk) = {(Nq, Nk)}")
            _check_device(b.table, q, "RelPosBias table")
            _check_device(b.index, q, "RelPosBias index")
        elif isinstance(b, ADDITIVE):
            t, name = b.materialize(), type(b).__name__
            target = (B, H, Nq, Nk)
            if any(s not in (1, want) for s, want in zip(t.shape, target)):
                layout = "[B, Nk] or [B, H, Nk]" if isinstance(b, KeyBias) else "[B, H, Nq, Nk]"
                raise ValueError(f"{name} of shape {_shape(b.tensor)} does not broadcast to {layout} with "
                                 f"[B, H, Nq, Nk] = {target}")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {t.dtype}")
            _check_device(t, q, name)
        elif isinstance(b, KeyPaddingMask):
            if _shape(b.mask) != (B, Nk):
                raise ValueError(f"KeyPaddingMask has shape {_shape(b.mask)}, expected [B, Nk] = {(B, Nk)}")
            _check_device(b.mask, q, "KeyPaddingMask")
    _validate_head_mix(inp, H)


def _validate_head_mix(inp: AttnInputs, H: int) -> None:
    if inp.head_mix is not None:
        for name in ("pre", "post", "post_bias"):
            w = getattr(inp.head_mix, name)
            if w is not None and w.shape[0] != H:
                raise ValueError(f"HeadMix.{name} is {_shape(w)} but q has {H} heads")


def _validate_window(inp: AttnInputs) -> None:
    """A windowed call: raster tokens of the window's grid, biases over window-local positions."""
    win, q, k = inp.window, inp.q, inp.k
    if not isinstance(win, Window):
        raise ValueError(f"window must be a fastvit.attention.Window, got {type(win).__name__}")
    H, N, n = q.shape[1], win.seq_len, win.tokens
    if q.shape[-2] != N or k.shape[-2] != N:
        raise ValueError(f"a windowed call needs Nq = Nk = H*W = {N} for grid {win.grid}, got q {_shape(q)}, "
                         f"k {_shape(k)}")
    unsupported = [name for name, asked in (("return_probs", inp.return_probs),
                                            ("return_cls_probs", inp.return_cls_probs),
                                            ("head_mix", inp.head_mix is not None)) if asked]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} cannot be combined with a window")
    for b in inp.bias:
        if isinstance(b, KeyPaddingMask):
            raise ValueError("KeyPaddingMask cannot be combined with a window: pad the grid to whole windows "
                             "and let the padded tokens attend (as Swin and Twins do)")
        if isinstance(b, KeyBias):
            raise ValueError("KeyBias cannot be combined with a window (a window's biases are per window-local "
                             "position): pass the per-key term as a DenseBias over [num_windows, heads, n, n]")
        if isinstance(b, RelPosBias):
            if b.table.shape[1] != H:
                raise ValueError(f"RelPosBias table has {b.table.shape[1]} heads, q has {H} (table {_shape(b.table)})")
            if _shape(b.index) != (n, n):
                raise ValueError(f"RelPosBias index has shape {_shape(b.index)}; with a window it indexes window-local "
                                 f"positions: expected (n, n) = {(n, n)} for window size {win.size}")
            _check_device(b.table, q, "RelPosBias table")
            _check_device(b.index, q, "RelPosBias index")
        elif isinstance(b, DenseBias):
            t = b.materialize()
            target = (win.num_windows, H, n, n)
            if b.tensor.dim() < 2 or any(s not in (1, want) for s, want in zip(t.shape, target)):
                raise ValueError(f"DenseBias of shape {_shape(b.tensor)} does not broadcast to "
                                 f"[num_windows, heads, n, n] = {target} (a windowed bias is per window, "
                                 f"not per image)")
            if not t.is_floating_point():
                raise ValueError(f"DenseBias must be floating point, got {t.dtype}")
            _check_device(t, q, "DenseBias")


def _check_device(t: Tensor, q: Tensor, what: str) -> None:
    if t.device != q.device:
        raise ValueError(f"{what} is on {t.device} but q is on {q.device}")
