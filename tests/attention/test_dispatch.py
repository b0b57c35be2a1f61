"""Dispatch: selection precedence, refusals with reasons, per-device auto order."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_class, registered

import fastvit
from fastvit.attention import (
    BACKENDS,
    HeadMix,
    RelPosBias,
    attend,
    auto_order,
    choose,
    explain,
    explain_call,
    get_selected_backend,
    make_inputs,
    set_backend,
    use_backend,
)
from fastvit.attention.dispatch import CPU_SDPA_MIN_KEYS


def qkv(n=16, d=8, nk=None):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, nk or n, d, generator=g),
            torch.randn(1, 2, nk or n, d, generator=g))


@pytest.fixture
def spy():
    """A backend that counts its calls and delegates to SDPA, registered for one test."""
    with registered(backend_class("spy", BACKENDS["sdpa"].forward)) as backend:
        yield backend


def test_precedence_argument_context_global_env(monkeypatch, spy):
    q, k, v = qkv()
    inp = make_inputs(q, k, v)
    monkeypatch.setenv("FASTVIT_ATTN_BACKEND", "sdpa")
    assert choose(inp).name == "sdpa"
    set_backend("reference")
    assert choose(inp).name == "reference"
    with use_backend("spy"):
        assert choose(inp).name == "spy"
        assert choose(inp, backend="sdpa").name == "sdpa"
        attend(q, k, v)
        assert spy.calls == 1
    assert choose(inp).name == "reference"
    set_backend(None)
    assert choose(inp).name == "sdpa"  # env again
    monkeypatch.delenv("FASTVIT_ATTN_BACKEND")
    assert get_selected_backend().name == "auto"


def test_selection_is_resolved_at_call_time_not_construction(spy):
    entry = fastvit.models.get_model_entry("vit_tiny_patch16_224")
    model = entry.build(**entry.test_overrides)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    model(x)
    assert spy.calls == 0
    with use_backend("spy"):
        model(x)
    assert spy.calls == 2  # depth 2: one call per layer


def test_unknown_backend_names_are_value_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        set_backend("nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with use_backend("nope"):
            pass
    monkeypatch.setenv("FASTVIT_ATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTVIT_ATTN_BACKEND='nope'"):
        attend(*qkv())


def test_explicit_backend_that_cannot_serve_raises_with_reasons():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="return_probs needs the full probabilities; sdpa never"):
        attend(q, k, v, return_probs=True, backend="sdpa")
    with pytest.raises(ValueError, match="head mixing"):
        attend(q, k, v, head_mix=HeadMix(post=torch.eye(2)), backend="sdpa")
    with pytest.raises(ValueError, match="xformers"):
        attend(q, k, v, backend="xformers")


def test_non_strict_selection_falls_back_to_auto():
    q, k, v = qkv()
    with use_backend("sdpa", strict=False):
        res = attend(q, k, v, return_probs=True)  # sdpa cannot; auto picks the reference
    assert res.probs.shape == (1, 2, 16, 16)


def test_auto_walks_past_refusing_backends():
    q, k, v = qkv(n=CPU_SDPA_MIN_KEYS[torch.float32])
    inp = make_inputs(q, k, v, return_cls_probs=True)
    assert auto_order(inp)[0] == "sdpa"
    assert choose(inp).name == "reference"  # sdpa refuses cls probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_auto_order_depends_on_sequence_length_and_dtype(dtype):
    threshold = CPU_SDPA_MIN_KEYS[dtype]
    short = make_inputs(*(t.to(dtype) for t in qkv(n=8, nk=threshold - 1)))
    long = make_inputs(*(t.to(dtype) for t in qkv(n=8, nk=threshold)))
    assert choose(short).name == "reference"
    assert choose(long).name == "sdpa"


def test_explain_lists_reasons_for_every_backend():
    q, k, v = qkv(d=8)
    reasons = explain_call(q, k, v, return_probs=True)
    assert set(reasons) == set(BACKENDS)
    assert reasons["reference"] == []
    assert any("return_probs" in r for r in reasons["sdpa"])
    assert reasons["xformers"] and all(isinstance(r, str) and r for r in reasons["xformers"])
    inp = make_inputs(q, k, v)
    assert explain(inp) == {n: b.not_supported_reasons(inp) for n, b in BACKENDS.items()}


def test_no_backend_can_serve_lists_every_reason():
    q, k, v = (t.double() for t in qkv())
    with pytest.raises(ValueError) as e:
        attend(q, k, v, return_probs=True, backend="sdpa")
    assert "fp64" in str(e.value) and "return_probs" in str(e.value)
    with use_backend("auto"):
        res = attend(q, k, v, return_cls_probs=True)  # fp64 + cls probs: only the reference can
    assert res.cls_probs.dtype == torch.float64
    q, k, v = (x.to("meta") for x in qkv())  # a device no backend declares
    with pytest.raises(ValueError) as e:
        attend(q, k, v)
    message = str(e.value)
    assert message.startswith("no attention backend can serve meta-fp32")
    for name in BACKENDS:
        assert f"{name}: " in message


def test_backends_declare_capabilities_and_tolerances():
    for name, b in BACKENDS.items():
        assert b.name == name
        assert isinstance(b.availability(), tuple)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            atol, rtol = b.tolerances[dt]
            assert 0 < atol < 0.1 and 0 < rtol < 0.1


def test_relpos_bias_table_gets_a_gradient_through_dispatch():
    q, k, v = qkv()
    table = torch.randn(31, 2, requires_grad=True)
    index = torch.randint(0, 31, (16, 16))
    for backend in ("reference", "sdpa"):
        table.grad = None
        attend(q, k, v, bias=RelPosBias(table, index), backend=backend).sum().backward()
        assert table.grad is not None and table.grad.abs().sum() > 0


def test_deterministic_mode_refuses_declared_non_deterministic_bias_gradients():
    """A backend declaring ``deterministic = False`` refuses trainable biases off the CPU under
    torch.use_deterministic_algorithms(True); detached biases and deterministic backends are served."""
    from fastvit.attention import DenseBias, get_backend, make_inputs

    _Atomic = backend_class("atomic_for_test", devices=("cpu", "meta"), deterministic=False)

    q, k, v = (torch.randn(1, 2, 4, 8, device="meta") for _ in range(3))
    trainable = make_inputs(q, k, v, bias=DenseBias(torch.zeros(1, 2, 4, 4, device="meta", requires_grad=True)))
    frozen = make_inputs(q, k, v, bias=DenseBias(torch.zeros(1, 2, 4, 4, device="meta")))
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert any("atomic adds" in r for r in _Atomic.not_supported_reasons(trainable))
        assert not any("atomic adds" in r for r in _Atomic.not_supported_reasons(frozen))
        assert not any("atomic adds" in r for r in get_backend("triton").not_supported_reasons(trainable))
    finally:
        torch.use_deterministic_algorithms(saved)
    assert not any("atomic adds" in r for r in _Atomic.not_supported_reasons(trainable))


def test_cuda_auto_puts_sdpa_first_unless_the_call_needs_a_fused_kernel():
    """Untuned CUDA dispatch: fastvit's kernels first only for what SDPA cannot fuse (the order itself is
    device-independent: the inputs here are CPU tensors)."""
    from fastvit.attention import DenseBias, KeyPaddingMask, RelPosBias, Window, make_inputs
    from fastvit.attention.dispatch import CUDA_ORDER, CUDA_PLAIN_ORDER, cuda_fusion

    assert CUDA_PLAIN_ORDER[0] == "sdpa" and CUDA_ORDER[0] == "triton" and set(CUDA_ORDER) == set(CUDA_PLAIN_ORDER)
    q = torch.randn(1, 2, 16, 8)
    table, index = torch.randn(9, 2, requires_grad=True), torch.randint(0, 9, (16, 16))
    plain = {"plain": {}, "dense bias": dict(bias=DenseBias(torch.randn(1, 2, 16, 16)))}
    fused = {"window": dict(window=Window(grid=(4, 4), size=(2, 2))), "cls probs": dict(return_cls_probs=True),
             "key padding": dict(bias=KeyPaddingMask(torch.ones(1, 16, dtype=torch.bool))),
             "trainable table": dict(bias=RelPosBias(table, index))}
    for name, kwargs in plain.items():
        assert cuda_fusion(make_inputs(q, q, q, **kwargs)) is None, name
    for name, kwargs in fused.items():
        assert cuda_fusion(make_inputs(q, q, q, **kwargs)) is not None, name
    assert cuda_fusion(make_inputs(q, q, torch.randn(1, 2, 16, 4))) == "Dv != D"
    with torch.no_grad():  # an eval table: SDPA takes the cached dense bias as its float mask
        assert cuda_fusion(make_inputs(q, q, q, bias=RelPosBias(table, index))) is None
