"""Choosing a backend for one attention call.

Selection, highest first: the ``backend=`` argument of ``attend()`` > ``with use_backend(...)`` >
``set_backend(...)`` > the ``FASTVIT_ATTN_BACKEND`` environment variable > ``auto``. It is resolved
at call time, never at module construction, so one model can run under several backends in a test.

An explicit backend that cannot serve a call raises ``ValueError`` with its reasons (unless it was
chosen with ``strict=False``, which falls back to auto for the calls it cannot serve). ``auto`` walks
a per-device priority list; on the CPU it picks per shape (see ``_cpu_order``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, NamedTuple, Optional

import torch

from . import measured
from .backends import BACKENDS, Backend, get_backend
from .bias import KeyPaddingMask, RelPosBias
from .inputs import AttnInputs

__all__ = ["choose", "explain", "use_backend", "set_backend", "get_selected_backend", "Selection",
           "CPU_SDPA_MIN_KEYS", "CPU_SDPA_MAX_TINY_KEYS", "CUDA_ORDER", "CUDA_PLAIN_ORDER", "cuda_fusion",
           "AUTO"]

AUTO = "auto"
ENV_VAR = "FASTVIT_ATTN_BACKEND"

# Auto priority on CUDA for a call that needs what only a fused kernel does (see `cuda_fusion`): our
# kernels, then FlexAttention (compiled; it serves what the kernels refuse, e.g. several biases of one
# kind), then xformers, then SDPA, then the reference. Every other call (plain, or a bias SDPA takes as a
# float mask) goes to SDPA first: its flash / cuDNN / memory-efficient kernels are the measured standard,
# and ours have not been timed on this GPU. A per-shape order `fastvit tune` measured replaces either.
CUDA_ORDER = ("triton", "flex", "xformers", "sdpa", "reference")
CUDA_PLAIN_ORDER = ("sdpa", "triton", "flex", "xformers", "reference")

# On a small CPU the naive path can beat SDPA at ViT-sized sequences: the score matrix of a layer
# (6 heads x 197^2 fp32 ~ 0.9 MB per image) stays in cache and matmul runs at GEMM speed, while SDPA's
# blocked loop pays per-block overhead. Measured on a 2-core Zen 4 with torch 2.14.1, inside whole
# models (ViT-S at 224/384/512 px) and per shape (benchmarks/cpu_dispatch.py). fp32: SDPA is on par
# per shape from ~128 keys, and 1.1-1.7x faster inside a model (the maps of the naive path evict the
# weights from cache), 2.6x at 1024 keys. bf16: the naive path (bf16 GEMMs at twice the fp32 rate,
# a native bf16 softmax) is 2-2.5x faster per shape up to 401 keys, 1.15-1.25x inside ViT-S at 577 and
# 1025 keys, and SDPA wins from ~2048 keys (1.3x); the threshold sits between the two measurements.
# fp16 has no fast CPU GEMM, so its naive path is slow: SDPA from 512 keys.
CPU_SDPA_MIN_KEYS = {torch.float32: 128, torch.bfloat16: 1536, torch.float16: 512}
_CPU_SDPA_MIN_KEYS_DEFAULT = 512
# Very short sequences are the other end: the work is a few microseconds and the naive path's four ops
# (scale, matmul, softmax, matmul) cost more than SDPA's one. Measured on a 2-core EPYC (AVX2), torch
# 2.14.1, fp32 inference (benchmarks/cpu_dispatch.py shapes plus these): [1, 1, 16, 16] 12.4 vs 5.3 us,
# [1, 2, 5, 32] (a patched timm Attention at 5 tokens) 12.6 vs 6.0 us, [2, 8, 16, 16] (LeViT's last
# stage) 20.9 vs 18.2 us, [2, 6, 17, 64] 33.7 vs 31.7 us with one thread; 1.7-2.8x with two.
CPU_SDPA_MAX_TINY_KEYS = 32


class Selection(NamedTuple):
    """The backend selection in force: a name (or ``"auto"``) and whether a refusal raises. Part of every
    plan's signature (``plan.py``), so it must stay cheap to get and to hash."""

    name: str
    strict: bool = True


_context: contextvars.ContextVar[Optional[Selection]] = contextvars.ContextVar("fastvit_backend", default=None)
_global: Optional[Selection] = None


def _check_name(name: str) -> str:
    if name != AUTO:
        get_backend(name)  # raises ValueError for an unknown name
    return name


@contextlib.contextmanager
def use_backend(name: str, *, strict: bool = True) -> Iterator[None]:
    """Run the enclosed code with backend ``name`` (or ``"auto"``).

    Args:
        name: a registered backend name or ``"auto"``.
        strict: if True, a call the backend cannot serve raises ``ValueError`` with the reasons; if
            False it falls back to auto dispatch (useful to run a whole model "on triton where possible").
    """
    token = _context.set(Selection(_check_name(name), strict))
    try:
        yield
    finally:
        _context.reset(token)


def set_backend(name: Optional[str], *, strict: bool = True) -> None:
    """Set the process-wide backend (``None`` or ``"auto"`` restores auto dispatch)."""
    global _global
    _global = None if name is None else Selection(_check_name(name), strict)


@functools.lru_cache(maxsize=64)
def _named(name: str) -> Selection:
    return Selection(_check_name(name), True)


@functools.lru_cache(maxsize=16)
def _from_env(value: str) -> Selection:
    if value != AUTO and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; known: {', '.join(BACKENDS)} or auto")
    return Selection(value, True)


_AUTO_SELECTION = Selection(AUTO, True)

# FASTVIT_ATTN_BACKEND is read on every call (a change takes effect at once). os.environ.get encodes the
# key and decodes the value each time (~0.7 us, a fifth of a cached attend() call): CPython's os.environ
# keeps the raw mapping in _data, looked up here with the key encoded once; elsewhere os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)
except AttributeError:
    _ENV_DATA = None


def _env_value() -> Optional[str]:
    if _ENV_DATA is None:
        return os.environ.get(ENV_VAR)
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def get_selected_backend(backend: Optional[str] = None) -> Selection:
    """The selection in force for a call with the given ``backend=`` argument."""
    if backend is not None:
        return _named(backend) if backend.__class__ is str else Selection(_check_name(backend), True)
    ctx = _context.get()
    if ctx is not None:
        return ctx
    if _global is not None:
        return _global
    env = _env_value()
    return _from_env(env) if env else _AUTO_SELECTION


def _cpu_order(inp: AttnInputs) -> tuple:
    # PyTorch's CPU flash kernel needs equal key and value widths; its fallback for Dv != D (LeViT)
    # is 1.7-3x slower than the reference.
    if inp.value_dim != inp.head_dim:
        return ("reference", "sdpa")
    # A windowed call attends over the keys of one window (49 for 7x7), not over the whole grid, and a
    # packed one over its sequences' own keys.
    keys = inp.window.tokens if inp.window is not None else inp.packed.kv_max_len if inp.packed is not None \
        else inp.nk
    if keys <= CPU_SDPA_MAX_TINY_KEYS or keys >= CPU_SDPA_MIN_KEYS.get(inp.dtype, _CPU_SDPA_MIN_KEYS_DEFAULT):
        return ("sdpa", "reference")
    return ("reference", "sdpa")


def cuda_fusion(inp: AttnInputs) -> Optional[str]:
    """What a call needs that only fastvit's kernels fuse (SDPA would need extra passes or a materialised
    tensor), or None: windows read in place, the CLS row's probabilities, key padding without an
    expanded mask, Dv != D, a relative-position table that takes a gradient (gathered in-kernel)."""
    if inp.window is not None:
        return "a window (read in place)"
    if inp.return_cls_probs:
        return "CLS probabilities"
    if inp.value_dim != inp.head_dim:
        return "Dv != D"
    for b in inp.bias:
        if isinstance(b, KeyPaddingMask):
            return "key padding"
        if isinstance(b, RelPosBias) and b.table.requires_grad and torch.is_grad_enabled():
            return "a relative-position table with a gradient"
    return None


def auto_order(inp: AttnInputs) -> tuple:
    """The backends auto dispatch tries for these inputs, best first."""
    if inp.device_type == "cuda":
        default = CUDA_ORDER if cuda_fusion(inp) is not None else CUDA_PLAIN_ORDER
        order = measured.ordered(inp, default)  # `fastvit tune`'s measured order for the bucket, if any
    elif inp.device_type == "cpu":
        order = _cpu_order(inp)
    else:
        order = ("sdpa", "reference")
    # Backends registered by users come last, so adding one never changes existing choices.
    return tuple(order) + tuple(n for n in BACKENDS if n not in order)


def explain(inp: AttnInputs) -> dict[str, list[str]]:
    """For every registered backend, the reasons it cannot serve ``inp`` (empty = it can)."""
    return {name: b.not_supported_reasons(inp) for name, b in BACKENDS.items()}


def _format(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(rs)}" for name, rs in reasons.items())


def choose(inp: AttnInputs, backend: Optional[str] = None, selection: Optional[Selection] = None) -> type[Backend]:
    """The backend that will serve ``inp`` (under ``selection``, default the one in force for ``backend``);
    raises ``ValueError`` listing reasons if none can."""
    sel = selection if selection is not None else get_selected_backend(backend)
    if sel.name != AUTO:
        chosen = get_backend(sel.name)
        reasons = chosen.not_supported_reasons(inp)
        if not reasons:
            return chosen
        if sel.strict:
            raise ValueError(f"attention backend {sel.name!r} cannot serve {inp.describe()}: {'; '.join(reasons)}")
    refused = {}
    for name in auto_order(inp):
        candidate = BACKENDS[name]
        reasons = candidate.not_supported_reasons(inp)
        if not reasons:
            return candidate
        refused[name] = reasons
    raise ValueError(f"no attention backend can serve {inp.describe()}: {_format(refused)}")
