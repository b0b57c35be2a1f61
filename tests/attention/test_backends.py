"""Every backend against the reference on fp32 copies: forward and the gradients of q, k, v and of
trainable biases, over cases generated from what each backend declares."""

from __future__ import annotations

import pytest
import torch
from cases import Case, fp32_copy, generate, make_inputs, trainable
from helpers import assert_close

from fastvit.attention import BACKENDS, attend, get_backend
from fastvit.attention import make_inputs as attn_inputs

CASES = generate(BACKENDS, "cpu")


def _slow_under_interpreter(case: Case) -> bool:
    # The Triton interpreter runs kernels in numpy: keep its share of the suite small.
    return case.backend == "triton" and (case.shape[2] * case.shape[3] > 64 * 64 or case.dtype == torch.float16)


@pytest.mark.parametrize("case", [c for c in CASES if not _slow_under_interpreter(c)], ids=lambda c: c.id)
def test_backend_matches_reference(case: Case):
    backend = get_backend(case.backend)
    ok, why = backend.availability()
    if not ok:
        pytest.skip(f"{case.backend} unavailable: {why}")
    q, k, v, bias = make_inputs(case)
    reasons = backend.not_supported_reasons(attn_inputs(q, k, v, bias=bias))
    assert not reasons, f"{case.backend} declares support for {case.id} but refuses it: {reasons}"

    out = attend(q, k, v, bias=bias, backend=case.backend)
    q32, k32, v32, bias32 = fp32_copy(q, k, v, bias)
    ref = attend(q32, k32, v32, bias=bias32, backend="reference")
    atol, rtol = backend.tolerances[case.dtype]
    assert out.dtype == case.dtype
    assert_close(out, ref, atol=atol, rtol=rtol, what=f"{case.id} forward")

    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    names = ["q", "k", "v", "bias"]
    for name, t, t32 in zip(names + ["bias2"], trainable(q, k, v, bias), trainable(q32, k32, v32, bias32)):
        assert t.grad is not None, f"{case.id}: no gradient for {name}"
        # Gradients accumulate over Nq*Nk terms; scale the tolerance by the magnitude of the reference.
        scale = max(1.0, t32.grad.abs().max().item())
        assert_close(t.grad, t32.grad, atol=atol * scale * 4, rtol=rtol * 4, what=f"{case.id} grad {name}")


def test_cases_cover_every_registered_cpu_backend():
    covered = {c.backend for c in CASES}
    for name, backend in BACKENDS.items():
        if name != "reference" and "cpu" in backend.devices:
            assert name in covered, f"no generated cases for {name}"


@pytest.mark.parametrize("backend", [n for n in BACKENDS if n != "reference"])
def test_fully_masked_rows_are_zero_not_nan(backend):
    b = get_backend(backend)
    ok, why = b.availability()
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")
    case = Case(backend, "cpu", torch.float32, (2, 2, 5, 7, 16, 16), "padding")
    q, k, v, bias = make_inputs(case, requires_grad=False)
    inp = attn_inputs(q, k, v, bias=bias)
    if b.not_supported_reasons(inp):
        pytest.skip(f"{backend} refuses: {b.not_supported_reasons(inp)}")
    out = attend(q, k, v, bias=bias, backend=backend)
    assert not torch.isnan(out).any()
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # sample 1 has no valid key at all


def test_reference_return_probs_and_cls_probs_are_consistent():
    case = Case("reference", "cpu", torch.float32, (2, 3, 10, 12, 16, 16), "relpos+padding")
    q, k, v, bias = make_inputs(case, requires_grad=False)
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
    g = torch.Generator().manual_seed(0)
    q, k = torch.zeros(1, 1, 2000, 4), torch.zeros(1, 1, 10, 4)
    v = torch.ones(1, 1, 10, 4)
    del g
    torch.manual_seed(0)
    out = attend(q, k, v, dropout_p=0.5, backend="reference")
    # Uniform probabilities 0.1 over 10 keys; with p=0.5 each kept one becomes 0.2, so each output
    # row is 0.2 * (number kept) with expected value 1.
    row = out[0, 0, :, 0]
    assert 0.9 < row.mean().item() < 1.1
    assert row.std().item() > 0.1
