"""Plans: what ``attend()`` decides once per call signature, reused by every later call with it.

A ViT-B attention call on a GPU runs in 10-30 us at batch 1-8, so the host path is the call's cost
there. The first call with a given *signature* validates its inputs, chooses the backend and asks it
for a runner (``Backend.runner``: a function of the call's tensors with everything derivable from the
signature already worked out, e.g. which inputs need a contiguous copy). Later calls with the same
signature look the plan up and run it.

The signature (``signature()``) holds everything validation and selection read:

- q, k, v: shape, strides, dtype, device, and (with grad mode on) ``requires_grad``;
- each descriptor: its kind and its tensors' shapes, strides, dtypes, devices and ``requires_grad``
  (a ``RelPosBias`` index's values are checked when the descriptor is built, on every call: the
  check is cached per index tensor and its version, see ``bias.py``); the head mix's tensors;
- the window geometry, the packed layout (its lengths), ``scale``, ``dropout_p``, the extra outputs
  asked for;
- grad mode, ``torch.are_deterministic_algorithms_enabled()``;
- the backend selection in force (``backend=``, ``use_backend``, ``set_backend``,
  ``FASTVIT_ATTN_BACKEND``: each a different key, so changing one never reuses another's plan);
- the generation of the tuned tables (``measured.generation()``: bumped when ``fastvit tune`` writes
  a table or ``fastvit.attention.measured.reload_tuned()`` is called).

A call whose signature cannot be formed cheaply (an argument of an unexpected type, a tensor-valued
scale) takes the full path every time, so its error message is the usual one. Refusals are never
cached: a call no backend can serve raises from the full path each time. ``register_backend`` and
``clear_plans()`` drop every plan. While torch.compile or torch.export trace a model the cache is
bypassed (the full path is what gets traced), and only plain tensors have signatures (torch.fx proxies,
fake tensors and other tensor subclasses take the full path), so it is invisible to graphs.

The cache holds at most ``MAX_PLANS`` plans, least recently used first out; it is safe to use from
several threads (lookups are single dict operations, inserts take a lock). Plans hold no tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .bias import DenseBias, HeadMix, KeyBias, KeyPaddingMask, RelPosBias, clear_cached_biases
from .measured import _GENERATION
from .packed import Packed

__all__ = ["Plan", "MAX_PLANS", "signature", "lookup", "store", "clear_plans", "plan_info"]

MAX_PLANS = 1024


class Plan(NamedTuple):
    """A backend and its runner ``run(q, k, v, bias, head_mix)``, which returns what ``attend`` does."""

    backend: type
    run: Callable


_plans: OrderedDict = OrderedDict()
_lock = threading.Lock()
_stats = {"built": 0}

_DESCRIPTORS = (RelPosBias, DenseBias, KeyBias, KeyPaddingMask)
_NUMBER = (float, int)


def _bias_signature(bias, grad: bool):
    """The static part of ``bias`` (a descriptor, or a tuple / list of them), or None if it has none."""
    kind = bias.__class__
    if kind is RelPosBias:
        t, i = bias.table, bias.index
        return kind, t.shape, t.stride(), t.dtype, t.device, grad and t.requires_grad, i.shape, i.dtype, i.device
    if kind is DenseBias or kind is KeyBias:
        t = bias.tensor
        return kind, t.shape, t.stride(), t.dtype, t.device, grad and t.requires_grad
    if kind is KeyPaddingMask:
        return kind, bias.mask.shape, bias.mask.device
    if kind is tuple or kind is list:
        parts = tuple(_bias_signature(b, grad) for b in bias)
        return None if None in parts else parts
    return None


def _tensor_signature(t, grad: bool):
    return None if t is None else (t.shape, t.dtype, t.device, grad and t.requires_grad)


def _head_mix_signature(mix, grad: bool):
    if mix.__class__ is not HeadMix:
        return None
    return (_tensor_signature(mix.pre, grad), _tensor_signature(mix.post, grad),
            _tensor_signature(mix.post_bias, grad), mix.post_norm is not None)


def signature(q, k, v, scale, bias, dropout_p, return_probs, return_cls_probs, head_mix, window,
              selection, packed=None) -> Optional[tuple]:
    """The call's signature (see the module docstring), or None when it takes the full path."""
    if scale is not None and (scale.__class__ not in _NUMBER or scale != scale) or dropout_p.__class__ not in _NUMBER:
        return None
    # Plain tensors only: torch.fx proxies, fake tensors and other subclasses take the full path.
    if q.__class__ is not Tensor or k.__class__ is not Tensor or v.__class__ is not Tensor:
        return None
    # q, k, v of different dtypes or devices are always an error: the full path says which.
    dtype, device = q.dtype, q.device
    if k.dtype is not dtype or v.dtype is not dtype or k.device != device or v.device != device:
        return None
    grad = torch.is_grad_enabled()
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), dtype, device,
           grad and (q.requires_grad, k.requires_grad, v.requires_grad), scale, dropout_p, return_probs,
           return_cls_probs, window, selection, _GENERATION[0], torch.are_deterministic_algorithms_enabled())
    if bias is not None:
        part = _bias_signature(bias, grad)
        if part is None:
            return None
        key += (part,)
    if head_mix is not None:
        part = _head_mix_signature(head_mix, grad)
        if part is None:
            return None
        key += (part,)
    if packed is not None:
        if packed.__class__ is not Packed:
            return None
        key += (packed,)  # its lengths (hashed once, when it was built)
    return key


def lookup(key: tuple) -> Optional[Plan]:
    """The plan of ``key``, marked as the most recently used; None when there is none yet."""
    plan = _plans.get(key)
    if plan is not None:
        try:
            _plans.move_to_end(key)
        except KeyError:  # evicted by another thread in between: still valid for this call
            pass
    return plan


def store(key: tuple, plan: Plan) -> Plan:
    """Keep ``plan`` for ``key`` (the least recently used plan goes when the cache is full)."""
    with _lock:
        _plans[key] = plan
        _stats["built"] += 1
        while len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
    return plan


def clear_plans() -> None:
    """Drop every cached plan (the next call of each signature validates and chooses again) and every
    cached dense bias and index range (``bias.clear_cached_biases``)."""
    with _lock:
        _plans.clear()
        _stats["built"] = 0
    clear_cached_biases()


def plan_info() -> dict:
    """``{"plans": cached now, "built": plans built since the last clear_plans(), "max": MAX_PLANS}``."""
    return {"plans": len(_plans), "built": _stats["built"], "max": MAX_PLANS}
