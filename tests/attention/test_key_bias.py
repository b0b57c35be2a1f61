"""``KeyBias``: a per-key additive term (token merging's proportional attention). Its meaning is checked
directly (a key repeated s times is one key with log(s) added), against the equivalent ``DenseBias``,
through packed calls, and bad shapes and combinations fail early naming the values. Every backend
against the reference, forward and gradients (the key bias's included), is in ``test_backends.py``
(the ``keybias`` cases)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from fastvit.attention import BACKENDS, DenseBias, KeyBias, Packed, Window, attend


def _qkv(B=2, H=3, Nq=5, Nk=7, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g), torch.randn(B, H, Nk, D, generator=g),
            torch.randn(B, H, Nk, D, generator=g))


def _available():
    return [n for n, b in BACKENDS.items() if b.availability()[0] and "cpu" in b.devices]


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_a_key_repeated_s_times_is_one_key_with_log_s_added(backend):
    q, k, v = _qkv(Nk=4)
    sizes = torch.tensor([3, 1, 2, 1])
    repeated = attend(q, k.repeat_interleave(sizes, dim=2), v.repeat_interleave(sizes, dim=2), backend="reference")
    merged = attend(q, k, v, bias=KeyBias(sizes.float().log().expand(2, -1)), backend=backend)
    assert_close(merged, repeated, atol=1e-5, rtol=1e-5, what=f"{backend}: proportional attention")


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per-key", "per-head"])
def test_key_bias_is_the_dense_bias_broadcast_over_queries(backend, per_head):
    q, k, v = _qkv()
    t = torch.randn(2, 3, 7) if per_head else torch.randn(2, 7)
    dense = t[:, :, None, :] if per_head else t[:, None, None, :]
    got = attend(q, k, v, bias=KeyBias(t), backend=backend)
    assert_close(got, attend(q, k, v, bias=DenseBias(dense), backend="reference"), atol=1e-5, rtol=1e-5,
                 what=f"{backend} KeyBias vs DenseBias")
    assert KeyBias(t).materialize().shape == dense.shape


def test_a_key_bias_composes_with_a_dense_bias_and_takes_gradients():
    q, k, v = _qkv()
    t = torch.randn(2, 7, requires_grad=True)
    d = torch.randn(1, 3, 5, 7, requires_grad=True)
    out = attend(q, k, v, bias=(KeyBias(t), DenseBias(d)), backend="sdpa")
    ref = attend(q, k, v, bias=DenseBias(t[:, None, None, :] + d), backend="reference")
    assert_close(out, ref, atol=1e-5, rtol=1e-5, what="KeyBias + DenseBias")
    g_t, g_d = torch.autograd.grad(out.square().sum(), (t, d))
    r_t, r_d = torch.autograd.grad(ref.square().sum(), (t, d))
    assert_close(g_t, r_t, atol=1e-5, rtol=1e-5, what="d key bias")
    assert_close(g_d, r_d, atol=1e-5, rtol=1e-5, what="d dense bias")


def test_packed_calls_read_each_sequence_s_keys():
    packed = Packed([3, 5], [4, 6])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (8, 10, 10))
    t = torch.randn(1, 10, generator=g)
    want = attend(q, k, v, packed=packed, bias=DenseBias(t[:, None, None, :]), backend="reference")
    for backend in ("reference", "sdpa", "flex"):
        assert_close(attend(q, k, v, packed=packed, bias=KeyBias(t), backend=backend), want, atol=1e-5, rtol=1e-5,
                     what=f"{backend} packed KeyBias")


@pytest.mark.parametrize("make, match", [
    (lambda: KeyBias(torch.zeros(7)), r"\[B, Nk\] or \[B, H, Nk\], got shape \(7,\)"),
    (lambda: KeyBias(torch.zeros(2, 3, 1, 7)), r"got shape \(2, 3, 1, 7\)"),
])
def test_bad_key_bias_shapes_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("tensor, match", [
    (torch.zeros(2, 6), r"KeyBias of shape \(2, 6\) does not broadcast"),
    (torch.zeros(3, 7), r"KeyBias of shape \(3, 7\) does not broadcast"),
    (torch.zeros(2, 4, 7), r"KeyBias of shape \(2, 4, 7\) does not broadcast"),
    (torch.zeros(2, 7, dtype=torch.int64), "KeyBias must be floating point"),
])
def test_key_bias_that_does_not_fit_the_call_is_refused_naming_it(tensor, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, bias=KeyBias(tensor))


def test_a_key_bias_with_a_window_is_refused_with_the_alternative():
    q = torch.zeros(1, 2, 16, 8)
    with pytest.raises(ValueError, match="KeyBias cannot be combined with a window"):
        attend(q, q, q, bias=KeyBias(torch.zeros(1, 16)), window=Window(grid=(4, 4), size=(2, 2)))


def test_every_cpu_backend_declares_it():
    assert {"reference", "sdpa"} <= set(_available())
    for name in _available():
        assert KeyBias in BACKENDS[name].bias_types, name
