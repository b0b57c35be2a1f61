"""The ``flex`` backend (FlexAttention) on the CPU, uncompiled: forward and gradients against the
reference on fp32 copies, the descriptor mapping, CLS probabilities from the log-sum-exp, each
declared refusal with its reason, and the unavailable path."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close

from fastvit.attention import (
    BACKENDS,
    DenseBias,
    HeadMix,
    KeyPaddingMask,
    RelPosBias,
    attend,
    dispatch,
    explain_call,
    make_inputs,
    testing,
)
from fastvit.attention.backends import flex as flex_module
from fastvit.attention.backends.flex import FlexBackend
from fastvit.attention.testing import CheckCase, fp32_copy, grad_scale, make_case_inputs, no_tf32, trainable

if not FlexBackend.availability()[0]:
    pytest.skip(f"flex unavailable: {FlexBackend.availability()[1]}", allow_module_level=True)

# The CPU runs FlexAttention's math implementation (fp32 scores): much tighter than the class
# tolerances, which also cover the compiled CUDA kernel.
ATOL = RTOL = 1e-5

# The shared quick cases (N = 1, 49, 50, 64; Nq != Nk both ways), plus a small Dv != D (LeViT) one.
SHAPES = testing.QUICK_SHAPES + [(2, 2, 49, 36, 16, 64)]
BIAS_KINDS = testing.BIAS_KINDS


def _grad_out(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _compare_with_reference(q, k, v, bias, what, **kwargs):
    """Run flex and the reference on fp32 copies; compare the output and every gradient."""
    q32, k32, v32, bias32 = fp32_copy(q, k, v, bias)
    with no_tf32():
        out = attend(q, k, v, bias=bias, backend="flex", **kwargs)
        ref = attend(q32, k32, v32, bias=bias32, backend="reference", **kwargs)
    assert out.dtype == q.dtype
    assert_close(out, ref, atol=ATOL, rtol=RTOL, what=f"{what} forward")
    grad = _grad_out(ref.shape)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for (name, t), (_, t32) in zip(trainable(q, k, v, bias), trainable(q32, k32, v32, bias32)):
        assert t.grad is not None, f"{what}: no gradient for {name}"
        scale = grad_scale(t32.grad)
        assert_close(t.grad, t32.grad, atol=ATOL * scale, rtol=RTOL, what=f"{what} grad {name}")
    return out


@pytest.mark.parametrize("bias", BIAS_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: CheckCase("flex", "cpu", torch.float32, s).id.split("fp32-")[1])
def test_forward_and_gradients_match_reference(shape, bias):
    case = CheckCase("flex", "cpu", torch.float32, shape, bias)
    q, k, v, desc = make_case_inputs(case)
    assert FlexBackend.not_supported_reasons(make_inputs(q, k, v, bias=desc)) == []
    _compare_with_reference(q, k, v, desc, case.id)


def test_descriptors_compose():
    """Two tables, a dense bias, a broadcast dense bias and two padding masks in one call."""
    g = torch.Generator().manual_seed(3)
    B, H, Nq, Nk, D = 2, 3, 20, 24, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_() for n in (Nq, Nk, Nk))
    tables = [torch.randn(40, H, generator=g).requires_grad_() for _ in range(2)]
    index = torch.randint(0, 40, (Nq, Nk), generator=g)
    masks = [torch.rand(B, Nk, generator=g) > 0.2 for _ in range(2)]
    for m in masks:
        m[:, 0] = True
    bias = (
        RelPosBias(tables[0], index),
        RelPosBias(tables[1], index.flip(0).to(torch.uint8)),  # a narrow index dtype is gathered, not a mask
        DenseBias(torch.randn(B, H, Nq, Nk, generator=g).requires_grad_()),
        DenseBias(torch.randn(H, 1, Nk, generator=g).requires_grad_()),  # broadcast over b and q
        KeyPaddingMask(masks[0]),
        KeyPaddingMask(masks[1]),
    )
    _compare_with_reference(q, k, v, bias, "composed")


def test_strided_qkv_views_of_a_fused_projection():
    g = torch.Generator().manual_seed(4)
    B, N, H, D = 2, 50, 2, 32
    qkv = torch.randn(B, N, 3, H, D, generator=g).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, n, d), strided
    table = torch.randn(99, H, generator=g).requires_grad_()
    bias = (RelPosBias(table, torch.randint(0, 99, (N, N), generator=g)),)
    out = attend(q, k, v, bias=bias, backend="flex")
    ref = attend(q.detach(), k.detach(), v.detach(), bias=(RelPosBias(table.detach(), bias[0].index),),
                 backend="reference")
    assert_close(out, ref, atol=ATOL, rtol=RTOL, what="strided views")
    out.sum().backward()
    assert qkv.grad is not None and table.grad is not None


def test_row_without_valid_keys_gives_zeros_and_zero_gradients():
    case = CheckCase("flex", "cpu", torch.float32, (2, 2, 5, 7, 16, 16), "relpos+padding")
    q, k, v, bias = make_case_inputs(case)
    assert not bias[1].mask[-1].any()  # the last sample has no valid key
    out = attend(q, k, v, bias=bias, backend="flex")
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    out.backward(_grad_out(out.shape))
    for name, t in trainable(q, k, v, bias):
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
    for t in (q, k, v):
        assert torch.equal(t.grad[-1], torch.zeros_like(t.grad[-1]))


@pytest.mark.parametrize("bias", ["none", "relpos", "dense_bcast", "relpos+padding"])
def test_cls_probs_come_from_the_log_sum_exp(bias):
    case = CheckCase("flex", "cpu", torch.float32, (2, 3, 17, 21, 16, 16), bias)
    q, k, v, desc = make_case_inputs(case)
    q32, k32, v32, desc32 = fp32_copy(q, k, v, desc)
    res = attend(q, k, v, bias=desc, return_cls_probs=True, backend="flex")
    ref = attend(q32, k32, v32, bias=desc32, return_cls_probs=True, backend="reference")
    assert res.probs is None and res.cls_probs.shape == (2, 3, 21)
    assert_close(res.cls_probs, ref.cls_probs, atol=ATOL, rtol=RTOL, what=f"{case.id} cls_probs")
    assert_close(res.out, ref.out, atol=ATOL, rtol=RTOL, what=f"{case.id} out")
    # Gradients flow through the recomputed CLS logits and through FlexAttention's log-sum-exp.
    weights = _grad_out(ref.cls_probs.shape, seed=2)
    ((res.cls_probs * weights).sum() + res.out.sum()).backward()
    ((ref.cls_probs * weights).sum() + ref.out.sum()).backward()
    for (name, t), (_, t32) in zip(trainable(q, k, v, desc), trainable(q32, k32, v32, desc32)):
        scale = grad_scale(t32.grad)
        assert_close(t.grad, t32.grad, atol=ATOL * scale, rtol=RTOL, what=f"{case.id} cls grad {name}")


def test_public_flex_attention_path_with_captured_tensors(monkeypatch):
    """The path CUDA takes (``flex_attention`` with the biases captured by a closure, the LSE from
    ``return_aux``/``return_lse``), run uncompiled on the CPU without gradients."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex_module, "_compiled_flex", lambda: flex_attention)
    case = CheckCase("flex", "cpu", torch.float32, (2, 2, 33, 40, 16, 16), "relpos+padding")
    q, k, v, bias = make_case_inputs(case, requires_grad=False)
    bias += (DenseBias(torch.randn(1, 2, 33, 40)),)
    inp = make_inputs(q, k, v, bias=bias, return_cls_probs=True)
    score_mod, buffers = flex_module._score_mod(inp)
    block_mask = flex_module._padding_block_mask(inp)
    with warnings.catch_warnings():  # "called without torch.compile": intended here
        warnings.simplefilter("ignore")
        out, lse = flex_module._flex_public(q, k, v, score_mod, buffers, block_mask, inp.scale, True)
    eager_out, eager_lse = flex_module._flex_eager_op(q, k, v, score_mod, buffers, block_mask, inp.scale, True)
    ref = attend(q, k, v, bias=bias, return_cls_probs=True, backend="reference")
    assert_close(out, ref.out, atol=ATOL, rtol=RTOL, what="public path out")
    assert_close(out, eager_out, atol=1e-6, rtol=1e-6, what="public vs eager op")
    assert torch.equal(torch.isinf(lse), torch.isinf(eager_lse))
    finite = torch.isfinite(lse)
    assert_close(lse[finite], eager_lse[finite], atol=1e-5, rtol=1e-5, what="lse (natural log)")
    assert_close(flex_module._cls_probs(inp, lse), ref.cls_probs, atol=ATOL, rtol=RTOL, what="cls from public lse")


def _qkv(n=8, d=16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 2, n, d, generator=g).to(device) for _ in range(3))


@pytest.mark.parametrize("kwargs, reason", [
    (dict(dropout_p=0.1), "attention dropout is not supported"),
    (dict(return_probs=True), "return_probs needs the full probabilities; flex never materialises them"),
    (dict(head_mix=HeadMix(pre=torch.eye(2))), "head mixing (talking heads / re-attention) needs"),
])
def test_refusals_come_with_their_reason(kwargs, reason):
    q, k, v = _qkv()
    reasons = explain_call(q, k, v, **kwargs)["flex"]
    assert any(r.startswith(reason) for r in reasons), reasons
    with pytest.raises(ValueError, match="attention backend 'flex' cannot serve"):
        attend(q, k, v, backend="flex", **kwargs)


def test_deterministic_mode_refuses_bias_gradients_off_the_cpu():
    q, k, v = _qkv(device="meta")  # a device the compiled path would serve (the CPU's math backward is deterministic)
    dense = torch.randn(1, 2, 8, 8, device="meta", requires_grad=True)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        reasons = FlexBackend.not_supported_reasons(make_inputs(q, k, v, bias=DenseBias(dense)))
        assert any("deterministic algorithms are enabled and a bias tensor requires grad" in r for r in reasons)
        frozen = FlexBackend.not_supported_reasons(make_inputs(q, k, v, bias=DenseBias(dense.detach())))
        assert not any("deterministic" in r for r in frozen)
        with torch.no_grad():
            assert not any("deterministic" in r for r in
                           FlexBackend.not_supported_reasons(make_inputs(q, k, v, bias=DenseBias(dense))))
        cpu = _qkv()
        cpu_dense = DenseBias(torch.randn(1, 2, 8, 8, requires_grad=True))
        assert FlexBackend.not_supported_reasons(make_inputs(*cpu, bias=cpu_dense)) == []
    finally:
        torch.use_deterministic_algorithms(saved)
    assert not any("deterministic" in r for r in FlexBackend.not_supported_reasons(
        make_inputs(q, k, v, bias=DenseBias(dense))))


def test_cuda_refuses_head_dims_below_16():
    # No CUDA device here: the capability check reads only these fields.
    def reasons(d, dv, device="cuda"):
        return FlexBackend.not_supported_reasons(SimpleNamespace(
            device_type=device, dtype=torch.float32, head_dim=d, value_dim=dv, bias=(), dropout_p=0.0,
            return_probs=False, head_mix=None, return_cls_probs=False, needs_grad=False, window=None,
            packed=None))

    assert FlexBackend.min_head_dim_on("cuda") == 16 and FlexBackend.min_head_dim_on("cpu") == 1
    assert any("flex on cuda needs both >= 16" in r for r in reasons(8, 8))
    assert any("flex on cuda needs both >= 16" in r for r in reasons(16, 8))
    assert reasons(16, 16) == [] and reasons(48, 80) == [] and reasons(16, 64) == []
    assert reasons(8, 8, device="cpu") == []


def test_unavailable_is_a_reason_not_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    flex_module._probe.cache_clear()
    try:
        ok, why = FlexBackend.availability()
        assert not ok and "torch.nn.attention.flex_attention is not importable" in why
        q, k, v = _qkv()
        assert explain_call(q, k, v)["flex"] == [why]
        with pytest.raises(ValueError, match="not importable"):
            attend(q, k, v, backend="flex")
        assert attend(q, k, v).shape == (2, 2, 8, 16)  # auto dispatch is unaffected
    finally:
        monkeypatch.undo()
        flex_module._probe.cache_clear()
    assert FlexBackend.availability() == (True, "")


def test_registered_and_second_in_the_cuda_auto_order():
    assert BACKENDS["flex"] is FlexBackend
    assert dispatch.CUDA_ORDER == ("triton", "flex", "xformers", "sdpa", "reference")
    q, k, v = _qkv()
    assert dispatch.auto_order(make_inputs(q, k, v))[:2] in (("reference", "sdpa"), ("sdpa", "reference"))


# On a CUDA device (the GPU check runs this file too): what the CPU cannot show about the compiled path.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_row_without_valid_keys_gives_zeros_and_zero_gradients(dtype):
    case = CheckCase("flex", "cuda", dtype, (2, 2, 50, 50, 32, 32), "relpos+padding")
    q, k, v, bias = make_case_inputs(case)
    out = attend(q, k, v, bias=bias, backend="flex")
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    out.backward(_grad_out(out.shape).to(out))
    for name, t in trainable(q, k, v, bias):
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
    for t in (q, k, v):
        assert torch.equal(t.grad[-1], torch.zeros_like(t.grad[-1]))


@cuda
def test_cuda_same_shapes_with_fresh_descriptors_do_not_recompile():
    def call(seed):
        case = CheckCase("flex", "cuda", torch.bfloat16, (2, 3, 49, 49, 32, 32), "relpos+padding")
        q, k, v, bias = make_case_inputs(case, seed=seed)
        out = attend(q, k, v, bias=bias, backend="flex")
        out.sum().backward()

    torch._dynamo.reset()  # earlier tests may have used up the recompile budget (then flex runs uncompiled)
    call(0)  # compiles (forward and backward)
    with torch._dynamo.config.patch(error_on_recompile=True):
        call(1)  # new tensors, new score_mod / mask_mod closures, same shapes


@cuda
def test_cuda_head_dim_rule_matches_the_compiled_kernel():
    def run(d, dv):
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, 2, 40, d, generator=g).cuda().half() for _ in range(2))
        v = torch.randn(1, 2, 40, dv, generator=g).cuda().half()
        return flex_module._flex_public(q, k, v, None, (), None, d ** -0.5, False)[0]

    torch._dynamo.reset()  # past the recompile budget flex would run uncompiled, where D=8 works
    for d, dv in ((16, 16), (48, 48), (80, 80), (16, 64)):
        assert FlexBackend.extra_reasons(make_inputs(*(torch.empty(1, 2, 40, n, device="cuda", dtype=torch.half)
                                                       for n in (d, d, dv)))) == []
        assert run(d, dv).shape == (1, 2, 40, dv)
    with pytest.raises(Exception, match="at least 16"):
        run(8, 8)
