"""Process-level runtime facts and settings: ``tracing()`` (is this call being captured into a graph?) and
``tune_cpu_allocator()``, the CPU allocator setting that speeds up inference.

Why: PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks (above a
threshold that adapts up to 32 MiB) with fresh ``mmap`` pages and returns memory at the top of its
heap to the system once more than a trim threshold is free. A model whose layers allocate and free
several multi-MiB maps per layer then takes page faults (zero-filled pages) on most of its large
tensors, every forward. Measured with ``benchmarks/allocator.py`` (each model in a fresh process,
tuned vs default, fp32, batch 2, 2-core Zen 4, torch 2.14.1; ``benchmarks/results/cpu-allocator.json``):
DeepViT-S 1.5x, CaiT-XXS24 1.2-1.4x, LeViT-128S, PiT-Ti and the ATS ViT-S 1.2x faster; ViT-S,
T2T-ViT-14, CvT-13 and CrossViT-Ti within the machine's noise (0.9-1.06x). A process that has already
freed a large block (one ``fastvit bench`` run) has adapted glibc's threshold and sees less of this.

``tune_cpu_allocator()`` raises both thresholds with ``mallopt`` so freed blocks are kept and reused.
The cost: the process keeps its peak heap instead of returning it to the system. It changes the whole
process, so fastvit never calls it on import; call it once at start-up of an inference service or a
benchmark. (The alternative the PyTorch CPU tuning guide gives is preloading jemalloc or tcmalloc.)
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass

import torch


def _fx_tracing_check():
    """torch.fx symbolic tracing alone (``is_fx_tracing`` also answers for torch.export, with a warning).
    ``tracing()`` has asked ``is_compiling()`` first, so fx's thread-local flag is the answer; read from
    the thread-local's dict it costs ~30 ns (``getattr`` with a default raises and catches an
    AttributeError inside while the flag was never set: ~300 ns). torch's function where that is absent."""
    from torch.fx import _symbolic_trace

    tls = getattr(_symbolic_trace, "_is_fx_tracing_tls", None)
    if tls is not None and hasattr(tls, "__dict__"):
        return lambda: tls.__dict__.get("flag", False)
    return getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing


_is_fx_tracing = _fx_tracing_check()

__all__ = ["AllocatorTuning", "tune_cpu_allocator", "cpu_allocator_tuning", "tracing"]


def _onnx_flags():
    """``torch.onnx.is_in_onnx_export`` without its two imports per call (~0.9 us): the flags it reads,
    looked up once; torch's own function where its private modules live elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


_in_onnx_export = None


def tracing() -> bool:
    """Whether this call is being traced into a graph (compile, export, jit trace, ONNX, fx): eager-only
    shortcuts (in-place writes into a preallocated output, cached weight copies) step aside then."""
    global _in_onnx_export
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing() \
            or torch.jit.is_scripting() or _is_fx_tracing():
        return True
    if _in_onnx_export is None:  # torch.onnx imports its exporter lazily: so does this
        _in_onnx_export = _onnx_flags()
    return _in_onnx_export()

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 1 << 30
# Older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit builds).
_OLD_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20
DEFAULT_TRIM_THRESHOLD = (1 << 31) - 1


@dataclass(frozen=True)
class AllocatorTuning:
    """What ``tune_cpu_allocator`` did: ``applied`` and, when it did nothing, ``reason``."""

    applied: bool
    reason: str = ""
    mmap_threshold: int = 0
    trim_threshold: int = 0


_state = AllocatorTuning(False, "tune_cpu_allocator() has not been called")


def _libc_mallopt():
    """glibc's ``mallopt``, or a reason it is not available."""
    libc_name, _ = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        return None, f"needs Linux with glibc (this is {platform.system()} with {libc_name or 'an unknown libc'})"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return None, f"glibc's mallopt is not reachable: {e}"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt, ""


def tune_cpu_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                       trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> AllocatorTuning:
    """Keep freed CPU memory for reuse instead of page-faulting it back every forward (glibc only).

    Args:
        mmap_threshold: blocks at least this large still get their own ``mmap`` (default 1 GiB; glibc
            older than 2.35 caps it at 32 MiB, and the value applied is returned).
        trim_threshold: free memory at the heap's top returned to the system above this (default 2 GiB).

    Returns:
        ``AllocatorTuning``; ``applied`` is False, with the reason, where glibc's ``mallopt`` is not
        available (macOS, Windows, musl) or refuses a value. Nothing is raised: the tuning is an
        optimisation, never a requirement.
    """
    global _state
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or not 0 < value < 2 ** 31:
            raise ValueError(f"{name} must be a positive int below 2**31, got {value!r}")
    mallopt, reason = _libc_mallopt()
    if mallopt is None:
        _state = AllocatorTuning(False, reason)
        return _state
    refused = []
    if mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        mmap_threshold = min(mmap_threshold, _OLD_GLIBC_MAX_MMAP_THRESHOLD)
        if mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
            refused.append("M_MMAP_THRESHOLD")
    if mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        refused.append("M_TRIM_THRESHOLD")
    if refused:
        _state = AllocatorTuning(False, f"mallopt refused {', '.join(refused)}")
    else:
        _state = AllocatorTuning(True, "", mmap_threshold, trim_threshold)
    return _state


def cpu_allocator_tuning() -> AllocatorTuning:
    """The state of the last ``tune_cpu_allocator()`` call in this process."""
    return _state
