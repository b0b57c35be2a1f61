"""Ahead-of-time compilation for sm_80 / sm_90a without a GPU (a representative subset; the full
report is `fastvit kernels`)."""

from __future__ import annotations

import pytest
import torch
from fastvit.kernels import aot
from fastvit.kernels import attention as kattn


def test_every_launch_config_is_in_the_compile_specs():
    specs = {(s.kernel, s.config, s.block_d) for s in kattn.iter_compile_specs()}
    for nq, d in [(197, 64), (49, 16), (3136, 64), (1, 32), (4096, 64), (50, 128)]:
        block_d = kattn._block_dim(d)
        assert ("_attn_fwd", kattn._pick_fwd_config(nq, block_d), block_d) in specs
        bwd = kattn._pick_bwd_config(block_d)
        assert ("_attn_bwd_dkdv", bwd, block_d) in specs and ("_attn_bwd_dq", bwd, block_d) in specs


def test_specs_cover_every_dtype_and_head_dim_bucket():
    specs = list(kattn.iter_compile_specs())
    assert {s.dtype for s in specs} == {"fp16", "bf16", "fp32"}
    assert {s.block_d for s in specs} == {16, 32, 64, 128}
    assert {s.kernel for s in specs} == set(kattn.KERNELS)


@pytest.mark.slow
def test_representative_kernels_compile_for_sm80_and_sm90a():
    specs = [s for s in kattn.iter_compile_specs(dtypes=(torch.bfloat16,), block_dims=(64,), variants=("relpos",))
             if s.kernel in ("_attn_fwd", "_attn_bwd_dq") and (s.kernel != "_attn_fwd" or s.config.block_m == 64)]
    rows = aot.compile_report((80, 90), specs=specs)
    assert len(rows) == 2 * len(specs) and len(specs) >= 3
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    assert all(r["registers"] and r["registers"] > 0 for r in rows)
    assert "compiled, 0 failed" in aot.format_report(rows)
