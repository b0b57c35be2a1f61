"""Random shapes, head dims, dtypes and bias combinations against attention_ref (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention_interpret import Case, run_and_compare

HEAD_DIMS = st.sampled_from([8, 16, 24, 32, 48, 64, 80])


@st.composite
def cases(draw) -> Case:
    nq = draw(st.integers(1, 70))
    biases = tuple(b for b in ("relpos", "dense", "pad") if draw(st.booleans()))
    return Case(
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        B=draw(st.integers(1, 2)),
        H=draw(st.integers(1, 2)),
        Nq=nq,
        Nk=draw(st.one_of(st.just(nq), st.integers(1, 70))),
        D=draw(HEAD_DIMS),
        Dv=draw(HEAD_DIMS),
        biases=biases,
        dense_shape=draw(st.sampled_from(["1H", "B1", "BH", "11"])),
        dense_grad=draw(st.booleans()),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_cases_match_reference(case, device):
    run_and_compare(case, device)
