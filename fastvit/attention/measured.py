"""Measured backend orders for CUDA auto dispatch.

``fastvit tune --device cuda`` times triton, flex, xformers and sdpa at every model-named shape and
stores the fastest-first order per shape bucket in the ``"dispatch"`` section of the device's tuned
table (``kernels/tuned/<device>.json``, next to the kernel configs)::

    "dispatch": {"bf16|relpos|q64|k64|d32x64": ["triton", "sdpa", "flex"], ...}

Auto dispatch on CUDA tries a bucket's measured order first, then the fixed default order for the
backends the measurement did not cover. Without a table (or a bucket) the default order stands.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

from .bias import DenseBias, KeyPaddingMask, RelPosBias
from .inputs import AttnInputs, dtype_name

__all__ = ["order_key", "measured_order", "ordered"]

_BIAS_NAMES = ((RelPosBias, "relpos"), (DenseBias, "dense"), (KeyPaddingMask, "padding"))
_CACHE: dict = {}


def _bucket(n: int) -> int:
    """Powers of two from 16: calls of similar length share a measurement."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def order_key(dtype: torch.dtype, bias_kinds: tuple, nq: int, nk: int, head_dim: int, value_dim: int) -> str:
    """The bucket of a call: dtype, bias kinds, query / key length buckets, head widths."""
    bias = "+".join(bias_kinds) or "none"
    return f"{dtype_name(dtype)}|{bias}|q{_bucket(nq)}|k{_bucket(nk)}|d{head_dim}x{value_dim}"


def key_of(inp: AttnInputs) -> str:
    kinds = tuple(name for kind, name in _BIAS_NAMES if inp.of_type(kind))
    extra = ("cls_probs",) if inp.return_cls_probs else ()
    return order_key(inp.dtype, kinds + extra, inp.nq, inp.nk, inp.head_dim, inp.value_dim)


def _table_path(device: torch.device) -> Optional[str]:
    try:
        from fastvit.kernels.attention import tuned_path
    except Exception:  # noqa: BLE001 - no kernels package: nothing measured either
        return None
    return tuned_path(device)


def measured_order(inp: AttnInputs) -> Optional[tuple]:
    """The measured fastest-first order for this call's bucket on its CUDA device, or None."""
    path = _table_path(inp.q.device)
    if path is None:
        return None
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    cached = _CACHE.get(path)
    if cached is None or cached[0] != mtime:
        try:
            with open(path, encoding="utf-8") as f:
                section = json.load(f).get("dispatch") or {}
            if not isinstance(section, dict):
                raise ValueError("\"dispatch\" is not an object")
        except (OSError, ValueError) as e:
            warnings.warn(f"tuned table {path}: {e}; using the default CUDA order", RuntimeWarning, stacklevel=3)
            section = {}
        cached = (mtime, {k: tuple(v) for k, v in section.items() if isinstance(v, list)})
        _CACHE[path] = cached
    return cached[1].get(key_of(inp))


def ordered(inp: AttnInputs, default: tuple) -> tuple:
    """``default`` with this bucket's measured order (if any) moved to the front."""
    measured = measured_order(inp)
    if not measured:
        return default
    front = tuple(name for name in measured if name in default)
    return front + tuple(name for name in default if name not in front)
