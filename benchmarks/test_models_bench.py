"""Whole-model throughput: fastvit under each backend selection and auto, vit-pytorch with the same
weights, timm's equivalent (``pytest benchmarks/ --benchmark-only``).

Models are the ones ``fastvit bench`` selects by default (the headline ViT-S/16 and one preset per
vit-pytorch architecture, so new registry entries show up by themselves), or ``--bench-models``.
Each model is built once per (device, dtype, mode) and shared by its contenders.
"""

from __future__ import annotations

import functools

import pytest

from fastvit.attention import BACKENDS, DTYPES
from fastvit.tools.contenders import HEADLINE_MODEL, model_contenders

CONTENDERS = [f"fastvit[{b}]" for b in (*BACKENDS, "auto")] + ["vit-pytorch", "timm"]


@functools.lru_cache(maxsize=2)  # keep at most two models' worth of weights alive
def _contenders(name: str, device: str, dtype: str, mode: str, batch_size: int, quick: bool) -> dict:
    contenders, info = model_contenders(name, device=device, dtypes=[DTYPES[dtype]], mode=mode,
                                        batch_size=batch_size, quick=quick)
    return {c.name.rsplit(" ", 1)[0]: c for c in contenders}


@pytest.mark.parametrize("contender", CONTENDERS)
def test_model(run_benchmark, bench_model, contender, bench_device, bench_dtype, bench_mode, bench_quick,
               bench_batch_size):
    batch = bench_batch_size or (2 if bench_quick else 8 if bench_model == HEADLINE_MODEL else 2)
    contenders = _contenders(bench_model, bench_device, bench_dtype, bench_mode, batch, bench_quick)
    c = contenders[contender]
    if c.skip_reason:
        pytest.skip(f"{contender}: {c.skip_reason}")
    benchmark_result = run_benchmark(c.fn, group=f"{bench_model} {bench_dtype} {bench_mode} bs{batch}",
                                     batch_size=batch, impl=c.meta["impl"], backend=c.meta.get("backend"))
    assert benchmark_result is not None
