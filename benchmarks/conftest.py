"""Options and helpers of the pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``).

    pytest benchmarks/ --benchmark-only                               # CUDA if available, else CPU; fp32
    pytest benchmarks/ --benchmark-only --bench-dtype bf16 --bench-backward
    pytest benchmarks/ --benchmark-only --bench-quick                 # tiny sizes: a smoke run
    pytest benchmarks/test_models_bench.py --benchmark-only --bench-models 'vit_*'

Tests are grouped per shape / model, dtype and mode, so pytest-benchmark's table compares the
contenders of one group. For ratios from one interleaved run use ``fastvit bench`` instead: pytest-
benchmark times the contenders one after the other.
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # benchmarks/shapes.py

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_addoption(parser):
    group = parser.getgroup("fastvit benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-dtype", default="fp32", help="comma-separated: fp32, bf16, fp16")
    group.addoption("--bench-backward", action="store_true", help="also time forward + backward")
    group.addoption("--bench-quick", action="store_true", help="tiny sizes (smoke run)")
    group.addoption("--bench-models", default=None, help="comma-separated model globs (default: fastvit "
                                                         "bench's default selection)")
    group.addoption("--bench-batch-size", type=int, default=None, help="model batch size")
    group.addoption("--bench-seconds", type=float, default=1.0, help="approximate time per benchmark")


def _device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtypes(config) -> list:
    return [d.strip() for d in config.getoption("--bench-dtype").split(",") if d.strip()]


def _modes(config) -> list:
    return ["fwd", "fwd+bwd"] if config.getoption("--bench-backward") else ["fwd"]


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "bench_dtype" in metafunc.fixturenames:
        metafunc.parametrize("bench_dtype", _dtypes(config))
    if "bench_mode" in metafunc.fixturenames:
        metafunc.parametrize("bench_mode", _modes(config))
    if "bench_model" in metafunc.fixturenames:
        from fastvit.tools.contenders import select_models

        patterns = config.getoption("--bench-models")
        names = select_models(patterns.split(",") if patterns else None)
        metafunc.parametrize("bench_model", names)


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    device = _device(request.config)
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device")
    if device == "cpu":
        torch.set_flush_denormal(True)
    return device


@pytest.fixture(scope="session")
def bench_quick(request) -> bool:
    return request.config.getoption("--bench-quick")


@pytest.fixture(scope="session")
def bench_batch_size(request):
    return request.config.getoption("--bench-batch-size")


@pytest.fixture
def run_benchmark(benchmark, request, bench_device):
    """``run_benchmark(fn, group=..., **extra_info)``: warm up, pick rounds and iterations from the cost
    of one call (about ``--bench-seconds`` in all), synchronise CUDA inside the timed call."""
    seconds = request.config.getoption("--bench-seconds")
    cuda = bench_device.startswith("cuda")

    def timed(fn):
        if not cuda:
            return fn

        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out

        return synced

    def run(fn, *, group: str, **extra):
        call = timed(fn)
        for _ in range(3 if cuda else 1):
            call()
        t0 = time.perf_counter()
        call()
        one = max(time.perf_counter() - t0, 1e-6)
        iterations = max(1, min(100, math.ceil((2e-3 if cuda else 1e-2) / one)))
        rounds = max(3, min(50, int(seconds / (one * iterations))))
        benchmark.group = group
        benchmark.extra_info.update(extra)
        return benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)

    return run
