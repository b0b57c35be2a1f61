"""Attention shapes named after real models, every backend + auto (``pytest benchmarks/ --benchmark-only``).

A backend that refuses a shape (or is unavailable) is skipped with its reason. ``extra_info`` carries
GFLOP/s-ready numbers: the FLOPs and the minimal bytes of the call.
"""

from __future__ import annotations

import pytest
from shapes import ATTENTION_SHAPES

from fastvit.attention import BACKENDS, DTYPES
from fastvit.tools.contenders import attention_contenders
from fastvit.tools.shapes import attention_bytes, attention_flops

CONTENDERS = [*BACKENDS, "auto"]


@pytest.mark.parametrize("backend", CONTENDERS)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: s.name)
def test_attention(run_benchmark, shape, backend, bench_device, bench_dtype, bench_mode, bench_quick):
    dtype = DTYPES[bench_dtype]
    contenders, dims = attention_contenders(shape, device=bench_device, dtype=dtype, mode=bench_mode,
                                            backends=[backend], quick=bench_quick)
    contender = contenders[0]
    if contender.skip_reason:
        pytest.skip(f"{backend}: {contender.skip_reason}")
    run_benchmark(contender.fn, group=f"{shape.name} {bench_dtype} {bench_mode}", shape=list(dims),
                  flops=attention_flops(dims, bench_mode), bytes=attention_bytes(dims, dtype, bench_mode),
                  served_by=contender.meta.get("served_by"))
