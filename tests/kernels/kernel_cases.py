"""The shared attention cases (``fastvit.attention.testing``) as the kernel tests use them.

A case is a ``CheckCase`` of the ``triton`` backend: its shape comes from ``SHAPES`` (a few kernel
tests pick sizes around the kernels' block multiples instead), its bias kind is a ``+``-joined
combination of ``BIAS_PARTS``, its inputs come from ``make_case_inputs``. What only the launchers
see is a keyword of ``case_inputs``: an int32 relative index, an fp32 table with 16-bit q, k, v
(autocast's layout), a bias tensor without a gradient. Every comparison is ``compare`` on fp32
copies (``fp32_copy``, TF32 off) at the triton backend's tolerances, with atol scaled by the size of
the expected values (a gradient summed over many logits is large, and so is its rounding).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from fastvit.kernels import attention as kattn

from fastvit.attention import DenseBias, KeyPaddingMask, RelPosBias, get_backend
from fastvit.attention.testing import SHAPES, CheckCase, compare, fp32_copy, make_case_inputs, no_tf32, trainable

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels in the interpreter
TOLERANCES = get_backend("triton").tolerances  # dtype -> (atol, rtol)


def shared_shape(Nq: int, Nk: int, D: int, Dv: Optional[int] = None) -> tuple:
    """The ``SHAPES`` entry ``(B, H, Nq, Nk, D, Dv)`` with these sizes: the tests name a shape, SHAPES owns it."""
    found = [s for s in SHAPES if s[2:] == (Nq, Nk, D, D if Dv is None else Dv)]
    assert len(found) == 1, f"no single SHAPES entry with Nq={Nq} Nk={Nk} D={D} Dv={Dv}: {found}"
    return found[0]


TINY = shared_shape(1, 1, 8)  # one token, the smallest head dim
SWIN = shared_shape(49, 49, 32)  # a 7x7 window
N50_D48 = shared_shape(50, 50, 48)  # 7x7 + CLS; head dims padded to 64 and 128 in-kernel
N50_D80 = shared_shape(50, 50, 80)
VIT = shared_shape(197, 197, 64)  # ViT/16 at 224 px: several query and key blocks, a partial last one
CLS = shared_shape(1, 50, 32)  # class attention (CaiT)
REDUCED_KV = shared_shape(64, 16, 32)  # fewer keys than queries (CvT, Twins GSA)
SUBSAMPLED_Q = shared_shape(16, 50, 64)  # more keys than queries
LEVIT = shared_shape(49, 196, 16, 64)  # LeViT's attention-subsample: D != Dv


def triton_case(dtype: torch.dtype, shape: tuple, bias: str = "none") -> CheckCase:
    """The triton backend's case on this machine's kernel device."""
    return CheckCase("triton", DEVICE, dtype, shape, bias)


def param(dtype: torch.dtype, shape: tuple, bias: str = "none", **options):
    """A pytest parameter ``(case, options)`` whose id is the case's id followed by the options."""
    case = triton_case(dtype, shape, bias)
    return pytest.param(case, options, id="-".join([case.id] + [_option_id(n, v) for n, v in options.items()]))


def _option_id(name: str, value) -> str:
    if name == "index_dtype":
        return f"index_{str(value).replace('torch.', '')}"
    if name == "frozen":
        return "frozen_" + "_".join(value)
    if name == "backward":
        return "fwd+bwd" if value else "fwd"
    return name if value is True else f"{name}={value}"


def case_inputs(case: CheckCase, *, index_dtype: Optional[torch.dtype] = None, fp32_table: bool = False,
                frozen: tuple = (), requires_grad: bool = True, seed: int = 0) -> tuple:
    """``make_case_inputs(case)`` with the launcher-only options: ``(q, k, v, bias descriptors)``.

    Args:
        index_dtype: the relative index's dtype (int64 by default).
        fp32_table: keep the relative-position table in fp32 whatever q's dtype.
        frozen: names of bias tensors (``"rel_table"``, ``"dense_bias"``) that take no gradient.
    """
    q, k, v, bias = make_case_inputs(case, requires_grad=requires_grad, seed=seed)

    def leaf(t: torch.Tensor, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad and name not in frozen)

    out = []
    for b in bias:
        if isinstance(b, RelPosBias):
            table = leaf(b.table, "rel_table", F32 if fp32_table else None)
            b = RelPosBias(table, b.index.to(index_dtype or b.index.dtype))
        elif isinstance(b, DenseBias):
            b = DenseBias(leaf(b.tensor, "dense_bias"))
        out.append(b)
    return q, k, v, tuple(out)


def launcher_kwargs(q, k, v, bias) -> dict:
    """q, k, v and the bias descriptors as keyword arguments of the launchers (at most one of each kind)."""
    kwargs = dict(q=q, k=k, v=v)
    for b in bias:
        if isinstance(b, RelPosBias):
            kwargs.update(rel_table=b.table, rel_index=b.index)
        elif isinstance(b, DenseBias):
            kwargs["dense_bias"] = b.materialize()
        elif isinstance(b, KeyPaddingMask):
            kwargs["key_padding"] = b.mask
    return kwargs


def kernel_kwargs(case: CheckCase, *, requires_grad: bool = True, **options) -> dict:
    """``launcher_kwargs`` of ``case_inputs``."""
    return launcher_kwargs(*case_inputs(case, requires_grad=requires_grad, **options))


def differentiable(kwargs: dict) -> list:
    """The names of the float inputs that require a gradient, in call order."""
    return [name for name, t in kwargs.items() if torch.is_tensor(t) and t.is_floating_point() and t.requires_grad]


def assert_compare(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """``compare`` as an assertion: the worst element, its index and the failing fraction."""
    cmp = compare(actual, expected, atol, rtol)
    assert cmp["ok"], f"{what}: " + (cmp["reason"] or (
        f"max abs err {cmp['max_abs_err']:.3e} at {cmp['index']}; {cmp['failed_fraction']:.2%} of "
        f"{expected.numel()} elements exceed atol={atol:.3g} rtol={rtol:.3g}"))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Within the triton backend's tolerances for ``dtype``, atol scaled by ``max(1, max |expected|)``."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    assert_compare(actual, expected, atol=atol * scale, rtol=rtol, what=what)


def run_and_compare(case: CheckCase, *, backward: bool = True, **options) -> None:
    """``kattn.attention`` against ``attention_ref`` on fp32 copies: the output, then every gradient."""
    B, H, Nq, Nk, D, Dv = case.shape
    q, k, v, bias = case_inputs(case, **options)
    q32, k32, v32, bias32 = fp32_copy(q, k, v, bias)
    scale = D ** -0.5
    with no_tf32():
        out = kattn.attention(**launcher_kwargs(q, k, v, bias), scale=scale)
        ref = kattn.attention_ref(**launcher_kwargs(q32, k32, v32, bias32), scale=scale)
    assert out.dtype == case.dtype and out.shape == (B, H, Nq, Dv)
    assert_matches(out, ref, case.dtype, f"{case.id} out")
    if not backward:
        return
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(case.dtype).to(case.device)
    named = [(name, t) for name, t in trainable(q, k, v, bias) if t.requires_grad]
    named32 = [(name, t) for name, t in trainable(q32, k32, v32, bias32) if t.requires_grad]
    with no_tf32():
        grads = torch.autograd.grad(out, [t for _, t in named], grad_out)
        ref_grads = torch.autograd.grad(ref, [t for _, t in named32], grad_out.float())
    for (name, t), grad, ref_grad in zip(named, grads, ref_grads):
        assert grad.dtype == t.dtype and grad.shape == t.shape, name
        assert_matches(grad, ref_grad, case.dtype, f"{case.id} d{name}")
