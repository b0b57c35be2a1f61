"""fastvit.kernels.attention against attention_ref: forward, gradients, biases, edge cases, bad input.

The cases are the shared ones (``fastvit.attention.testing``, through ``kernel_cases``): shapes from
``SHAPES`` (N <= 197 under the CPU's interpreter), bias kinds combined from ``BIAS_PARTS``, inputs from
``make_case_inputs``, ``compare`` at the triton backend's tolerances on fp32 copies.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastvit.kernels import attention as kattn
from kernel_cases import (
    BF16,
    CLS,
    DEVICE,
    F16,
    F32,
    LEVIT,
    N50_D48,
    N50_D80,
    REDUCED_KV,
    SUBSAMPLED_Q,
    SWIN,
    TINY,
    VIT,
    assert_compare,
    assert_matches,
    case_inputs,
    differentiable,
    kernel_kwargs,
    launcher_kwargs,
    param,
    run_and_compare,
    triton_case,
)

from fastvit.attention.testing import fp32_copy

CASES = [
    # plain attention at vision-awkward sizes and head dims (padded to 16/32/64/128 in-kernel); the
    # block multiples (EVEN_M/N/D, no masks compiled in) are test_attention_features' split cases
    param(F32, SWIN),
    param(F16, SWIN),
    param(BF16, SWIN),
    param(F32, TINY),
    param(F32, N50_D48),
    param(F16, N50_D80),
    param(F32, SUBSAMPLED_Q),
    param(BF16, VIT),
    param(F32, VIT, backward=False),
    # Nq != Nk: class attention, LeViT subsampling with D != Dv, reduced keys
    param(F32, CLS),
    param(BF16, CLS),
    param(F16, LEVIT, "relpos", fp32_table=True),
    param(F32, LEVIT),
    param(F32, REDUCED_KV),
    param(F16, REDUCED_KV),
    # relative-position tables gathered in-kernel (Swin windows: N=49, D=32), 16-bit or fp32 tables
    param(F32, SWIN, "relpos"),
    param(F16, SWIN, "relpos", index_dtype=torch.int32, fp32_table=True),
    param(BF16, SWIN, "relpos", fp32_table=True),
    param(F32, TINY, "relpos", index_dtype=torch.int32),
    # dense biases of every broadcast shape, with and without a gradient
    param(F32, SWIN, "dense_bcast"),
    param(F32, SWIN, "dense_bcast_heads"),
    param(F32, SWIN, "dense"),
    param(F16, N50_D48, "dense_bcast_all"),
    param(BF16, SWIN, "dense", frozen=("dense_bias",)),
    # key padding (the last sample has no valid key at all)
    param(F32, SUBSAMPLED_Q, "padding"),
    param(F16, CLS, "padding"),
    param(BF16, N50_D48, "padding"),
    # every bias at once, and pairs
    param(F32, SWIN, "relpos+dense_bcast_all+padding"),
    param(F16, SUBSAMPLED_Q, "relpos+dense+padding", fp32_table=True),
    param(BF16, SWIN, "relpos+dense_bcast+padding", fp32_table=True),
    param(F32, REDUCED_KV, "relpos+dense_bcast_heads"),
    param(F32, SWIN, "relpos+padding"),
]


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("case, options", CASES)
def test_matches_reference(case, options):
    run_and_compare(case, **options)


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("case", [triton_case(F32, SUBSAMPLED_Q, "relpos+dense+padding"), triton_case(BF16, CLS),
                                  triton_case(F16, VIT)], ids=lambda c: c.id)
def test_cls_probs(case):
    B, H, Nq, Nk, D, Dv = case.shape
    q, k, v, bias = case_inputs(case)
    inputs = launcher_kwargs(q, k, v, bias)
    out, cls_probs = kattn.attention_with_cls_probs(**inputs)
    ref_out, ref_cls = kattn.attention_ref(**launcher_kwargs(*fp32_copy(q, k, v, bias)), return_cls_probs=True)
    assert cls_probs.shape == (B, H, Nk) and cls_probs.dtype == case.dtype
    assert not cls_probs.requires_grad and out.requires_grad
    assert_matches(out, ref_out, case.dtype, "out")
    assert_matches(cls_probs, ref_cls, case.dtype, "cls_probs")
    # the launcher returns the same probabilities alongside out and lse
    detached = {n: t.detach() for n, t in inputs.items()}
    _, _, from_fwd = kattn.attention_fwd(**detached, scale=D ** -0.5, return_cls_probs=True)
    assert torch.equal(from_fwd, cls_probs)


@pytest.mark.usefixtures("device")
def test_lse_matches_logsumexp():
    inputs = kernel_kwargs(triton_case(F32, SUBSAMPLED_Q, "relpos+dense"), requires_grad=False)
    scale = 0.3
    _, lse, _ = kattn.attention_fwd(**inputs, scale=scale)
    logits = inputs["q"] @ inputs["k"].transpose(-1, -2) * scale + inputs["dense_bias"]
    logits = logits + inputs["rel_table"][inputs["rel_index"]].permute(2, 0, 1)
    assert_matches(lse, torch.logsumexp(logits, dim=-1), F32, "lse")


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_rows_without_valid_keys_give_zeros(dtype):
    inputs = kernel_kwargs(triton_case(dtype, SUBSAMPLED_Q, "relpos+dense+padding"))
    assert not inputs["key_padding"][-1].any() and inputs["key_padding"][0].any()
    out, lse, _ = kattn.attention_fwd(**{n: t.detach() for n, t in inputs.items()}, scale=0.2)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert torch.isinf(lse[-1]).all() and (lse[-1] > 0).all() and torch.isfinite(lse[0]).all()
    names = ("q", "k", "v", "rel_table", "dense_bias")
    grads = torch.autograd.grad(kattn.attention(**inputs, scale=0.2).float().sum(), [inputs[n] for n in names])
    for name, grad in zip(names, grads):
        assert torch.isfinite(grad).all(), name
    for grad in grads[:3] + grads[4:]:  # per-batch gradients of the last sample are exactly zero
        assert torch.equal(grad[-1], torch.zeros_like(grad[-1]))


def _poisoned(t: torch.Tensor, fill) -> torch.Tensor:
    """The same values inside a larger buffer whose padding holds ``fill``: a kernel that reads out
    of bounds picks it up (NaN for floats; valid-but-wrong values for indices and masks)."""
    pad = [1, 3, 2, 5][-t.dim():]
    buf = torch.full([s + p for s, p in zip(t.shape, pad)], fill, dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(1, 1 + s) for s in t.shape)]
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_padding_poisoning(dtype, device):
    B, H, Nq, Nk, D, Dv = N50_D48
    clean = kernel_kwargs(triton_case(dtype, N50_D48, "relpos+dense_bcast+padding"))
    fills = {"rel_index": clean["rel_table"].shape[0] - 1, "key_padding": True}
    poisoned = {n: _poisoned(t, fills.get(n, math.nan)) for n, t in clean.items()}
    # q also as the usual (b, n, h, d) projection output seen through a transpose
    q_bnhd = torch.full((B, Nq, H, D + 3), math.nan, dtype=dtype, device=device)
    q_bnhd[..., :D] = clean["q"].detach().transpose(1, 2)
    poisoned["q"] = q_bnhd[..., :D].transpose(1, 2).requires_grad_(True)
    assert not poisoned["q"].is_contiguous() and not poisoned["dense_bias"].is_contiguous()

    grad_out = torch.randn(B, H, Nq, Dv, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    results = []
    for inputs, g in ((clean, grad_out), (poisoned, _poisoned(grad_out, math.nan))):
        out = kattn.attention(**inputs, scale=0.2)
        names = differentiable(inputs)
        results.append([out] + list(torch.autograd.grad(out, [inputs[n] for n in names], g)))
    for name, a, b in zip(["out"] + differentiable(clean), *results):
        assert torch.isfinite(b).all(), f"{name}: the padding leaked into the result"
        assert_compare(b, a, atol=1e-6, rtol=1e-6, what=name)


@pytest.mark.usefixtures("device")
def test_last_dim_not_contiguous_is_copied():
    inputs = kernel_kwargs(triton_case(F32, SUBSAMPLED_Q), requires_grad=False)
    k_t = inputs["k"].transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    assert k_t.stride(-1) != 1
    out, _, _ = kattn.attention_fwd(inputs["q"], k_t, inputs["v"], scale=0.25)
    ref, _, _ = kattn.attention_fwd(inputs["q"], inputs["k"], inputs["v"], scale=0.25)
    assert torch.equal(out, ref)


@pytest.mark.usefixtures("device")
def test_default_scale_is_inverse_sqrt_head_dim():
    inputs = kernel_kwargs(triton_case(F32, SWIN), requires_grad=False)
    head_dim = SWIN[4]
    assert_matches(kattn.attention(**inputs), kattn.attention_ref(**inputs, scale=head_dim ** -0.5), F32, "out")


@pytest.mark.usefixtures("device")
def test_torch_compile_fullgraph_matches_eager():
    inputs = kernel_kwargs(triton_case(F32, REDUCED_KV, "relpos+padding"))

    def fn(q, k, v, rel_table, rel_index, key_padding):
        out = kattn.attention(q * 2, k, v, rel_table=rel_table, rel_index=rel_index, key_padding=key_padding)
        out2, cls_probs = kattn.attention_with_cls_probs(q, k, v)
        return (out.sin() + out2).sum(), cls_probs

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # a graph break raises
    results = []
    for f in (fn, compiled):
        loss, cls_probs = f(**inputs)
        names = differentiable(inputs)
        results.append([loss, cls_probs] + list(torch.autograd.grad(loss, [inputs[n] for n in names])))
    for a, b in zip(*results):
        assert_compare(b, a, atol=1e-6, rtol=1e-6, what="compiled vs eager")


@pytest.mark.usefixtures("device")
def test_custom_ops_pass_opcheck():
    inputs = kernel_kwargs(triton_case(F32, REDUCED_KV, "relpos+dense_bcast"), requires_grad=False)
    q, k, v = (inputs[n].requires_grad_(True) for n in ("q", "k", "v"))
    args = (q, k, v, 0.25, inputs["rel_table"], inputs["rel_index"], inputs["dense_bias"], None)
    torch.library.opcheck(torch.ops.fastvit.attn_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------------------------------
# bad input: ValueError naming the values; not_supported_reasons in sentences
# --------------------------------------------------------------------------------------------------

def _valid(device, **over):
    # Not a SHAPES entry: Nq != Nk and B != H, so that each message can only name the right size.
    assert device == DEVICE
    inputs = kernel_kwargs(triton_case(F32, (2, 3, 49, 50, 32, 32), "relpos+dense+padding"), requires_grad=False)
    inputs.update(over)
    return inputs


def _rand(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype)


def _qkv64(**shapes) -> dict:
    """q, k, v in float64 (an unsupported dtype)."""
    return {n: _rand(*s, dtype=torch.float64) for n, s in shapes.items()}


# name -> (overrides of a valid call, the message expected in the ValueError)
BAD_INPUTS = {
    "q-3d": (lambda: dict(q=_rand(3, 49, 32)), r"q must be 4-D .* \[3, 49, 32\]"),
    "dtype-mismatch": (lambda: dict(k=_rand(2, 3, 50, 32, dtype=F16)), r"dtypes differ"),
    "float64": (lambda: _qkv64(q=(2, 3, 49, 32), k=(2, 3, 50, 32), v=(2, 3, 50, 32)),
                r"dtype torch.float64 is not supported"),
    "batch-mismatch": (lambda: dict(k=_rand(3, 3, 50, 32)),
                       r"batch/heads differ: q \[2, 3, 49, 32\], k \[3, 3, 50, 32\]"),
    "head-dim-mismatch": (lambda: dict(k=_rand(2, 3, 50, 33)), r"head dim of q \(32\) != head dim of k \(33\)"),
    "nk-mismatch": (lambda: dict(v=_rand(2, 3, 51, 32)), r"key count of k \(50\) != key count of v \(51\)"),
    "head-dim-too-big": (lambda: dict(q=_rand(2, 3, 49, 160), k=_rand(2, 3, 50, 160)),
                         r"head dim=160 is outside 1..128"),
    "rel-index-shape": (lambda: dict(rel_index=torch.zeros(49, 49, dtype=torch.long)),
                        r"rel_index must be \[Nq, Nk\] = \[49, 50\], got shape \[49, 49\]"),
    "rel-index-float": (lambda: dict(rel_index=torch.zeros(49, 50)), r"rel_index must be an integer tensor"),
    "rel-table-heads": (lambda: dict(rel_table=_rand(37, 4)), r"rel_table must be \[T, H=3\], got shape \[37, 4\]"),
    "rel-without-index": (lambda: dict(rel_index=None), r"rel_table and rel_index go together"),
    "dense-shape": (lambda: dict(dense_bias=_rand(3, 3, 49, 50)),
                    r"dense_bias shape \[3, 3, 49, 50\] is not broadcastable"),
    "dense-3d": (lambda: dict(dense_bias=_rand(3, 49, 50)), r"dense_bias shape \[3, 49, 50\]"),
    "pad-shape": (lambda: dict(key_padding=torch.ones(2, 51, dtype=torch.bool)),
                  r"key_padding must be \[B, Nk\] = \[2, 50\], got shape \[2, 51\]"),
    "pad-dtype": (lambda: dict(key_padding=torch.ones(2, 50)), r"key_padding must be bool"),
    "devices": (lambda: dict(k=torch.empty(2, 3, 50, 32, device="meta")), r"different devices"),
    "dropout": (lambda: dict(dropout_p=0.1), r"dropout_p=0.1: attention dropout is not supported"),
    "scale-nan": (lambda: dict(scale=math.nan), r"scale must be a finite, non-zero Python float, got nan"),
    "scale-zero": (lambda: dict(scale=0.0), r"scale must be a finite, non-zero Python float, got 0.0"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error(name, device):
    make, pattern = BAD_INPUTS[name]
    kwargs = dict(scale=0.2)
    inputs = _valid(device, **make())
    for key in ("dropout_p", "scale"):
        if key in inputs:
            kwargs[key] = inputs.pop(key)
    inputs = {n: (t.to(device) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t)
              for n, t in inputs.items()}
    with pytest.raises(ValueError, match=pattern):
        kattn.attention_fwd(**inputs, **kwargs)


def test_backward_checks_its_shapes(device):
    inputs = _valid(device)
    out, lse, _ = kattn.attention_fwd(**inputs, scale=0.2)
    with pytest.raises(ValueError, match=r"do must have shape \[2, 3, 49, 32\], got \[2, 3, 49, 31\]"):
        kattn.attention_bwd(out[..., :31], **inputs, out=out, lse=lse, scale=0.2)


def test_not_supported_reasons(device, monkeypatch):
    assert kattn.not_supported_reasons(**_valid(device)) == []
    q = _rand(1, 2, 8, 160).to(device)
    assert any("head_dim=160 > 128" in r for r in kattn.not_supported_reasons(q, q, q))
    q = _rand(1, 2, 8, 16, dtype=torch.float64).to(device)
    assert any("dtype torch.float64 is not supported" in r for r in kattn.not_supported_reasons(q, q, q))
    q = _rand(1, 2, 8, 16).to(device)
    assert any("dropout" in r for r in kattn.not_supported_reasons(q, q, q, dropout_p=0.1))
    assert any("scale=0.0" in r for r in kattn.not_supported_reasons(q, q, q, scale=0.0))
    assert any("rel_index must be [Nq, Nk]" in r for r in kattn.not_supported_reasons(
        q, q, q, rel_table=_rand(5, 2).to(device), rel_index=torch.zeros(8, 7, dtype=torch.long, device=device)))
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert kattn.not_supported_reasons(q, q, q) == [
            "q is on cpu; the triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"]


def test_available_says_why(monkeypatch):
    from fastvit import kernels

    assert kernels.available() == (True, "")
    monkeypatch.setattr(kattn, "_TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    ok, why = kernels.available()
    assert not ok and "triton is not importable" in why


def test_the_forward_op_is_differentiable_on_its_own(device):
    """torch.ops.fastvit.attn_fwd carries its own autograd (register_autograd): the one autograd path."""
    inputs = kernel_kwargs(triton_case(F32, REDUCED_KV, "relpos+dense_bcast_all"))
    names = differentiable(inputs)
    out, lse = torch.ops.fastvit.attn_fwd(inputs["q"], inputs["k"], inputs["v"], 0.25, inputs["rel_table"],
                                          inputs["rel_index"], inputs["dense_bias"], None)
    assert not lse.requires_grad
    grads = torch.autograd.grad(out.sum(), [inputs[n] for n in names])
    ref_grads = torch.autograd.grad(kattn.attention(**inputs, scale=0.25).sum(), [inputs[n] for n in names])
    for name, a, b in zip(names, grads, ref_grads):
        assert torch.equal(a, b), name
