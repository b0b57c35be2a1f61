"""Every backend against the reference on fp32 copies: forward and the gradients of q, k, v and of
trainable biases, over the cases each backend declares (``fastvit.attention.testing``, the same cases
and comparison ``fastvit check`` runs).

Cases run on CUDA tensors when a CUDA device is present (the triton kernels compiled, more and larger
shapes) and on the CPU otherwise (triton under ``TRITON_INTERPRET=1``, small shapes only).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from fastvit.attention import BACKENDS, KeyPaddingMask, attend, get_backend
from fastvit.attention import make_inputs as attn_inputs
from fastvit.attention import testing as check
from fastvit.tools.check import run_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = check.generate_cases(BACKENDS, DEVICE, dtypes=[torch.float32, torch.bfloat16, torch.float16],
                             declared_only=True)
# The reference's fp32 path is the oracle itself; its half-precision paths are checked against it.
CASES += [check.CheckCase("reference", DEVICE, dtype, shape, bias) for dtype in (torch.bfloat16, torch.float16)
          for shape in check.SHAPES for bias in check.BIAS_KINDS]
CASES += [check.CheckCase.windowed("reference", DEVICE, dtype, window, bias)
          for dtype in (torch.bfloat16, torch.float16)
          for window in check.WINDOW_SHAPES for bias in check.WINDOW_BIAS_KINDS]
CASES += [check.CheckCase.packed_case("reference", DEVICE, dtype, shape, bias)
          for dtype in (torch.bfloat16, torch.float16)
          for shape in check.PACKED_SHAPES for bias in check.PACKED_BIAS_KINDS]


def _slow_here(case: check.CheckCase) -> bool:
    """The CPU runs triton in its numpy interpreter and flex uncompiled: keep their share small there."""
    if case.device != "cpu":
        return False
    Nq, Nk = case.shape[2], case.shape[3]
    logits = Nq * (Nk if case.window is None else case.window.tokens)  # a window's queries see its n keys
    if case.packed is not None:  # each sequence sees its own keys
        logits = sum(a * b for a, b in zip(case.packed.lengths, case.packed.kv_lengths))
    if case.backend == "triton":
        return logits > 100 * 100 or case.dtype == torch.float16
    if case.backend == "flex":
        return logits > 100 * 100 or case.dtype != torch.float32
    return False


def _skip_unavailable(name: str):
    ok, why = get_backend(name).availability()
    if not ok:
        pytest.skip(f"{name} unavailable: {why}")


@pytest.mark.parametrize("case", [c for c in CASES if not _slow_here(c)], ids=lambda c: c.id)
def test_backend_matches_reference(case: check.CheckCase):
    _skip_unavailable(case.backend)
    res = run_case(case)
    assert res.status != "skip", f"{case.backend} declares support for {case.id} but refuses it: {res.reason}"
    assert res.status == "pass", (f"{case.id}: {res.status}: {res.reason}; worst {res.worst}: max abs err "
                                  f"{res.max_abs_err} at {res.index} (atol {res.atol}, rtol {res.rtol}); "
                                  f"all errors {res.errors}")


def test_cases_cover_every_registered_backend_on_this_device():
    covered = {c.backend for c in CASES}
    for name, backend in BACKENDS.items():
        if name != "reference" and DEVICE in backend.devices and backend.availability()[0]:
            assert name in covered, f"no generated cases for {name}"


def test_cuda_cases_include_the_large_shapes():
    cases = check.generate_cases(["sdpa"], "cuda", [torch.float32])
    lengths = {c.shape[2] for c in cases}
    assert {1, 49, 50, 197, 577, 785} <= lengths
    assert 785 not in {c.shape[2] for c in check.generate_cases(["sdpa"], "cpu", [torch.float32])}


@pytest.mark.parametrize("backend", [n for n in BACKENDS if n != "reference"])
def test_fully_masked_rows_are_zero_not_nan(backend):
    _skip_unavailable(backend)
    b = get_backend(backend)
    case = check.CheckCase(backend, DEVICE, torch.float32, (2, 2, 5, 7, 16, 16), "padding")
    q, k, v, bias = check.make_case_inputs(case, requires_grad=False)
    inp = attn_inputs(q, k, v, bias=bias)
    if b.not_supported_reasons(inp):
        pytest.skip(f"{backend} refuses: {b.not_supported_reasons(inp)}")
    out = attend(q, k, v, bias=bias, backend=backend)
    assert not torch.isnan(out).any()
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # sample 1 has no valid key at all


# CLS-probability cases: on CUDA ViT-S/B sizes and a partial last key block; on the CPU (interpreter,
# uncompiled flex) one small fp32 shape.
CLS_CASES = [check.CheckCase(name, DEVICE, dtype, shape, bias)
             for name, b in BACKENDS.items() if b.supports_cls_probs and name != "reference"
             for dtype in ((torch.float32, torch.bfloat16) if DEVICE == "cuda" else (torch.float32,))
             for shape in ([(2, 3, 17, 17, 16, 16), (2, 2, 49, 49, 32, 32), (2, 6, 197, 197, 64, 64),
                            (1, 2, 785, 785, 64, 64)] if DEVICE == "cuda" else [(2, 3, 17, 17, 16, 16)])
             for bias in ("none", "relpos", "relpos+padding", "dense")]


@pytest.mark.parametrize("case", CLS_CASES, ids=lambda c: c.id)
def test_cls_probs_match_reference(case: check.CheckCase):
    """The probabilities of query 0 over all keys (adaptive token sampling), and the output with them."""
    backend, dtype, shape = case.backend, case.dtype, case.shape
    _skip_unavailable(backend)
    q, k, v, bias_desc = check.make_case_inputs(case, requires_grad=False)
    reasons = get_backend(backend).not_supported_reasons(attn_inputs(q, k, v, bias=bias_desc, return_cls_probs=True))
    assert not reasons, f"{backend} declares CLS probabilities but refuses {case.id}: {reasons}"
    res = attend(q, k, v, bias=bias_desc, return_cls_probs=True, backend=backend)
    q32, k32, v32, bias32 = check.fp32_copy(q, k, v, bias_desc)
    ref = attend(q32, k32, v32, bias=bias32, return_cls_probs=True, backend="reference")
    atol, rtol = get_backend(backend).tolerances[dtype]
    assert res.cls_probs.dtype == dtype and res.cls_probs.shape == (shape[0], shape[1], shape[3])
    assert_close(res.cls_probs, ref.cls_probs, atol=atol, rtol=rtol, what=f"{case.id} cls_probs")
    assert_close(res.out, ref.out, atol=atol, rtol=rtol, what=f"{case.id} out")
    if any(isinstance(b, KeyPaddingMask) for b in bias_desc):
        padded = ~bias_desc[-1].mask  # (B, Nk)
        assert torch.all(res.cls_probs.float().permute(0, 2, 1)[padded] == 0), "padded keys got probability"


def test_reference_return_probs_and_cls_probs_are_consistent():
    case = check.CheckCase("reference", "cpu", torch.float32, (2, 3, 10, 12, 16, 16), "relpos+padding")
    q, k, v, bias = check.make_case_inputs(case, requires_grad=False)
    res = attend(q, k, v, bias=bias, return_probs=True, return_cls_probs=True)
    assert res.probs.shape == (2, 3, 10, 12) and res.cls_probs.shape == (2, 3, 12)
    assert torch.equal(res.cls_probs, res.probs[:, :, 0])
    sums = res.probs[0].sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert torch.allclose(res.out, res.probs @ v, atol=1e-6)
    assert torch.all(res.probs[0][..., ~bias[1].mask[0]] == 0), "padded keys must get zero probability"


def test_reference_matches_textbook_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    assert_close(attend(q, k, v, backend="reference"), expected, atol=1e-6, rtol=1e-6, what="reference")
    assert_close(attend(q, k, v, scale=0.3, backend="reference"),
                 torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v, atol=1e-6, rtol=1e-6, what="scale")


def test_dropout_is_applied_and_scaled():
    q, k = torch.zeros(1, 1, 2000, 4), torch.zeros(1, 1, 10, 4)
    v = torch.ones(1, 1, 10, 4)
    torch.manual_seed(0)
    out = attend(q, k, v, dropout_p=0.5, backend="reference")
    # Uniform probabilities 0.1 over 10 keys; with p=0.5 each kept one becomes 0.2, so each output
    # row is 0.2 * (number kept) with expected value 1.
    row = out[0, 0, :, 0]
    assert 0.9 < row.mean().item() < 1.1
    assert row.std().item() > 0.1


@pytest.mark.parametrize("bias", ["relpos", "dense_bcast"])
def test_triton_serves_bias_gradients_bitwise_reproducibly_in_deterministic_mode(bias):
    """With torch.use_deterministic_algorithms(True) the triton backend still serves trainable biases
    (no atomics in its bias gradients), and two backward passes give the same bits."""
    _skip_unavailable("triton")
    kattn = pytest.importorskip("fastvit.kernels.attention")
    assert get_backend("triton").deterministic is kattn.DETERMINISTIC_BIAS_GRADS is True
    case = check.CheckCase("triton", DEVICE, torch.float32, (2, 3, 49, 49, 16, 16), bias)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        grads = []
        for _ in range(2):
            q, k, v, bias_desc = check.make_case_inputs(case)
            assert not get_backend("triton").not_supported_reasons(attn_inputs(q, k, v, bias=bias_desc))
            out = attend(q, k, v, bias=bias_desc, backend="triton")
            out.backward(torch.ones_like(out))
            grads.append([t.grad.clone() for _, t in check.trainable(q, k, v, bias_desc)])
    finally:
        torch.use_deterministic_algorithms(saved)
    for first, second in zip(*grads):
        assert torch.equal(first, second)
