"""Measured backend orders for CUDA auto dispatch.

``fastvit tune --device cuda`` times triton, flex, xformers and sdpa at every model-named shape and
stores the fastest-first order per shape bucket in the ``"dispatch"`` section of the device's tuned
table (``kernels/tuned/<device>.json``, next to the kernel configs)::

    "dispatch": {"bf16|relpos|q64|k64|d32x64": ["triton", "sdpa", "flex"], ...}

Auto dispatch on CUDA tries a bucket's measured order first, then the fixed default order for the
backends the measurement did not cover. Without a table (or a bucket) the default order stands.

The table is read once per process and device (no file system access per call); ``reload_tuned()``
reads it again, and ``fastvit tune`` calls it after writing one. Each reload bumps ``generation()``,
which is part of every attention plan's signature, so no plan chosen from the old table is reused.
"""

from __future__ import annotations

import json
import warnings
from typing import Optional

import torch

from .bias import ADDITIVE, KeyPaddingMask, RelPosBias
from .inputs import AttnInputs, dtype_name

__all__ = ["order_key", "measured_order", "ordered", "generation", "reload_tuned"]

_BIAS_NAMES = ((RelPosBias, "relpos"), (ADDITIVE, "dense"), (KeyPaddingMask, "padding"))  # KeyBias runs as dense
_CACHE: dict = {}  # device -> {bucket: order}
_GENERATION = [0]


def generation() -> int:
    """How many times the tuned tables were reloaded in this process."""
    return _GENERATION[0]


def reload_tuned() -> None:
    """Forget the tuned tables read so far (dispatch orders here, kernel configs in ``fastvit.kernels``):
    the next call reads them again."""
    _CACHE.clear()
    try:
        from fastvit.kernels.attention import reload_tuned as reload_kernel_configs
    except Exception:  # noqa: BLE001 - no kernels package: no configs to forget
        pass
    else:
        reload_kernel_configs()
    _GENERATION[0] += 1


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


def _read_orders(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            section = json.load(f).get("dispatch") or {}
        if not isinstance(section, dict):
            raise ValueError("\"dispatch\" is not an object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(f"tuned table {path}: {e}; using the default CUDA order", RuntimeWarning, stacklevel=4)
        return {}
    return {k: tuple(v) for k, v in section.items() if isinstance(v, list)}


def measured_order(inp: AttnInputs) -> Optional[tuple]:
    """The measured fastest-first order for this call's bucket on its CUDA device, or None."""
    device = inp.q.device
    orders = _CACHE.get(device)
    if orders is None:
        path = _table_path(device)
        orders = _CACHE[device] = {} if path is None else _read_orders(path)
    return orders.get(key_of(inp))


def ordered(inp: AttnInputs, default: tuple) -> tuple:
    """``default`` with this bucket's measured order (if any) moved to the front."""
    measured = measured_order(inp)
    if not measured:
        return default
    front = tuple(name for name in measured if name in default)
    return front + tuple(name for name in default if name not in front)
