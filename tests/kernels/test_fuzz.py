"""Random shapes, head dims, dtypes and bias combinations against attention_ref (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import run_and_compare, triton_case

from fastvit.attention.testing import BIAS_PARTS

HEAD_DIMS = st.sampled_from([8, 16, 24, 32, 48, 64, 80])
DENSE_PARTS = [part for part in BIAS_PARTS if part.startswith("dense")]


@st.composite
def cases(draw) -> tuple:
    """``(case, options)``: a shared case of random sizes and bias parts, and the launcher-only options."""
    nq = draw(st.integers(1, 70))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), nq, draw(st.one_of(st.just(nq), st.integers(1, 70))),
             draw(HEAD_DIMS), draw(HEAD_DIMS))
    dense = draw(st.sampled_from(DENSE_PARTS))
    parts = [part for part in ("relpos", dense, "padding") if draw(st.booleans())]
    case = triton_case(draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])), shape,
                       "+".join(parts) or "none")
    options = dict(index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                   frozen=() if draw(st.booleans()) else ("dense_bias",))
    return case, options


@pytest.mark.usefixtures("device")
@settings(max_examples=15, deadline=None, derandomize=True)
@given(drawn=cases())
def test_random_cases_match_reference(drawn):
    case, options = drawn
    run_and_compare(case, **options)
