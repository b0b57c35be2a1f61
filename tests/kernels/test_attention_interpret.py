"""fastvit.kernels.attention against attention_ref: forward, gradients, biases, edge cases, bad input.

On the CPU these run under TRITON_INTERPRET=1 (numpy), so shapes stay small (N <= 200, B*H <= 6).
Every comparison is on fp32 copies of the inputs, with per-dtype tolerances scaled by the size of
the expected values (a gradient summed over many logits is large, and so is its rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from fastvit.kernels import attention as kattn
from helpers import assert_close

# (atol, rtol) relative to max(1, max|expected|).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 4e-2)}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    biases: tuple = ()  # any of "relpos", "dense", "pad"
    dense_shape: str = "1H"  # which dims of [B, H, Nq, Nk] the dense bias has: "1H", "B1", "BH", "11"
    dense_grad: bool = True
    index_dtype: torch.dtype = torch.int64
    backward: bool = True

    @property
    def id(self) -> str:
        n = f"N{self.Nq}" if self.Nq == self.Nk else f"N{self.Nq}x{self.Nk}"
        d = f"D{self.D}" if self.D == self.Dv else f"D{self.D}-Dv{self.Dv}"
        bias = "+".join(b + (f"[{self.dense_shape}]" if b == "dense" else "") for b in self.biases) or "plain"
        extra = ("-nograd" if not self.dense_grad else "") + ("-fwd" if not self.backward else "")
        return f"{DTYPE_NAMES[self.dtype]}-B{self.B}-H{self.H}-{n}-{d}-{bias}{extra}"


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """q, k, v (requiring grad) and the biases of a case, as kwargs of kattn.attention."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, dtype=case.dtype: torch.randn(*shape, generator=g).to(dtype).to(device)
    inputs = dict(q=rand(case.B, case.H, case.Nq, case.D), k=rand(case.B, case.H, case.Nk, case.D),
                  v=rand(case.B, case.H, case.Nk, case.Dv))
    if "relpos" in case.biases:
        table_size = 37
        inputs["rel_table"] = rand(table_size, case.H, dtype=torch.float32)
        index = torch.randint(0, table_size, (case.Nq, case.Nk), generator=g)
        inputs["rel_index"] = index.to(case.index_dtype).to(device)
    if "dense" in case.biases:
        b = case.B if case.dense_shape[0] == "B" else 1
        h = case.H if case.dense_shape[1] == "H" else 1
        inputs["dense_bias"] = rand(b, h, case.Nq, case.Nk)
    if "pad" in case.biases:
        mask = torch.rand(case.B, case.Nk, generator=g) > 0.3
        mask[:, 0] = True  # every row has a valid key ...
        mask[0] = False  # ... except all rows of batch 0: their output and gradients are 0
        inputs["key_padding"] = mask.to(device)
    for name in ("q", "k", "v", "rel_table") + (("dense_bias",) if case.dense_grad else ()):
        if name in inputs:
            inputs[name].requires_grad_(True)
    return inputs


def differentiable(inputs: dict) -> list[str]:
    return [name for name, t in inputs.items() if t.is_floating_point() and t.requires_grad]


def fp32_copies(inputs: dict) -> dict:
    return {name: (t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t)
            for name, t in inputs.items()}


def check(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol, what=what)


def run_and_compare(case: Case, device: str) -> None:
    inputs = make_inputs(case, device)
    scale = case.D ** -0.5
    out = kattn.attention(**inputs, scale=scale)
    assert out.dtype == case.dtype and out.shape == (case.B, case.H, case.Nq, case.Dv)
    ref_inputs = fp32_copies(inputs)
    ref = kattn.attention_ref(**ref_inputs, scale=scale)
    check(out, ref, case.dtype, f"{case.id} out")
    if not case.backward:
        return
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(case.dtype).to(device)
    names = differentiable(inputs)
    grads = torch.autograd.grad(out, [inputs[n] for n in names], grad_out)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[n] for n in names], grad_out.float())
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        check(grad, ref_grad, case.dtype, f"{case.id} d{name}")


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    # plain attention at vision-awkward sizes and head dims (padded to 16/32/64/128 in-kernel)
    Case(F32, 2, 3, 49, 49, 32, 32),
    Case(F16, 2, 3, 49, 49, 32, 32),
    Case(BF16, 2, 3, 49, 49, 32, 32),
    Case(F32, 1, 2, 1, 1, 8, 8),
    Case(F32, 2, 2, 50, 50, 48, 48),
    Case(F16, 1, 2, 50, 50, 80, 80),
    Case(F32, 1, 2, 16, 16, 64, 64),
    Case(F32, 1, 2, 64, 64, 64, 64),  # block multiples: EVEN_M/N/D, no masks compiled in
    Case(F16, 1, 2, 64, 64, 32, 32),
    Case(BF16, 1, 2, 197, 197, 64, 64),
    Case(F32, 1, 1, 197, 197, 16, 16, backward=False),
    # Nq != Nk: class attention, LeViT subsampling with D != Dv, reduced keys
    Case(F32, 2, 2, 1, 50, 32, 32),
    Case(BF16, 2, 2, 1, 50, 48, 48),
    Case(F16, 1, 2, 49, 196, 16, 64, ("relpos",)),
    Case(F32, 1, 2, 49, 196, 32, 64),
    Case(F32, 2, 2, 64, 16, 32, 32),
    Case(F16, 1, 2, 130, 20, 64, 64),
    # relative-position tables gathered in-kernel (Swin windows: N=49, D=32)
    Case(F32, 2, 3, 49, 49, 32, 32, ("relpos",)),
    Case(F16, 2, 3, 49, 49, 32, 32, ("relpos",), index_dtype=torch.int32),
    Case(BF16, 2, 3, 49, 49, 32, 32, ("relpos",)),
    Case(F32, 2, 2, 49, 50, 8, 8, ("relpos",), index_dtype=torch.int32),
    # dense biases of every broadcast shape, with and without a gradient
    Case(F32, 2, 3, 49, 49, 32, 32, ("dense",), dense_shape="1H"),
    Case(F32, 2, 3, 49, 49, 32, 32, ("dense",), dense_shape="B1"),
    Case(F32, 2, 3, 49, 49, 32, 32, ("dense",), dense_shape="BH"),
    Case(F16, 2, 2, 50, 50, 32, 32, ("dense",), dense_shape="11"),
    Case(BF16, 2, 2, 49, 49, 32, 32, ("dense",), dense_shape="BH", dense_grad=False),
    # key padding (batch 0 has no valid key at all)
    Case(F32, 2, 2, 49, 50, 32, 32, ("pad",)),
    Case(F16, 2, 2, 1, 50, 32, 32, ("pad",)),
    Case(BF16, 2, 2, 50, 50, 64, 64, ("pad",)),
    # every bias at once, and pairs
    Case(F32, 2, 2, 49, 49, 32, 32, ("relpos", "dense", "pad"), dense_shape="11"),
    Case(F16, 2, 2, 49, 50, 48, 48, ("relpos", "dense", "pad"), dense_shape="BH"),
    Case(BF16, 2, 2, 49, 49, 32, 32, ("relpos", "dense", "pad"), dense_shape="1H"),
    Case(F32, 2, 2, 64, 64, 16, 16, ("relpos", "dense"), dense_shape="B1"),
    Case(F32, 2, 2, 49, 49, 32, 32, ("relpos", "pad")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, device):
    run_and_compare(case, device)


@pytest.mark.parametrize("case", [Case(F32, 2, 2, 49, 50, 32, 32, ("relpos", "dense", "pad"), dense_shape="BH"),
                                  Case(BF16, 2, 2, 1, 50, 32, 32),
                                  Case(F16, 1, 2, 197, 197, 64, 64)], ids=lambda c: c.id)
def test_cls_probs(case, device):
    inputs = make_inputs(case, device)
    out, cls_probs = kattn.attention_with_cls_probs(**inputs)
    ref_out, ref_cls = kattn.attention_ref(**fp32_copies(inputs), return_cls_probs=True)
    assert cls_probs.shape == (case.B, case.H, case.Nk) and cls_probs.dtype == case.dtype
    assert not cls_probs.requires_grad and out.requires_grad
    check(out, ref_out, case.dtype, "out")
    check(cls_probs, ref_cls, case.dtype, "cls_probs")
    # the launcher returns the same probabilities alongside out and lse
    detached = {n: t.detach() for n, t in inputs.items()}
    _, _, from_fwd = kattn.attention_fwd(**detached, scale=case.D ** -0.5, return_cls_probs=True)
    assert torch.equal(from_fwd, cls_probs)


def test_lse_matches_logsumexp(device):
    case = Case(F32, 2, 2, 49, 50, 32, 32, ("relpos", "dense"), dense_shape="BH")
    inputs = {n: t.detach() for n, t in make_inputs(case, device).items()}
    scale = 0.3
    _, lse, _ = kattn.attention_fwd(**inputs, scale=scale)
    logits = inputs["q"] @ inputs["k"].transpose(-1, -2) * scale + inputs["dense_bias"]
    logits = logits + inputs["rel_table"][inputs["rel_index"]].permute(2, 0, 1)
    check(lse, torch.logsumexp(logits, dim=-1), F32, "lse")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: DTYPE_NAMES[d])
def test_rows_without_valid_keys_give_zeros(dtype, device):
    case = Case(dtype, 2, 2, 20, 30, 32, 32, ("relpos", "dense", "pad"), dense_shape="BH")
    inputs = make_inputs(case, device)
    out, lse, _ = kattn.attention_fwd(**{n: t.detach() for n, t in inputs.items()}, scale=0.2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isinf(lse[0]).all() and (lse[0] > 0).all() and torch.isfinite(lse[1]).all()
    grads = torch.autograd.grad(kattn.attention(**inputs, scale=0.2).float().sum(),
                                [inputs[n] for n in ("q", "k", "v", "rel_table", "dense_bias")])
    for name, grad in zip(("q", "k", "v", "rel_table", "dense_bias"), grads):
        assert torch.isfinite(grad).all(), name
    for grad in grads[:3] + grads[4:]:  # per-batch gradients of batch 0 are exactly zero
        assert torch.equal(grad[0], torch.zeros_like(grad[0]))


def _poisoned(t: torch.Tensor, fill) -> torch.Tensor:
    """The same values inside a larger buffer whose padding holds ``fill``: a kernel that reads out
    of bounds picks it up (NaN for floats; valid-but-wrong values for indices and masks)."""
    pad = [1, 3, 2, 5][-t.dim():]
    buf = torch.full([s + p for s, p in zip(t.shape, pad)], fill, dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(1, 1 + s) for s in t.shape)]
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [F32, F16], ids=lambda d: DTYPE_NAMES[d])
def test_padding_poisoning(dtype, device):
    case = Case(dtype, 2, 2, 49, 50, 48, 48, ("relpos", "dense", "pad"), dense_shape="1H")
    clean = make_inputs(case, device)
    fills = {"rel_index": 36, "key_padding": True}
    poisoned = {n: _poisoned(t, fills.get(n, math.nan)) for n, t in clean.items()}
    # q also as the usual (b, n, h, d) projection output seen through a transpose
    q_bnhd = torch.full((case.B, case.Nq, case.H, case.D + 3), math.nan, dtype=dtype, device=device)
    q_bnhd[..., : case.D] = clean["q"].detach().transpose(1, 2)
    poisoned["q"] = q_bnhd[..., : case.D].transpose(1, 2).requires_grad_(True)
    assert not poisoned["q"].is_contiguous() and not poisoned["dense_bias"].is_contiguous()

    grad_out = torch.randn(case.B, case.H, case.Nq, case.Dv).to(dtype).to(device)
    results = []
    for inputs, g in ((clean, grad_out), (poisoned, _poisoned(grad_out, math.nan))):
        out = kattn.attention(**inputs, scale=0.2)
        names = differentiable(inputs)
        results.append([out] + list(torch.autograd.grad(out, [inputs[n] for n in names], g)))
    for name, a, b in zip(["out"] + differentiable(clean), *results):
        assert torch.isfinite(b).all(), f"{name}: the padding leaked into the result"
        assert_close(b.float(), a.float(), atol=1e-6, rtol=1e-6, what=name)


def test_last_dim_not_contiguous_is_copied(device):
    case = Case(F32, 1, 2, 20, 20, 16, 16)
    inputs = {n: t.detach() for n, t in make_inputs(case, device).items()}
    k_t = inputs["k"].transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    assert k_t.stride(-1) != 1
    out, _, _ = kattn.attention_fwd(inputs["q"], k_t, inputs["v"], scale=0.25)
    ref, _, _ = kattn.attention_fwd(inputs["q"], inputs["k"], inputs["v"], scale=0.25)
    assert torch.equal(out, ref)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    inputs = {n: t.detach() for n, t in make_inputs(Case(F32, 1, 1, 8, 8, 32, 32), device).items()}
    check(kattn.attention(**inputs), kattn.attention_ref(**inputs, scale=32 ** -0.5), F32, "out")


def test_torch_compile_fullgraph_matches_eager(device):
    case = Case(F32, 1, 2, 20, 24, 16, 16, ("relpos", "pad"))
    inputs = make_inputs(case, device)

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
        assert_close(b, a, atol=1e-6, rtol=1e-6, what="compiled vs eager")


def test_custom_ops_pass_opcheck(device):
    inputs = {n: t.detach() for n, t in make_inputs(Case(F32, 1, 2, 16, 20, 16, 16, ("relpos", "dense")),
                                                    device).items()}
    q, k, v = (inputs[n].requires_grad_(True) for n in ("q", "k", "v"))
    args = (q, k, v, 0.25, inputs["rel_table"], inputs["rel_index"], inputs["dense_bias"], None)
    torch.library.opcheck(torch.ops.fastvit.attn_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------------------------------
# bad input: ValueError naming the values; not_supported_reasons in sentences
# --------------------------------------------------------------------------------------------------

def _valid(device, **over):
    case = Case(F32, 2, 3, 49, 50, 32, 32, ("relpos", "dense", "pad"), dense_shape="BH")
    inputs = {n: t.detach() for n, t in make_inputs(case, device).items()}
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
    case = Case(F32, 1, 2, 20, 24, 16, 16, ("relpos", "dense"), dense_shape="11")
    inputs = make_inputs(case, device)
    names = differentiable(inputs)
    out, lse = torch.ops.fastvit.attn_fwd(inputs["q"], inputs["k"], inputs["v"], 0.25, inputs["rel_table"],
                                          inputs["rel_index"], inputs["dense_bias"], None)
    assert not lse.requires_grad
    grads = torch.autograd.grad(out.sum(), [inputs[n] for n in names])
    ref_grads = torch.autograd.grad(kattn.attention(**inputs, scale=0.25).sum(), [inputs[n] for n in names])
    for name, a, b in zip(names, grads, ref_grads):
        assert torch.equal(a, b), name
