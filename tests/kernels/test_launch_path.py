"""The launchers' host path: eager inference calls the launcher without the custom op's dispatch (and
the op stays in every graph), the discarded log-sum-exp goes to a shared scratch buffer, launch specs
are cached per key until ``reload_tuned()``, and the triton backend's plan runner passes an eval
``RelPosBias`` as its cached dense bias."""

from __future__ import annotations

import pytest
import torch
from fastvit.kernels import attention as kattn
from torch.utils._python_dispatch import TorchDispatchMode

import fastvit
from fastvit.attention import DenseBias, RelPosBias, attend


def reference_attention(q, k, v, bias=None):
    with fastvit.use_backend("reference"):
        return attend(q, k, v, bias=None if bias is None else DenseBias(bias))


def _qkv(device, n=20, d=16, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, n, d, generator=g).to(device).requires_grad_(requires_grad) for _ in range(3)]


@pytest.fixture
def op_calls(monkeypatch):
    """How often each path ran: the custom op's implementation and the launcher itself."""
    seen = {"op": 0, "fwd": 0}
    real_fwd = kattn.attention_fwd

    def counting_fwd(*args, **kwargs):
        seen["fwd"] += 1
        if kwargs.get("need_lse", True):
            seen["op"] += 1  # the op always needs the lse; the eager path never does
        return real_fwd(*args, **kwargs)

    monkeypatch.setattr(kattn, "attention_fwd", counting_fwd)
    return seen


def test_eager_inference_skips_the_op_and_matches_it(device, op_calls):
    q, k, v = _qkv(device)
    with torch.no_grad():
        direct = kattn.attention(q, k, v)
    assert op_calls == {"op": 0, "fwd": 1}
    via_op, _ = torch.ops.fastvit.attn_fwd(q, k, v, q.shape[-1] ** -0.5, None, None, None, None)
    assert op_calls == {"op": 1, "fwd": 2}
    assert torch.equal(direct, via_op)


def test_a_gradient_to_record_takes_the_op(device, op_calls):
    q, k, v = _qkv(device, requires_grad=True)
    out = kattn.attention(q, k, v)
    assert op_calls["op"] == 1
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    # a bias that wants a gradient counts too, even when q, k, v do not
    q, k, v = _qkv(device)
    table = torch.randn(7, 2, device=device, requires_grad=True)
    index = torch.randint(0, 7, (20, 20), device=device)
    kattn.attention(q, k, v, rel_table=table, rel_index=index).sum().backward()
    assert op_calls["op"] == 2 and table.grad is not None


class _Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_graphs_and_dispatch_modes_see_the_op(device):
    q, k, v = _qkv(device)
    with torch.no_grad():
        traced = torch.jit.trace(lambda q, k, v: kattn.attention(q, k, v, scale=0.25), (q, k, v), check_trace=False)
    assert "fastvit::attn_fwd" in str(traced.graph)
    mode = _Recording()
    with torch.no_grad(), mode:
        kattn.attention(q, k, v)
    assert any("fastvit.attn_fwd" in op for op in mode.ops), mode.ops


def test_the_scratch_lse_never_aliases_an_output(device):
    q, k, v = _qkv(device)
    q2, k2, v2 = _qkv(device, seed=1)
    with torch.no_grad():
        a = kattn.attention(q, k, v)
        b = kattn.attention(q2, k2, v2)  # same shape: the same scratch lse, a fresh output
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, reference_attention(q, k, v), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, reference_attention(q2, k2, v2), atol=1e-4, rtol=1e-4)
    # with the CLS probabilities the lse is read back, so it is a real one
    with torch.no_grad():
        out, cls_probs = kattn.attention_with_cls_probs(q, k, v)
    probs = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)[:, :, 0]
    torch.testing.assert_close(cls_probs, probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, a, atol=0, rtol=0)


def test_launch_specs_are_cached_until_reload(device):
    q, k, v = _qkv(device)
    kattn.reload_tuned()
    with torch.no_grad():
        kattn.attention(q, k, v)
    assert len(kattn._FWD_SPECS) == 1
    with torch.no_grad():
        kattn.attention(q[:, :, :7], k, v)  # another Nq: another key
    assert len(kattn._FWD_SPECS) == 2
    kattn.reload_tuned()
    assert not kattn._FWD_SPECS
    with kattn.forced_configs({"_attn_fwd": kattn.Config(16, 16, 2, 1)}), torch.no_grad():
        kattn.attention(q, k, v)
    assert not kattn._FWD_SPECS  # forced configs are never cached


@pytest.fixture
def fwd_launches(monkeypatch):
    seen = []
    real = kattn._launch

    def recording(kernel, grid, args, constexprs, cfg):
        if kernel.__name__ == "_attn_fwd":
            seen.append(dict(constexprs))
        real(kernel, grid, args, constexprs, cfg)

    monkeypatch.setattr(kattn, "_launch", recording)
    return seen


def test_the_runner_passes_an_eval_relpos_bias_as_its_cached_dense_bias(device, fwd_launches, monkeypatch):
    q, k, v = _qkv(device)
    table = torch.randn(9, 2, device=device)
    index = torch.randint(0, 9, (20, 20), device=device)
    dense_built = []
    real_gather = RelPosBias._gather
    monkeypatch.setattr(RelPosBias, "_gather", lambda self: dense_built.append(1) or real_gather(self))
    expected = reference_attention(q, k, v, bias=RelPosBias(table, index).materialize())
    assert len(dense_built) == 1
    with torch.no_grad(), fastvit.use_backend("triton"):
        first = attend(q, k, v, bias=RelPosBias(table, index))
        second = attend(q, k, v, bias=RelPosBias(table, index))
    assert len(dense_built) == 1  # once per (table, index), not per call
    assert [c["HAS_DENSE"] and not c["HAS_REL"] for c in fwd_launches] == [True, True]
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(first, second)
    with torch.no_grad():
        table.add_(1.0)  # an in-place change: the cached bias is stale and rebuilt
    with torch.no_grad(), fastvit.use_backend("triton"):
        third = attend(q, k, v, bias=RelPosBias(table, index))
    assert len(dense_built) == 2
    torch.testing.assert_close(third, reference_attention(q, k, v, bias=RelPosBias(table, index).materialize()),
                               atol=1e-4, rtol=1e-4)


def test_the_runner_gathers_a_trainable_table_in_the_kernel(device, fwd_launches):
    q, k, v = _qkv(device)
    table = torch.randn(9, 2, device=device, requires_grad=True)
    index = torch.randint(0, 9, (20, 20), device=device)
    with fastvit.use_backend("triton"):
        out = attend(q, k, v, bias=RelPosBias(table, index))
    # the launcher expands a small table itself (a dense bias), with the gradient flowing to the table
    assert fwd_launches and not fwd_launches[0]["HAS_REL"]
    out.square().sum().backward()
    ref_table = table.detach().clone().requires_grad_(True)
    reference_attention(q, k, v, bias=RelPosBias(ref_table, index).materialize()).square().sum().backward()
    torch.testing.assert_close(table.grad, ref_table.grad, atol=1e-4, rtol=1e-4)


def test_a_forward_patched_after_the_plan_was_built_is_used(device, monkeypatch):
    from fastvit.attention.backends.triton import TritonBackend

    q, k, v = _qkv(device)
    with torch.no_grad(), fastvit.use_backend("triton"):
        attend(q, k, v)
        calls = []
        real = TritonBackend.forward.__func__
        monkeypatch.setattr(TritonBackend, "forward", classmethod(lambda cls, inp: calls.append(1) or real(cls, inp)))
        out = attend(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-4, rtol=1e-4)
