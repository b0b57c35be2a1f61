"""The benchmark engine behind ``fastvit bench`` and ``benchmarks/`` (after xformers' model-named
shapes and Liger's one results schema).

Two kinds of benchmark groups, each timed as ONE interleaved run so that ratios inside a group are
trustworthy on a noisy, shared machine:

- attention: one shape named after the model it comes from (``vit_s16_224``, ``levit_256_stage2``,
  ``twins_svt_s_gsa_stage1``, ...), every backend (plus ``auto``) on the same inputs; time, GFLOP/s,
  GB/s on the minimal q/k/v/o bytes, peak memory and the speed-up over the reference (naive) path.
- model: one registered preset, fastvit under each backend selection (``use_backend(name,
  strict=False)``) and ``auto``, vit-pytorch with the same weights and a timm equivalent where one
  exists; images per second and ratios vs vit-pytorch, vs timm and (bf16 rows) vs fp32.

Timing: warm-up, one call under the memory profiler, then rounds in which every contender takes one
sample in a rotating order until the group's time budget is spent (at least ``min_samples`` each).
A sample is ``inner`` back-to-back calls (enough to last ~10 ms on the CPU, ~2 ms on CUDA), timed with
``time.perf_counter`` on the CPU and ``torch.cuda.Event`` pairs on CUDA. The reported time is the
median sample. Peak memory is the growth of allocated memory above what was allocated before the call:
``torch.cuda.max_memory_allocated`` on CUDA, the allocation events of ``torch.profiler`` on the CPU
(torch's CPU allocations are invisible to ``tracemalloc``).

Every result is a plain dict; ``run_bench`` returns the whole JSON document (``SCHEMA_VERSION``,
device, versions, commit, timestamp, config, results) and ``validate_document`` checks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import functools
import importlib
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from fastvit.attention import BACKENDS, KeyPaddingMask, RelPosBias, attend, choose, make_inputs, use_backend

__all__ = [
    "SCHEMA_VERSION", "DTYPES", "AttentionShape", "ATTENTION_SHAPES", "HEADLINE_MODEL", "TIMM_EQUIVALENTS",
    "Contender", "Measurement", "BenchConfig", "Group",
    "device_name", "versions", "git_info", "environment", "default_device",
    "time_interleaved", "peak_memory", "synchronize",
    "attention_inputs", "attention_flops", "attention_bytes", "attention_contenders",
    "default_models", "select_models", "model_contenders",
    "plan", "run_bench", "validate_document",
]

SCHEMA_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HEADLINE_MODEL = "vit_small_patch16_224"


# --------------------------------------------------------------------------------------------------
# Environment: device, versions, commit
# --------------------------------------------------------------------------------------------------

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags(interesting: Sequence[str] = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16",
                                            "avx512_vnni", "avx512_fp16", "avx_vnni", "amx_tile",
                                            "amx_bf16", "amx_int8", "neon", "asimd", "sve")) -> list:
    """The CPU features that matter for GEMM speed (from /proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in interesting if flag in have]
    except OSError:
        pass
    return []


def device_name(device: str) -> str:
    """``torch.cuda.get_device_name`` on CUDA, the CPU model (/proc/cpuinfo) on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model_name()


def package_version(dist: str) -> Optional[str]:
    """The installed version of a distribution, or None (never imports it)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import fastvit

    return {
        "python": platform.python_version(),
        "fastvit": fastvit.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "xformers": package_version("xformers"),
        "timm": package_version("timm"),
        "vit-pytorch": package_version("vit-pytorch"),
        "einops": package_version("einops"),
    }


@functools.lru_cache(maxsize=1)
def git_info() -> dict:
    """The commit of the source tree fastvit is imported from (None outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"commit": commit, "dirty": dirty}


def cpu_pressure() -> Optional[float]:
    """Linux PSI: % of the last 10 s in which runnable tasks waited for a CPU (None where unavailable).

    On a shared machine this says how noisy a run was: ~0 is quiet, >50 means other processes held
    the cores and absolute times are inflated (ratios from one interleaved run still hold better).
    """
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return None


def environment(device: str) -> dict:
    """Where a run happened: the top-level fields of every results document."""
    env = {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "versions": versions(),
        "git_commit": git_info()["commit"],
        "git_dirty": git_info()["dirty"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu": cpu_model_name(), "cpu_flags": cpu_flags(),
                 "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                 "cpu_pressure_avg10": cpu_pressure()},
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env["cuda_device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                              "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
    return env


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence C++ writes to stderr (Kineto prints a line on every profiler start and stop)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_memory(fn: Callable[[], Any]) -> tuple:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            t0 = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - t0
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak), seconds


def _timed_peak_memory(fn: Callable[[], Any], device: str) -> tuple:
    """``(peak bytes or None, seconds of the call)`` for one call of ``fn``."""
    if torch.device(device).type == "cuda":
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        del result
        return int(torch.cuda.max_memory_allocated(dev) - base), start.elapsed_time(end) * 1e-3
    if torch.device(device).type == "cpu":
        try:
            return _cpu_peak_memory(fn)
        except Exception:  # the profiler is optional machinery; a benchmark must not die of it
            pass
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return None, time.perf_counter() - t0


def peak_memory(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Bytes allocated by one call of ``fn`` at its peak, above what was allocated before it.

    The call's own result is counted (it is alive until ``fn`` returns). None if unmeasurable.
    """
    return _timed_peak_memory(fn, device)[0]


@dataclass
class Contender:
    """One thing to time in a group. ``fn`` runs one call; ``meta`` goes into its result row."""

    name: str
    fn: Optional[Callable[[], Any]] = None
    meta: dict = field(default_factory=dict)
    skip_reason: Optional[str] = None


@dataclass
class Measurement:
    """What ``time_interleaved`` found for one contender. Times are seconds per call."""

    name: str
    samples: list = field(default_factory=list)
    inner: int = 1
    peak_mem_bytes: Optional[int] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.samples) if self.samples else None

    @property
    def min(self) -> Optional[float]:
        return min(self.samples) if self.samples else None

    @property
    def iqr(self) -> Optional[float]:
        if len(self.samples) < 4:
            return None
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]

    def row(self) -> dict:
        ms = lambda s: None if s is None else s * 1e3
        return {"median_ms": ms(self.median), "min_ms": ms(self.min), "iqr_ms": ms(self.iqr),
                "samples": len(self.samples), "calls": len(self.samples) * self.inner,
                "peak_mem_bytes": self.peak_mem_bytes}


class _Clock:
    """Times ``inner`` back-to-back calls: perf_counter on the CPU, CUDA events on CUDA."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device

    def __call__(self, fn: Callable[[], Any], inner: int) -> float:
        if self.cuda:
            torch.cuda.synchronize(torch.device(self.device))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def time_interleaved(contenders: Sequence[Contender], device: str, *, budget_s: float, min_samples: int = 3,
                     max_samples: int = 200, warmup: Optional[int] = None, target_sample_s: Optional[float] = None,
                     measure_memory: bool = True, hard_cap_factor: float = 2.0, slow_call_s: float = 1.0,
                     on_round: Optional[Callable[[float], None]] = None) -> dict:
    """Time ``contenders`` in one interleaved run; returns ``{name: Measurement}``.

    Every contender is warmed up (its first call also estimates its cost), run once under the memory
    profiler, then the rounds start: each round takes one sample of every contender, in an order that
    rotates from round to round so that drift and cache effects spread evenly. The rounds stop once
    ``budget_s`` is spent and each contender has ``min_samples`` (or ``max_samples``), and in any case
    after ``hard_cap_factor * budget_s`` with at least one sample each, so one slow contender cannot
    blow the budget. A contender that raises is reported with its error and dropped; the others go on.
    ``on_round`` receives the fraction of the budget spent after each round. A contender whose warm-up
    call took longer than ``slow_call_s`` keeps its profiled call as a sample.
    """
    cuda = torch.device(device).type == "cuda"
    warmup = (3 if cuda else 1) if warmup is None else warmup
    target = (2e-3 if cuda else 1e-2) if target_sample_s is None else target_sample_s
    clock = _Clock(device)
    entered = time.perf_counter()
    results = {c.name: Measurement(c.name) for c in contenders}
    estimates = {}
    live = []
    for c in contenders:
        m = results[c.name]
        if c.skip_reason is not None or c.fn is None:
            m.error = c.skip_reason or "nothing to run"
            continue
        try:
            estimate = math.inf
            for _ in range(max(1, warmup)):
                estimate = min(estimate, clock(c.fn, 1))
            if measure_memory:
                m.peak_mem_bytes, seconds = _timed_peak_memory(c.fn, device)
                # A slow call (seconds on a CPU) is timed inside the profiler as its first sample: the
                # profiler adds microseconds per op, and the budget may not allow another call.
                if estimate > slow_call_s:
                    m.samples.append(seconds)
            if estimate < target:  # a first call overestimates; re-time a cheap one once it is warm
                estimate = clock(c.fn, 1)
            m.inner = int(min(1000, max(1, math.ceil(target / max(estimate, 1e-7)))))
            estimates[c.name] = estimate
        except Exception as e:  # noqa: BLE001 - recorded in the results
            m.error = f"{type(e).__name__}: {e}"
            continue
        live.append(c)

    # One round of the slow contenders may already exceed the hard cap (a 10 s call on a 2-core CPU):
    # then a single sample each is all the budget allows.
    round_estimate = sum(results[c.name].inner * estimates[c.name] for c in live)
    if round_estimate * min_samples > hard_cap_factor * budget_s:
        min_samples = 1
        if all(results[c.name].samples for c in live) and round_estimate > hard_cap_factor * budget_s:
            return results  # every slow contender already has its profiled sample
    start = time.perf_counter()
    round_no = 0
    while live:
        shift = round_no % len(live)
        for c in live[shift:] + live[:shift]:
            m = results[c.name]
            if len(m.samples) >= max_samples:
                continue
            try:
                m.samples.append(clock(c.fn, m.inner))
            except Exception as e:  # noqa: BLE001
                m.error = f"{type(e).__name__}: {e}"
        live = [c for c in live if results[c.name].error is None]
        round_no += 1
        elapsed = time.perf_counter() - start
        if on_round is not None:
            on_round(min(1.0, elapsed / budget_s) if budget_s > 0 else 1.0)
        counts = [len(results[c.name].samples) for c in live]
        if not counts or min(counts) >= max_samples:
            break
        if elapsed >= budget_s and min(counts) >= min_samples:
            break
        # The hard cap counts the warm-up and profiling too: on a loaded machine they alone can
        # take longer than the budget.
        if time.perf_counter() - entered >= hard_cap_factor * budget_s and min(counts) >= 1:
            break
    return results


# --------------------------------------------------------------------------------------------------
# Attention shapes and contenders
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionShape:
    """An attention call shaped like the layer of a real model.

    Args:
        name: ``<model>_<where>``.
        heads, nq, nk, head_dim, value_dim: the call's sizes (``value_dim`` defaults to ``head_dim``).
        bias: ``"none"``, ``"relpos"`` (a ``[T, H]`` table gathered by a 2-D relative index) or
            ``"padding"`` (a key-padding mask, as after adaptive token sampling).
        batch: batch size per device type (a CPU gets a smaller one).
        quick: ``(B, H, Nq, Nk, D, Dv)`` for ``--quick`` runs and tests.
        source: where the shape comes from.
        cls_probs: the call also returns the CLS row's probabilities (adaptive token sampling).
    """

    name: str
    heads: int
    nq: int
    nk: int
    head_dim: int
    value_dim: Optional[int] = None
    bias: str = "none"
    batch: tuple = (("cpu", 8), ("cuda", 64))
    quick: tuple = (1, 2, 16, 16, 16, 16)
    source: str = ""
    cls_probs: bool = False

    def dims(self, device: str, quick: bool = False, batch_size: Optional[int] = None) -> tuple:
        """``(B, H, Nq, Nk, D, Dv)`` for a device."""
        if quick:
            B, H, Nq, Nk, D, Dv = self.quick
        else:
            per_device = dict(self.batch)
            B = per_device.get(torch.device(device).type, per_device["cpu"])
            H, Nq, Nk, D, Dv = self.heads, self.nq, self.nk, self.head_dim, self.value_dim or self.head_dim
        return (batch_size or B, H, Nq, Nk, D, Dv)


ATTENTION_SHAPES = [
    AttentionShape("vit_s16_224", 6, 197, 197, 64, batch=(("cpu", 8), ("cuda", 64)),
                   quick=(2, 2, 17, 17, 16, 16), source="ViT-S/16 at 224 px: 196 patches + CLS, 6 heads of 64"),
    AttentionShape("vit_b16_224", 12, 197, 197, 64, batch=(("cpu", 8), ("cuda", 64)),
                   quick=(1, 3, 17, 17, 16, 16), source="ViT-B/16 at 224 px: 12 heads of 64"),
    AttentionShape("vit_l16_384", 16, 577, 577, 64, batch=(("cpu", 2), ("cuda", 32)),
                   quick=(1, 2, 33, 33, 16, 16), source="ViT-L/16 at 384 px: 576 patches + CLS, 16 heads of 64"),
    AttentionShape("levit_256_stage1", 4, 196, 196, 32, 64, bias="relpos", batch=(("cpu", 8), ("cuda", 256)),
                   quick=(2, 2, 16, 16, 8, 16),
                   source="LeViT-256 stage 1: 14x14 map, 4 heads, key dim 32, value dim 64, trainable "
                          "relative-position table [196, 4] gathered by |dy|*14+|dx|"),
    AttentionShape("levit_256_stage2", 6, 49, 49, 32, 64, bias="relpos", batch=(("cpu", 32), ("cuda", 256)),
                   quick=(2, 2, 16, 16, 8, 16),
                   source="LeViT-256 stage 2: 7x7 map, 6 heads, key dim 32, value dim 64, trainable "
                          "relative-position table [49, 6] gathered by |dy|*7+|dx|"),
    AttentionShape("levit_256_stage3", 8, 16, 16, 32, 64, bias="relpos", batch=(("cpu", 32), ("cuda", 256)),
                   quick=(2, 2, 16, 16, 8, 16),
                   source="LeViT-256 stage 3: 4x4 map, 8 heads, key dim 32, value dim 64, trainable "
                          "relative-position table [16, 8] gathered by |dy|*4+|dx|"),
    AttentionShape("cvt_13_stage1", 1, 3136, 784, 64, batch=(("cpu", 2), ("cuda", 64)),
                   quick=(1, 1, 64, 16, 16, 16),
                   source="CvT-13 stage 1: 56x56 queries, keys/values from a stride-2 conv projection (28x28)"),
    AttentionShape("twins_svt_s_gsa_stage1", 2, 3136, 49, 32, batch=(("cpu", 2), ("cuda", 64)),
                   quick=(1, 2, 64, 4, 16, 16),
                   source="Twins-SVT-S stage 1 global sub-sampled attention: 56x56 queries, 7x7 keys"),
    AttentionShape("ats_vit_s_cls_probs", 6, 197, 197, 64, batch=(("cpu", 8), ("cuda", 64)), cls_probs=True,
                   quick=(2, 2, 17, 17, 16, 16),
                   source="ATS-ViT-S sampling layer: the vit_s16_224 call plus the CLS row's probabilities "
                          "(compare with vit_s16_224 for the cost of the extra output)"),
    AttentionShape("ats_keypad", 6, 129, 129, 64, bias="padding", batch=(("cpu", 8), ("cuda", 64)),
                   quick=(2, 2, 17, 17, 16, 16),
                   source="ATS-ViT-S after token sampling: 128 tokens + CLS, 6 heads, per-image key padding"),
    AttentionShape("vit_b16_1024", 12, 4096, 4096, 64, batch=(("cpu", 1), ("cuda", 4)),
                   quick=(1, 2, 64, 64, 16, 16), source="ViT-B/16 at 1024 px: 4096 tokens, 12 heads of 64"),
]


def _relpos_index(nq: int, nk: int, device: str) -> tuple:
    """A LeViT-style index ``|dy| * w + |dx|`` for square maps, and the table length it needs."""
    side_q, side_k = math.isqrt(nq), math.isqrt(nk)
    if side_q * side_q == nq and side_k * side_k == nk and side_q == side_k:
        ys, xs = torch.meshgrid(torch.arange(side_q), torch.arange(side_q), indexing="ij")
        pts = torch.stack((ys.flatten(), xs.flatten()), dim=-1)  # (n, 2)
        rel = (pts[:, None, :] - pts[None, :, :]).abs()  # (nq, nk, 2)
        return (rel[..., 0] * side_q + rel[..., 1]).to(device), side_q * side_q
    g = torch.Generator().manual_seed(1)
    T = 2 * max(nq, nk) + 1
    return torch.randint(0, T, (nq, nk), generator=g).to(device), T


def attention_inputs(dims: tuple, bias: str, device: str, dtype: torch.dtype, *, requires_grad: bool = False,
                     seed: int = 0) -> tuple:
    """``(q, k, v, make_bias)`` for a shape; ``make_bias()`` builds the call's bias descriptors fresh,
    as a model does on every forward (the descriptors are cheap; their tensors are fixed)."""
    B, H, Nq, Nk, D, Dv = dims
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    q, k, v = rand(B, H, Nq, D), rand(B, H, Nk, D), rand(B, H, Nk, Dv)
    if bias == "relpos":
        index, T = _relpos_index(Nq, Nk, device)
        table = rand(T, H)
        return q, k, v, (lambda: RelPosBias(table, index))
    if bias == "padding":
        # Image i keeps a different number of tokens, as adaptive token sampling leaves them.
        keep = torch.linspace(Nk, max(1, Nk // 2), B).round().long()
        mask = (torch.arange(Nk)[None, :] < keep[:, None]).to(device)
        return q, k, v, (lambda: KeyPaddingMask(mask))
    if bias != "none":
        raise ValueError(f"unknown bias kind {bias!r}")
    return q, k, v, (lambda: None)


def attention_flops(dims: tuple, mode: str = "fwd") -> float:
    """Matmul FLOPs: ``2*B*H*Nq*Nk*(D + Dv)`` forward; backward counts 2.5x that (FlashAttention's
    convention: five matmuls against two)."""
    B, H, Nq, Nk, D, Dv = dims
    fwd = 2.0 * B * H * Nq * Nk * (D + Dv)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def attention_bytes(dims: tuple, dtype: torch.dtype, mode: str = "fwd") -> float:
    """The minimal HBM traffic: read q, k, v and write o (backward: read q, k, v, o, dO, write dq, dk, dv)."""
    B, H, Nq, Nk, D, Dv = dims
    size = torch.finfo(dtype).bits // 8
    q, k, v, o = B * H * Nq * D, B * H * Nk * D, B * H * Nk * Dv, B * H * Nq * Dv
    fwd = q + k + v + o
    bwd = 2 * (q + k + v) + 2 * o
    return float(size * (fwd + (bwd if mode == "fwd+bwd" else 0)))


# Nominal dense tensor-core peaks (TFLOP/s, datasheet, no sparsity) for the "% of peak" column, by a
# substring of torch.cuda.get_device_name(). 16-bit = bf16/fp16 tensor cores; fp32 = plain CUDA-core FMA
# (fastvit's fp32 path; TF32 when torch.backends.cuda.matmul.allow_tf32 is set is not counted here).
PEAK_TFLOPS = (
    ("H200", {"16bit": 989.4, "fp32": 66.9}),
    ("H100 PCIe", {"16bit": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"16bit": 835.0, "fp32": 60.0}),
    ("H100", {"16bit": 989.4, "fp32": 66.9}),
    ("A100", {"16bit": 312.0, "fp32": 19.5}),
    ("L40S", {"16bit": 362.1, "fp32": 91.6}),
    ("A10G", {"16bit": 70.0, "fp32": 31.2}),
    ("RTX 4090", {"16bit": 165.2, "fp32": 82.6}),
)


def peak_tflops(device: str, dtype: torch.dtype) -> Optional[float]:
    """The device's nominal dense peak for matmuls in ``dtype`` (None on the CPU and unknown GPUs)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks["fp32" if dtype == torch.float32 else "16bit"]
    return None


def _interpreted(backend: str, device: str, quick: bool) -> list:
    """Triton on the CPU runs in its numpy interpreter (TRITON_INTERPRET=1): a correctness tool, not a
    benchmark, and minutes per call at full sizes. Allowed in --quick runs only."""
    if backend == "triton" and torch.device(device).type == "cpu" and not quick \
            and os.environ.get("TRITON_INTERPRET") == "1":
        return ["triton runs in its interpreter on the CPU (TRITON_INTERPRET=1); not benchmarked at full size"]
    if backend == "flex" and torch.device(device).type == "cpu" and not quick:
        return ["flex runs uncompiled on the CPU (it materialises the B*H*N^2 scores); not benchmarked at full size"]
    return []


def attention_contenders(shape: AttentionShape, *, device: str, dtype: torch.dtype, mode: str = "fwd",
                         backends: Optional[Sequence[str]] = None, quick: bool = False,
                         batch_size: Optional[int] = None) -> tuple:
    """The contenders of one attention group: every backend (refusals skipped with their reasons) + auto.

    Returns:
        ``(contenders, dims)``.
    """
    dims = shape.dims(device, quick, batch_size)
    backward = mode == "fwd+bwd"
    q, k, v, make_bias = attention_inputs(dims, shape.bias, device, dtype, requires_grad=backward)
    extra = dict(return_cls_probs=True) if shape.cls_probs else {}
    inp = make_inputs(q, k, v, bias=make_bias(), **extra)
    names = list(backends) if backends is not None else [*BACKENDS, "auto"]
    leaves = [q, k, v] + ([make_bias().table] if shape.bias == "relpos" else [])
    grad_out = torch.randn(dims[0], dims[1], dims[2], dims[5], device=device, dtype=dtype) if backward else None

    contenders = []
    for name in names:
        meta = {"backend": name}
        if name == "auto":
            try:
                meta["served_by"] = choose(inp, "auto").name
            except ValueError as e:
                contenders.append(Contender(name, meta=meta, skip_reason=str(e)))
                continue
        else:
            if name not in BACKENDS:
                contenders.append(Contender(name, meta=meta, skip_reason=f"unknown backend {name!r}"))
                continue
            reasons = BACKENDS[name].not_supported_reasons(inp) or _interpreted(name, device, quick)
            if reasons:
                contenders.append(Contender(name, meta=meta, skip_reason="; ".join(reasons)))
                continue
            meta["served_by"] = name

        if backward:
            def fn(name=name):
                for t in leaves:
                    t.grad = None
                res = attend(q, k, v, bias=make_bias(), backend=name, **extra)
                out = res.out if shape.cls_probs else res
                out.backward(grad_out)
                return out
        else:
            def fn(name=name):
                with torch.inference_mode():
                    return attend(q, k, v, bias=make_bias(), backend=name, **extra)
        contenders.append(Contender(name, fn, meta))
    return contenders, dims


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

# fastvit preset -> (timm model name, extra timm kwargs). Same sizes; timm's own block details (qkv
# bias, conv patch embedding, fused SDPA attention, LeViT's BN-folded layers) are kept as timm ships them.
TIMM_EQUIVALENTS = {
    "vit_tiny_patch16_224": ("vit_tiny_patch16_224", {}),
    "vit_small_patch16_224": ("vit_small_patch16_224", {}),
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
    "vit_large_patch16_224": ("vit_large_patch16_224", {}),
    "vit_base_patch32_384": ("vit_base_patch32_384", {}),
    "vit_small_patch16_224_mean": ("vit_small_patch16_224", {"global_pool": "avg", "class_token": False,
                                                             "fc_norm": False}),
    "cait_xxs24_224": ("cait_xxs24_224", {}),
    "cait_xxs36_224": ("cait_xxs36_224", {}),
    "cait_s24_224": ("cait_s24_224", {}),
    "levit_128s": ("levit_128s", {}),
    "levit_128": ("levit_128", {}),
    "levit_192": ("levit_192", {}),
    "levit_256": ("levit_256", {}),
    "levit_384": ("levit_384", {}),
    "pit_ti_224": ("pit_ti_224", {}),
    "pit_xs_224": ("pit_xs_224", {}),
    "pit_s_224": ("pit_s_224", {}),
    "pit_b_224": ("pit_b_224", {}),
    "crossvit_tiny_240": ("crossvit_tiny_240", {}),
    "crossvit_small_240": ("crossvit_small_240", {}),
    "crossvit_base_240": ("crossvit_base_240", {}),
}


def _registry():
    from fastvit.models.registry import _REGISTRY, get_model_entry, list_models

    return _REGISTRY, get_model_entry, list_models


def default_models() -> list:
    """The headline ViT-S/16, then one preset per vit-pytorch architecture (the first registered one),
    so models added to the registry show up without touching the benchmark."""
    registry, _, _ = _registry()
    names, seen = [], set()
    if HEADLINE_MODEL in registry:
        names.append(HEADLINE_MODEL)
        seen.add((registry[HEADLINE_MODEL].vit_pytorch or "").split(":")[0])
    for name, entry in registry.items():
        if not entry.vit_pytorch:
            continue
        family = entry.vit_pytorch.split(":")[0]
        if family not in seen:
            seen.add(family)
            names.append(name)
    return names


def select_models(patterns: Optional[Sequence[str]]) -> list:
    """Presets matching any glob pattern (``all`` = every preset with a vit-pytorch equivalent)."""
    registry, _, list_models = _registry()
    if not patterns:
        return default_models()
    names = []
    for pattern in patterns:
        if pattern == "all":
            matched = [n for n, e in registry.items() if e.vit_pytorch]
        elif pattern == "default":
            matched = default_models()
        else:
            matched = list_models(pattern)
            if not matched:
                raise ValueError(f"no registered model matches {pattern!r} (see fastvit.list_models())")
        names += [n for n in matched if n not in names]
    return names


def _timm_vit_kwargs(kwargs: dict) -> dict:
    """timm VisionTransformer arguments with the sizes of a fastvit ViT (for --quick's tiny presets)."""
    dim, heads = kwargs["dim"], kwargs["heads"]
    out = dict(img_size=kwargs["image_size"], patch_size=kwargs["patch_size"], embed_dim=dim,
               depth=kwargs["depth"], num_heads=heads, mlp_ratio=kwargs["mlp_dim"] / dim,
               num_classes=kwargs.get("num_classes", 1000), in_chans=kwargs.get("channels", 3))
    if kwargs.get("pool", "cls") == "mean":
        out.update(global_pool="avg", class_token=False, fc_norm=False)
    return out


def _build_timm(name: str, entry, overrides: dict, quick: bool):
    """``(model or None, timm name, reason)``."""
    if package_version("timm") is None:
        return None, None, "timm is not installed"
    if name not in TIMM_EQUIVALENTS:
        return None, None, f"no timm equivalent registered for {name}"
    timm_name, extra = TIMM_EQUIVALENTS[name]
    import timm

    kwargs = dict(extra)
    if quick:
        if not (entry.vit_pytorch or "").startswith("vit_pytorch.vit:"):
            return None, timm_name, "no size-matched timm model for --quick's tiny preset"
        kwargs.update(_timm_vit_kwargs({**entry.kwargs, **overrides}))
    return timm.create_model(timm_name, pretrained=False, **kwargs), timm_name, None


def _autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _model_fn(model: torch.nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype, mode: str,
              backend: Optional[str]) -> Callable[[], Any]:
    selection = (lambda: use_backend(backend, strict=False)) if backend else contextlib.nullcontext
    if mode == "fwd+bwd":
        def fn():
            model.zero_grad(set_to_none=True)
            with selection(), _autocast(device, dtype):
                out = model(x)
            out.float().sum().backward()
            return out
    else:
        def fn():
            with torch.inference_mode(), selection(), _autocast(device, dtype):
                return model(x)
    return fn


def model_contenders(name: str, *, device: str, dtypes: Sequence[torch.dtype], mode: str = "fwd",
                     batch_size: int = 8, backends: Optional[Sequence[str]] = None, vit_pytorch: bool = True,
                     timm: bool = True, quick: bool = False, extra_auto_dtypes: Sequence[torch.dtype] = (),
                     timm_compile: bool = False) -> tuple:
    """The contenders of one model group.

    fastvit runs under each name in ``backends`` (``use_backend(name, strict=False)``: calls a backend
    cannot serve fall back to auto) and ``"auto"``; vit-pytorch with the same weights; timm's
    equivalent (and, with ``timm_compile``, the same timm model under ``torch.compile``). Each in every
    dtype of ``dtypes`` (autocast for bf16 / fp16), plus fastvit auto in ``extra_auto_dtypes``.

    Returns:
        ``(contenders, info)``; ``info`` has the input size, parameter count and notes.
    """
    _, get_model_entry, _ = _registry()
    entry = get_model_entry(name)
    overrides = dict(entry.test_overrides) if quick else {}
    input_size = entry.input_size_for(overrides) if quick else entry.input_size
    if quick and entry.test_input_size:
        input_size = entry.test_input_size
    info = {"input_size": list(input_size), "vit_pytorch": entry.vit_pytorch, "notes": []}

    torch.manual_seed(0)
    model = entry.build(**overrides).eval()
    ref = None
    ref_reason = None
    if not vit_pytorch:
        ref_reason = "disabled (--no-vit-pytorch)"
    elif entry.vit_pytorch is None:
        ref_reason = "no vit-pytorch equivalent"
    elif package_version("vit-pytorch") is None:
        ref_reason = "vit-pytorch is not installed"
    else:
        try:
            torch.manual_seed(0)
            ref = entry.build_vit_pytorch(**overrides).eval()
            model.load_vit_pytorch_state_dict(ref.state_dict())
        except Exception as e:  # noqa: BLE001 - a broken equivalent must not stop the benchmark
            ref_reason = f"vit-pytorch build or weight loading failed: {type(e).__name__}: {e}"
            info["notes"].append(ref_reason)
            ref = None
    timm_model, timm_name, timm_reason = (None, None, "disabled (--no-timm)")
    if timm:
        try:
            timm_model, timm_name, timm_reason = _build_timm(name, entry, overrides, quick)
        except Exception as e:  # noqa: BLE001
            timm_reason = f"timm build failed: {type(e).__name__}: {e}"
    info["timm_model"] = timm_name
    info["params"] = sum(p.numel() for p in model.parameters())

    model.to(device)
    if ref is not None:
        ref.to(device)
    if timm_model is not None:
        timm_model.eval().to(device)
    torch.manual_seed(0)
    x = torch.randn(batch_size, *input_size, device=device)
    if mode == "fwd+bwd":
        x.requires_grad_(False)

    names = list(backends) if backends is not None else [*BACKENDS, "auto"]
    contenders = []
    for dtype in list(dtypes) + [d for d in extra_auto_dtypes if d not in dtypes]:
        dt = DTYPE_NAMES[dtype]
        extra_only = dtype not in dtypes
        for backend in (["auto"] if extra_only else names):
            meta = {"impl": "fastvit", "backend": backend, "dtype": dt}
            cname = f"fastvit[{backend}] {dt}"
            if backend != "auto":
                if backend not in BACKENDS:
                    contenders.append(Contender(cname, meta=meta, skip_reason=f"unknown backend {backend!r}"))
                    continue
                ok, why = BACKENDS[backend].availability()
                if not ok:
                    contenders.append(Contender(cname, meta=meta, skip_reason=f"unavailable: {why}"))
                    continue
                if torch.device(device).type not in BACKENDS[backend].devices:
                    contenders.append(Contender(cname, meta=meta, skip_reason=f"{backend} does not run on {device}"))
                    continue
                if _interpreted(backend, device, quick):
                    contenders.append(Contender(cname, meta=meta, skip_reason=_interpreted(backend, device, quick)[0]))
                    continue
            contenders.append(Contender(cname, _model_fn(model, x, device, dtype, mode, backend), meta))
        if extra_only:
            continue
        meta = {"impl": "vit-pytorch", "backend": None, "dtype": dt}
        if ref is None:
            contenders.append(Contender(f"vit-pytorch {dt}", meta=meta, skip_reason=ref_reason))
        else:
            contenders.append(Contender(f"vit-pytorch {dt}", _model_fn(ref, x, device, dtype, mode, None), meta))
        meta = {"impl": "timm", "backend": None, "dtype": dt, "timm_model": timm_name}
        if timm_model is None:
            contenders.append(Contender(f"timm {dt}", meta=meta, skip_reason=timm_reason))
        else:
            contenders.append(Contender(f"timm {dt}", _model_fn(timm_model, x, device, dtype, mode, None), meta))
        if timm_compile:
            meta = dict(meta, impl="timm", compiled=True)
            if timm_model is None:
                contenders.append(Contender(f"timm compiled {dt}", meta=meta, skip_reason=timm_reason))
            else:
                # Compiled on its first (warm-up) call, outside the timed rounds.
                compiled = torch.compile(timm_model)
                contenders.append(Contender(f"timm compiled {dt}", _model_fn(compiled, x, device, dtype, mode, None),
                                            meta))
    return contenders, info


# --------------------------------------------------------------------------------------------------
# Planning and running
# --------------------------------------------------------------------------------------------------

@dataclass
class BenchConfig:
    """What ``fastvit bench`` runs. ``None`` fields take the documented defaults.

    Attributes:
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        dtypes: dtype names for every group (default: fp32, plus a fastvit bf16-autocast row in the
            headline model group where the device has bf16).
        batch_size: model batch size (default 8 for the headline model, 2 (CPU) / 8 (CUDA) for the
            others); for attention it overrides each shape's batch.
        backends: backend names (and ``auto``) (default: all registered + auto for attention and the
            headline model; auto only for the other models).
        models: glob patterns of presets (default: ``default_models()``); an empty list skips models.
        shapes: glob patterns of attention shapes (default: all); an empty list skips attention.
        backward: also time forward + backward.
        quick: tiny sizes and budgets (tests, smoke runs).
        group_seconds: time budget of one group's timed rounds (default 5 s CPU / 1.5 s CUDA, 0.2 s
            quick); the headline model group gets 5x.
        max_seconds: wall-time target of the run (default 165 s for a full CPU run, 0 = none). When
            the machine is slower than planned (a loaded shared CPU), later groups get smaller
            budgets, down to one sample per contender.
        tune_allocator: call ``fastvit.runtime.tune_cpu_allocator()`` first (glibc keeps freed memory
            for reuse instead of page-faulting it back; it applies to every contender of the process).
    """

    device: Optional[str] = None
    dtypes: Optional[list] = None
    batch_size: Optional[int] = None
    backends: Optional[list] = None
    models: Optional[list] = None
    shapes: Optional[list] = None
    backward: bool = False
    quick: bool = False
    group_seconds: Optional[float] = None
    min_samples: int = 3
    vit_pytorch: bool = True
    timm: bool = True
    memory: bool = True
    max_seconds: Optional[float] = None
    threads: Optional[int] = None
    tune_allocator: bool = False
    timm_compile: bool = False

    def resolved_device(self) -> str:
        return self.device or default_device()

    def resolved_max_seconds(self) -> Optional[float]:
        """The wall-time target of the whole run: 165 s for a full CPU run, none elsewhere (0 = none)."""
        if self.max_seconds is not None:
            return self.max_seconds or None
        if self.quick or torch.device(self.resolved_device()).type != "cpu":
            return None
        return 165.0


@dataclass
class Group:
    """One interleaved run: its contenders are built only when the group runs (models are freed after)."""

    kind: str  # "attention" | "model"
    name: str
    mode: str
    dtype: Optional[str]  # attention groups have one dtype; model groups may mix
    budget_s: float
    build: Callable[[], tuple] = field(repr=False, default=None)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name} {self.dtype or ''} {self.mode}".replace("  ", " ")


def _bf16_ok(device: str) -> bool:
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def plan(config: BenchConfig) -> list:
    """The groups of a run, in order: attention shapes, then models."""
    device = config.resolved_device()
    cuda = torch.device(device).type == "cuda"
    base = config.group_seconds or (0.2 if config.quick else 1.5 if cuda else 5.0)
    modes = ["fwd", "fwd+bwd"] if config.backward else ["fwd"]
    explicit_dtypes = config.dtypes is not None
    dtype_names = list(config.dtypes) if explicit_dtypes else ["fp32"]
    for d in dtype_names:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if config.backends is not None:
        for b in config.backends:
            if b != "auto" and b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r}; known: {', '.join(BACKENDS)} or auto")

    groups = []
    shapes = ATTENTION_SHAPES
    if config.shapes is not None:
        shapes = [s for s in ATTENTION_SHAPES if any(fnmatch.fnmatchcase(s.name, p) for p in config.shapes)]
        if config.shapes and not shapes:
            raise ValueError(f"no attention shape matches {config.shapes}; known: "
                             f"{', '.join(s.name for s in ATTENTION_SHAPES)}")
    for shape in shapes:
        for dt in dtype_names:
            for mode in modes:
                groups.append(Group(
                    "attention", shape.name, mode, dt, base,
                    functools.partial(attention_contenders, shape, device=device, dtype=DTYPES[dt], mode=mode,
                                      backends=config.backends, quick=config.quick,
                                      batch_size=config.batch_size)))

    models = select_models(config.models) if config.models is None or config.models else []
    for i, name in enumerate(models):
        headline = i == 0 and name == HEADLINE_MODEL and config.models is None
        if config.batch_size:
            batch = config.batch_size
        else:
            batch = 8 if (headline or name == HEADLINE_MODEL) else (8 if cuda else 2)
            if config.quick:
                batch = 2
        backends = config.backends
        if backends is None and not headline and config.models is None:
            backends = ["auto"]  # the default run's budget: the full backend sweep on the headline model
        extra = []
        if headline and not explicit_dtypes and _bf16_ok(device):
            extra = [torch.bfloat16]
        for mode in modes:
            groups.append(Group(
                "model", name, mode, None if extra else "+".join(dtype_names),
                base * (5 if headline else 1),
                functools.partial(model_contenders, name, device=device, dtypes=[DTYPES[d] for d in dtype_names],
                                  mode=mode, batch_size=batch, backends=backends, vit_pytorch=config.vit_pytorch,
                                  timm=config.timm, quick=config.quick, extra_auto_dtypes=extra,
                                  timm_compile=config.timm_compile)))
    return groups


def _ratio(baseline: Optional[float], t: Optional[float]) -> Optional[float]:
    if baseline is None or t is None or t <= 0:
        return None
    return baseline / t


def _attention_rows(group: Group, contenders: list, dims: tuple, measured: dict, device: str = "cpu") -> list:
    B, H, Nq, Nk, D, Dv = dims
    shape = next(s for s in ATTENTION_SHAPES if s.name == group.name)
    dtype = DTYPES[group.dtype]
    peak = peak_tflops(device, dtype)
    ref = measured.get("reference")
    ref_t = ref.median if ref is not None and ref.ok else None
    rows = []
    for c in contenders:
        m = measured[c.name]
        row = {"kind": "attention", "name": group.name, "contender": c.name, "backend": c.meta.get("backend"),
               "served_by": c.meta.get("served_by"), "dtype": group.dtype, "mode": group.mode,
               "bias": shape.bias, "cls_probs": shape.cls_probs,
               "shape": {"B": B, "H": H, "Nq": Nq, "Nk": Nk, "D": D, "Dv": Dv}, "source": shape.source}
        row.update(m.row())
        if c.skip_reason is not None:
            row.update(status="skipped", reason=c.skip_reason)
        elif not m.ok:
            row.update(status="error", reason=m.error or "no samples")
        else:
            t = m.median
            gflops = attention_flops(dims, group.mode) / t * 1e-9
            row.update(status="ok", reason="", gflops=gflops, tflops=gflops * 1e-3,
                       pct_peak=100.0 * gflops * 1e-3 / peak if peak else None, peak_tflops=peak,
                       gbps=attention_bytes(dims, dtype, group.mode) / t * 1e-9,
                       x_reference=_ratio(ref_t, t))
        rows.append(row)
    return rows


def _model_rows(group: Group, contenders: list, info: dict, measured: dict, batch_size: int) -> list:
    by_name = {c.name: c for c in contenders}

    def median_of(name: str) -> Optional[float]:
        m = measured.get(name)
        return m.median if m is not None and m.ok and by_name[name].skip_reason is None else None

    rows = []
    for c in contenders:
        m = measured[c.name]
        dt = c.meta["dtype"]
        row = {"kind": "model", "name": group.name, "contender": c.name, "impl": c.meta["impl"],
               "backend": c.meta.get("backend"), "dtype": dt, "mode": group.mode, "batch_size": batch_size,
               "input_size": info["input_size"], "params": info["params"], "vit_pytorch": info["vit_pytorch"],
               "timm_model": info.get("timm_model"), "compiled": bool(c.meta.get("compiled"))}
        row.update(m.row())
        if c.skip_reason is not None:
            row.update(status="skipped", reason=c.skip_reason)
        elif not m.ok:
            row.update(status="error", reason=m.error or "no samples")
        else:
            t = m.median
            same_fp32 = c.name.rsplit(" ", 1)[0] + " fp32"
            row.update(status="ok", reason="", img_per_s=batch_size / t,
                       x_vit_pytorch=_ratio(median_of(f"vit-pytorch {dt}"), t),
                       x_timm=_ratio(median_of(f"timm {dt}"), t),
                       x_fp32=_ratio(median_of(same_fp32), t) if dt != "fp32" and same_fp32 in by_name else None)
        rows.append(row)
    return rows


def run_group(group: Group, config: BenchConfig, on_round: Optional[Callable[[float], None]] = None) -> list:
    """Build, time and summarise one group; a group that fails to build becomes one error row."""
    device = config.resolved_device()
    try:
        built = group.build()
    except Exception as e:  # noqa: BLE001
        return [{"kind": group.kind, "name": group.name, "contender": None, "dtype": group.dtype,
                 "mode": group.mode, "status": "error", "reason": f"building the group failed: "
                 f"{type(e).__name__}: {e}"}]
    contenders, extra = built
    started = time.perf_counter()
    measured = time_interleaved(contenders, device, budget_s=group.budget_s, min_samples=config.min_samples,
                                measure_memory=config.memory, on_round=on_round)
    wall = time.perf_counter() - started
    if group.kind == "attention":
        rows = _attention_rows(group, contenders, extra, measured, device)
    else:
        rows = _model_rows(group, contenders, extra, measured, group.build.keywords["batch_size"])
    for row in rows:
        row["group_wall_s"] = wall
        if extra and isinstance(extra, dict) and extra.get("notes"):
            row["notes"] = list(extra["notes"])
    return rows


def run_bench(config: BenchConfig, on_group: Optional[Callable[[int, int, Group], None]] = None,
              on_round: Optional[Callable[[float], None]] = None,
              on_partial: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every planned group and return the results document.

    Args:
        config: what to run.
        on_group: called as ``on_group(i, n, group)`` before group ``i`` of ``n`` starts.
        on_round: called with the fraction of the current group's budget spent after each round.
        on_partial: called with the document so far (``"complete": False``) after each group, so a
            run that is killed half-way still leaves its results behind.
    """
    device = config.resolved_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    if config.threads:
        torch.set_num_threads(config.threads)
    if torch.device(device).type == "cpu":
        # Random-init weights and activations produce denormals on the CPU, which are 10-100x slower.
        torch.set_flush_denormal(True)
    allocator = None
    if config.tune_allocator:
        from fastvit.runtime import tune_cpu_allocator

        allocator = dataclasses.asdict(tune_cpu_allocator())
    groups = plan(config)
    started = time.perf_counter()
    doc = {"schema_version": SCHEMA_VERSION, "kind": "fastvit-bench"}
    doc.update(environment(device))
    doc["cpu_allocator"] = allocator or {"applied": False, "reason": "not asked for (--tune-allocator)"}
    cfg = asdict(config)
    cfg["device"] = device
    doc.update(dtype=cfg["dtypes"] or ["fp32"], config=cfg, complete=False, wall_s=0.0, results=[])
    limit = config.resolved_max_seconds()
    overheads = []  # per group: wall time beyond its timing budget (builds, warm-ups, profiling)
    for i, group in enumerate(groups):
        if limit:
            rest = groups[i:]
            overhead = statistics.mean(overheads) if overheads else 2.0
            time_left = limit - (time.perf_counter() - started) - overhead * len(rest)
            scale = min(1.0, max(0.05, time_left / sum(g.budget_s for g in rest)))
            group = dataclasses.replace(group, budget_s=group.budget_s * scale)
        if on_group is not None:
            on_group(i, len(groups), group)
        group_started = time.perf_counter()
        rows = run_group(group, config, on_round)
        overheads.append(max(0.0, time.perf_counter() - group_started - group.budget_s))
        for row in rows:
            row["group_budget_s"] = group.budget_s
        doc["results"].extend(rows)
        doc["wall_s"] = time.perf_counter() - started
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if on_partial is not None and i + 1 < len(groups):
            on_partial(doc)
    doc["complete"] = True
    doc["host"]["cpu_pressure_avg10_end"] = cpu_pressure()
    return doc


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------

_TOP_LEVEL = {"schema_version": int, "kind": str, "device": str, "device_type": str, "dtype": list,
              "versions": dict, "git_commit": (str, type(None)), "timestamp": str, "config": dict,
              "results": list}
_ROW = {"kind": str, "name": str, "mode": str, "status": str}
_OK_ROW = {"median_ms": float, "min_ms": float, "samples": int, "calls": int}


def validate_document(doc: dict) -> list:
    """Problems with a results document (an empty list means it follows the schema)."""
    problems = []
    for key, kind in _TOP_LEVEL.items():
        if key not in doc:
            problems.append(f"missing top-level key {key!r}")
        elif not isinstance(doc[key], kind):
            problems.append(f"{key!r} is {type(doc[key]).__name__}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {doc.get('schema_version')!r} != {SCHEMA_VERSION}")
    for key in ("torch", "triton", "timm", "vit-pytorch"):
        if key not in doc.get("versions", {}):
            problems.append(f"versions lacks {key!r}")
    for i, row in enumerate(doc.get("results", [])):
        for key, kind in _ROW.items():
            if not isinstance(row.get(key), kind):
                problems.append(f"results[{i}].{key} is missing or not {kind.__name__}")
        if row.get("status") not in ("ok", "skipped", "error"):
            problems.append(f"results[{i}].status is {row.get('status')!r}")
        if row.get("status") == "ok":
            for key, kind in _OK_ROW.items():
                if not isinstance(row.get(key), (kind, int) if kind is float else kind):
                    problems.append(f"results[{i}].{key} is missing or not {kind.__name__}")
            if row["kind"] == "model" and not isinstance(row.get("img_per_s"), float):
                problems.append(f"results[{i}].img_per_s is missing")
            if row["kind"] == "attention" and not isinstance(row.get("gflops"), float):
                problems.append(f"results[{i}].gflops is missing")
        elif not row.get("reason"):
            problems.append(f"results[{i}] is {row.get('status')} without a reason")
    return problems
