"""Bias descriptors: what a model says about the additive terms of its attention logits.

A model never builds a `[B, H, Nq, Nk]` bias itself; it hands `attend()` a descriptor and each
backend decides how to apply it (gathered inside a fused kernel, expanded into an SDPA mask, or
materialised by the reference). Descriptors compose: pass a tuple of them.

`HeadMix` is not a bias but belongs to the same family of declared inputs: talking heads (CaiT) and
re-attention (DeepViT) mix the attention maps across heads, which needs the probabilities
materialised, so only backends that materialise them can serve it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RelPosBias", "DenseBias", "KeyBias", "KeyPaddingMask", "HeadMix", "BiasLike", "ADDITIVE", "normalize_bias",
           "additive_mask"]


# Validating a relative-position index against its table needs a device->host sync. Models build the
# index once (a buffer), so the result is cached per index tensor and its in-place version counter.
# Keyed by id() with a weak reference (tensors are not hashable by value); entries die with the tensor.
_INDEX_RANGE_CACHE: dict = {}


def _index_range(index: Tensor) -> tuple[int, int]:
    key = id(index)
    cached = _INDEX_RANGE_CACHE.get(key)  # only tensors with version counters are ever kept (below)
    if cached is not None and cached[0]() is index and cached[1] == (index._version, index.data_ptr()):
        return cached[2], cached[3]
    lo, hi = (int(v) for v in torch.aminmax(index))
    if index.is_inference():  # no version counter to validate a cached entry with
        return lo, hi
    ref = weakref.ref(index, lambda _, key=key: _INDEX_RANGE_CACHE.pop(key, None))
    _INDEX_RANGE_CACHE[key] = (ref, (index._version, index.data_ptr()), lo, hi)
    return lo, hi


# The dense bias of a (table, index) pair that takes no gradient (eval, inference), kept per pair until the
# table or index changes or dies: a model's forward builds RelPosBias(table, index) every call, and the
# gather would otherwise be redone every call (timm's LeViT keeps such a cache itself, per device, until
# train()). A change is seen through the version counter (every in-place op: optimiser steps, copy_,
# load_state_dict) and the data pointer (a rebound .data: model.to(), model.double(), MoCo-style momentum
# updates). A write into ``t.data`` in place (``t.data.mul_(m)``) bumps no counter and is not seen, as
# autograd does not see it either: call ``fastvit.attention.clear_plans()`` after such writes.
_MATERIALIZED: dict = {}
_INDEX_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.uint8))


def _state(table: Tensor, index: Tensor) -> tuple:
    return table._version, index._version, table.data_ptr(), index.data_ptr()


def _recording() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.compiler.is_exporting()


def _cached_dense(table: Tensor, index: Tensor, build: Callable[[], Tensor]) -> Tensor:
    key = (id(table), id(index))
    hit = _MATERIALIZED.get(key)  # only tensors with version counters are ever kept (below)
    if hit is not None and hit[0]() is table and hit[1]() is index and hit[2] == _state(table, index) \
            and (not hit[4] or torch.is_inference_mode_enabled()):  # an inference tensor serves inference only
        return hit[3]
    if table.is_inference() or index.is_inference():  # no version counters to notice an in-place change
        return build()
    dense = build()
    if dense.is_cuda and torch.cuda.is_current_stream_capturing():
        return dense  # a CUDA graph's memory is freed with the graph: kept by the graph, not here
    drop = lambda _, key=key: _MATERIALIZED.pop(key, None)  # noqa: E731 - the weakref callback
    _MATERIALIZED[key] = (weakref.ref(table, drop), weakref.ref(index, drop), _state(table, index), dense,
                          dense.is_inference())
    return dense


def clear_cached_biases() -> None:
    """Forget every cached dense bias and index range (``clear_plans()`` calls this)."""
    _MATERIALIZED.clear()
    _INDEX_RANGE_CACHE.clear()


@dataclass(frozen=True)
class RelPosBias:
    """Relative position bias gathered from a table: ``bias[h, i, j] = table[index[i, j], h]``.

    Args:
        table: ``[T, H]`` float, usually trainable (an ``nn.Embedding`` weight or a Swin-style table).
        index: ``[Nq, Nk]`` integer tensor with values in ``[0, T)``.
    """

    table: Tensor
    index: Tensor

    def __post_init__(self):
        if self.table.dim() != 2:
            raise ValueError(f"RelPosBias table must be [T, H], got shape {tuple(self.table.shape)}")
        if self.index.dim() != 2:
            raise ValueError(f"RelPosBias index must be [Nq, Nk], got shape {tuple(self.index.shape)}")
        if self.index.dtype not in _INDEX_DTYPES:
            raise ValueError(f"RelPosBias index must be an integer tensor, got {self.index.dtype}")
        # The range check reads the index on the host; under torch.compile it would break the graph,
        # and the compiled model was checked by its eager runs.
        if self.index.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = _index_range(self.index)
            if lo < 0 or hi >= self.table.shape[0]:
                raise ValueError(
                    f"RelPosBias index values span [{lo}, {hi}] but the table has {self.table.shape[0]} rows "
                    f"(valid range [0, {self.table.shape[0] - 1}])"
                )

    @property
    def heads(self) -> int:
        return self.table.shape[1]

    def materialize(self) -> Tensor:
        """The bias as a dense ``[1, H, Nq, Nk]`` tensor (reference and SDPA paths only). Without a
        gradient to record it is computed once per (table, index) and reused until either changes: treat
        it as read-only."""
        # A graph records the gather (jit.trace, which the TorchScript ONNX exporter uses; compile and
        # export). fx symbolic tracing never gets here: its proxies fail __post_init__'s checks first.
        if torch.is_grad_enabled() and self.table.requires_grad or _recording():
            return self._gather()
        return _cached_dense(self.table, self.index, self._gather)

    def _gather(self) -> Tensor:
        # table[index] is (Nq, Nk, H); heads go first.
        # F.embedding is the gather vit-pytorch uses, ~2x faster than advanced indexing on CPU.
        # A strided table (timm's LeViT and MaxViT keep [H, T] and pass its transpose) is made contiguous
        # first: the gather reads whole rows, ~9-16x slower from a transposed view (2.2 ms vs 0.14 ms at
        # LeViT-256's stage 1 on the CPU); the copy is T * H elements.
        return F.embedding(self.index.long(), self.table.contiguous()).permute(2, 0, 1).unsqueeze(0)


@dataclass(frozen=True)
class DenseBias:
    """An additive bias broadcastable to ``[B, H, Nq, Nk]`` (e.g. CrossFormer's dynamic position bias).

    Differentiable: gradients flow into ``tensor`` if it requires them.
    """

    tensor: Tensor

    def __post_init__(self):
        if self.tensor.dim() > 4:
            raise ValueError(f"DenseBias must have at most 4 dims [B, H, Nq, Nk], got {tuple(self.tensor.shape)}")

    def materialize(self) -> Tensor:
        t = self.tensor
        while t.dim() < 4:
            t = t.unsqueeze(0)
        return t


@dataclass(frozen=True)
class KeyBias:
    """A per-key additive bias: ``tensor[b, j]`` (or ``tensor[b, h, j]``) is added to every query's logit
    of key ``j``. Token merging's proportional attention is one: ``KeyBias(log(size))`` makes a merged
    token count as the patches it stands for.

    Args:
        tensor: ``[B, Nk]`` or ``[B, H, Nk]`` float (B and H may be 1: broadcast). Differentiable.
    """

    tensor: Tensor

    def __post_init__(self):
        if self.tensor.dim() not in (2, 3):
            raise ValueError(f"KeyBias must be [B, Nk] or [B, H, Nk], got shape {tuple(self.tensor.shape)}")

    def materialize(self) -> Tensor:
        """The bias as ``[B, 1|H, 1, Nk]``: a dense bias broadcast over the queries (and heads)."""
        t = self.tensor
        return t[:, None, None, :] if t.dim() == 2 else t[:, :, None, :]


# The descriptors that add a tensor to the logits, each with ``materialize()`` broadcastable to [B, H, Nq, Nk].
ADDITIVE = (DenseBias, KeyBias)


@dataclass(frozen=True)
class KeyPaddingMask:
    """Which keys may be attended: ``mask [B, Nk]`` bool, True = attend.

    A query row with no valid key produces a zero output (never NaN).
    """

    mask: Tensor

    def __post_init__(self):
        if self.mask.dim() != 2:
            raise ValueError(f"KeyPaddingMask must be [B, Nk], got shape {tuple(self.mask.shape)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"KeyPaddingMask must be a bool tensor (True = attend), got {self.mask.dtype}")

    def materialize(self) -> Tensor:
        """The mask as ``[B, 1, 1, Nk]`` bool."""
        return self.mask[:, None, None, :]


@dataclass(frozen=True)
class HeadMix:
    """Mixing of attention maps across heads (talking heads, re-attention).

    The logits and probabilities flow as
    ``logits (+bias) -> pre -> softmax -> dropout -> post -> post_norm -> @ v``, where ``pre`` and
    ``post`` are ``[H, H]`` matrices applied as ``einsum('bhij,hg->bgij')``, ``post_bias`` is an
    ``[H]`` vector added to every mixed probability of head ``g`` right after ``post`` (CaiT's talking
    heads are ``Linear(H, H)`` layers with a bias; a pre-softmax bias cancels in the softmax and needs
    no term), and ``post_norm`` is a module normalising over the head axis (DeepViT's LayerNorm over
    heads), given ``(b, i, j, h)``.
    """

    pre: Optional[Tensor] = None
    post: Optional[Tensor] = None
    post_norm: Optional[Callable[[Tensor], Tensor]] = None
    post_bias: Optional[Tensor] = None

    def __post_init__(self):
        for name in ("pre", "post"):
            w = getattr(self, name)
            if w is not None and (w.dim() != 2 or w.shape[0] != w.shape[1]):
                raise ValueError(f"HeadMix.{name} must be a square [H, H] matrix, got {tuple(w.shape)}")
        if self.post_bias is not None and self.post_bias.dim() != 1:
            raise ValueError(f"HeadMix.post_bias must be an [H] vector, got {tuple(self.post_bias.shape)}")


BiasLike = Union[RelPosBias, DenseBias, KeyBias, KeyPaddingMask]


def normalize_bias(bias) -> tuple:
    """Turn ``None``, one descriptor or a sequence of descriptors into a tuple of descriptors."""
    if bias is None:
        return ()
    if isinstance(bias, (RelPosBias, DenseBias, KeyBias, KeyPaddingMask)):
        return (bias,)
    if isinstance(bias, (tuple, list)):
        out = []
        for b in bias:
            out.extend(normalize_bias(b))
        return tuple(out)
    if isinstance(bias, Tensor):
        raise ValueError(
            "attend() takes bias descriptors, not raw tensors: wrap an additive tensor as DenseBias(t), "
            "a table lookup as RelPosBias(table, index), a per-key term as KeyBias(t), a padding mask as "
            "KeyPaddingMask(mask)"
        )
    raise ValueError(f"unknown bias descriptor {type(bias).__name__}")


def additive_mask(bias: tuple, dtype: torch.dtype, shape: tuple) -> tuple:
    """The descriptors as ONE additive float mask, for backends that take no descriptors (SDPA, xformers).

    Key padding becomes a large negative number rather than ``-inf``, so a row without valid keys
    does not turn into NaN; the caller zeroes that row's output (``valid.any(-1)``).

    Returns:
        ``(mask expanded to shape [B, H, Nq, Nk] or None, valid [B, 1, 1, Nk] bool or None)``.
    """
    mask = valid = None
    for b in bias:
        if isinstance(b, (RelPosBias, DenseBias, KeyBias)):
            t = b.materialize().to(dtype)
            mask = t if mask is None else mask + t
        elif isinstance(b, KeyPaddingMask):
            valid = b.materialize() if valid is None else valid & b.materialize()
    if valid is not None:
        neg = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
        neg.masked_fill_(~valid, torch.finfo(dtype).min / 2)
        mask = neg if mask is None else mask + neg
    return (None if mask is None else mask.expand(*shape)), valid
