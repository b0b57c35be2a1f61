"""Interleaved timing and peak memory (after xformers' benchmark harness).

Timing: warm-up, one call under the memory profiler, then rounds in which every contender takes one
sample in a rotating order until the group's time budget is spent (at least ``min_samples`` each).
A sample is ``inner`` back-to-back calls (enough to last ~10 ms on the CPU, ~2 ms on CUDA), timed with
``time.perf_counter`` on the CPU and ``torch.cuda.Event`` pairs on CUDA. The reported time is the
median sample.

Confidence intervals: sample ``i`` of two contenders comes from the same round, so the pair saw the same
machine (another process's burst of work, a frequency step). ``ratio_interval`` bootstraps over rounds: it
resamples round indices with replacement, the same indices for both contenders, and takes the
percentile interval of ``median(base) / median(x)``; load that slows both contenders of a round cancels
in the ratio instead of widening it. ``time_interleaved`` can watch pairs of contenders and keep sampling
past the budget (up to its hard cap) until each watched ratio is known to ``±precision``.

Peak memory is the growth of allocated memory above what was allocated before the call:
``torch.cuda.max_memory_allocated`` on CUDA, the allocation events of ``torch.profiler`` on the CPU
(torch's CPU allocations are invisible to ``tracemalloc``).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch


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
    rounds: list = field(default_factory=list)  # the round of each sample; -1: the profiled call
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
                     on_round: Optional[Callable[[float], None]] = None, precision: float = 0.05,
                     watch: Sequence[tuple] = ()) -> dict:
    """Time ``contenders`` in one interleaved run; returns ``{name: Measurement}``.

    Every contender is warmed up (its first call also estimates its cost), run once under the memory
    profiler, then the rounds start: each round takes one sample of every contender, in an order that
    rotates from round to round so that drift and cache effects spread evenly. The rounds stop once
    ``budget_s`` is spent and each contender has ``min_samples`` (or ``max_samples``), and in any case
    after ``hard_cap_factor * budget_s`` with at least one sample each, so one slow contender cannot
    blow the budget. A contender that raises is reported with its error and dropped; the others go on.
    ``on_round`` receives the fraction of the budget spent after each round. A contender whose warm-up
    call took longer than ``slow_call_s`` keeps its profiled call as a sample.

    ``watch`` lists ``(base, contender)`` name pairs whose ratio the caller reports. Once the budget is
    spent, the rounds go on while any watched ratio's interval (``ratio_interval``) is wider than
    ``±precision`` of the ratio (``unsettled``), until the hard cap; the caller asks ``unsettled`` again
    to learn which ones never settled. Pairs with a skipped or failed contender are not watched.
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
                    m.rounds.append(-1)
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
                m.rounds.append(round_no)
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
            names = {c.name for c in live}
            watched = [(a, b) for a, b in watch if a in names and b in names]
            if not unsettled(results, watched, precision):
                break
        # The hard cap counts the warm-up and profiling too: on a loaded machine they alone can
        # take longer than the budget.
        if time.perf_counter() - entered >= hard_cap_factor * budget_s and min(counts) >= 1:
            break
    return results


CI_LEVEL = 0.95
MIN_PAIRS = 3  # fewer paired rounds give no interval worth the name (a bootstrap of one pair is a point)


def paired_samples(base: Measurement, other: Measurement) -> tuple:
    """``(base samples, other samples)`` of the rounds both took a sample in, in round order (the
    profiled samples of slow contenders, round -1, are not paired: they were not taken together)."""
    if len(base.rounds) != len(base.samples) or len(other.rounds) != len(other.samples):
        n = min(len(base.samples), len(other.samples))  # built by hand, without rounds: position = round
        return list(base.samples[:n]), list(other.samples[:n])
    by_round = {r: s for r, s in zip(base.rounds, base.samples) if r >= 0}
    pairs = [(by_round[r], s) for r, s in zip(other.rounds, other.samples) if r in by_round]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _bootstrap(base_samples: Sequence[float], samples: Sequence[float], statistic, *, level: float,
               resamples: int, seed: int) -> tuple:
    if len(base_samples) != len(samples):
        raise ValueError(f"paired samples must have one entry per round: {len(base_samples)} != {len(samples)}")
    if not samples:
        raise ValueError("no paired samples")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    base = torch.tensor(list(base_samples), dtype=torch.float64)
    x = torch.tensor(list(samples), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    rounds = torch.randint(len(x), (resamples, len(x)), generator=generator)  # the same rounds for both
    # quantile 0.5 averages the two middle values, as statistics.median (the reported median) does
    stats = statistic(base[rounds].quantile(0.5, dim=1), x[rounds].quantile(0.5, dim=1))
    tail = (1.0 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high


def ratio_interval(base_samples: Sequence[float], samples: Sequence[float], *, level: float = CI_LEVEL,
                   resamples: int = 1000, seed: int = 0) -> tuple:
    """Bootstrap interval ``(low, high)`` of ``median(base_samples) / median(samples)``.

    Args:
        base_samples: seconds per call of the baseline, one per round.
        samples: seconds per call of the contender, from the same rounds (``paired_samples``).
        level: coverage of the percentile interval.
        resamples: bootstrap resamples of the round indices (drawn with replacement, the same for both).
        seed: the resampling is deterministic for a seed.

    With ``base`` = the baseline this is a speed-up (``x_timm`` = timm time / fastvit time); swap the
    arguments for a time ratio (``contender time / baseline time``).
    """
    return _bootstrap(base_samples, samples, lambda b, x: b / x, level=level, resamples=resamples, seed=seed)


def difference_interval(base_samples: Sequence[float], samples: Sequence[float], *, level: float = CI_LEVEL,
                        resamples: int = 1000, seed: int = 0) -> tuple:
    """Bootstrap interval ``(low, high)`` of ``median(samples) - median(base_samples)`` (seconds), over
    the same resampled rounds as ``ratio_interval``: what the contender costs on top of the baseline."""
    return _bootstrap(base_samples, samples, lambda b, x: x - b, level=level, resamples=resamples, seed=seed)


def relative_half_width(base: Measurement, other: Measurement, *, level: float = CI_LEVEL) -> Optional[float]:
    """Half the width of the ``median(base) / median(other)`` interval relative to the ratio (0.05 =
    ``±5%``), from their paired rounds; None with fewer than ``MIN_PAIRS`` of them."""
    a, b = paired_samples(base, other)
    if len(a) < MIN_PAIRS:
        return None
    low, high = ratio_interval(a, b, level=level)
    point = statistics.median(a) / statistics.median(b)
    return (high - low) / 2 / point


def unsettled(measured: dict, watch: Sequence[tuple], precision: float, *, level: float = CI_LEVEL) -> list:
    """The watched ``(base, contender, relative half-width or None)`` whose interval is wider than
    ``±precision`` (None: too few paired rounds to tell)."""
    wide = []
    for base, name in watch:
        width = relative_half_width(measured[base], measured[name], level=level)
        if width is None or width > precision:
            wide.append((base, name, width))
    return wide
