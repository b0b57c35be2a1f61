"""``KeyBias`` on the triton backend (under the interpreter on a CPU): it runs as the kernels' dense bias
expanded over the queries (a zero row stride), alone and added to a dense bias, forward and the
gradients of q, k, v and of the key bias, through the plan's runner and through ``forward``."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import BF16, DEVICE, F32, TOLERANCES

from fastvit.attention import DenseBias, KeyBias, attend, make_inputs
from fastvit.attention.backends.triton import TritonBackend
from fastvit.attention.testing import compare, no_tf32


def _close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    atol *= max(1.0, float(expected.detach().abs().max())) * 2
    res = compare(actual.float(), expected.float(), atol, rtol)
    assert res["ok"], f"{what}: max abs err {res['max_abs_err']:.3g} at {res['index']}"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_dense", [False, True], ids=["alone", "with-dense"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-key", "per-head"])
def test_key_bias_on_the_kernels_matches_the_reference(dtype, with_dense, per_head):
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 50, 32
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    t = torch.randn(B, H, N, generator=g) if per_head else torch.randn(B, N, generator=g)
    t = t.to(DEVICE, dtype).requires_grad_()
    bias = [KeyBias(t)]
    if with_dense:
        bias.append(DenseBias(torch.randn(1, H, N, N, generator=g).to(DEVICE, dtype)))
    out = attend(q, k, v, bias=tuple(bias), backend="triton")
    also = TritonBackend.forward(make_inputs(q, k, v, bias=tuple(bias))).out
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, t)]
    with no_tf32():
        ref_bias = [KeyBias(leaves[3])] + [DenseBias(b.tensor.float()) for b in bias[1:]]
        ref = attend(*leaves[:3], bias=tuple(ref_bias), backend="reference")
    _close(out, ref, dtype, "out")
    _close(also, ref, dtype, "forward()")
    do = torch.randn(ref.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v, t), do.to(dtype))
    ref_grads = torch.autograd.grad(ref, leaves, do)
    for name, a, b in zip(("dq", "dk", "dv", "d key bias"), grads, ref_grads):
        assert a.shape == b.shape, name
        _close(a, b, dtype, name)
