"""fastvit.layers.Linear: the CPU inference fast path matches F.linear and never leaks into training."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastvit.layers.linear as linear
from fastvit.layers import FeedForward, Linear
from fastvit.layers.linear import PREPACK_MIN_WEIGHT, prepack_enabled

pytestmark = pytest.mark.skipif(not prepack_enabled(), reason="this torch build has no oneDNN linear")


IN, OUT = 256, 320  # in_features * out_features above PREPACK_MIN_WEIGHT: the oneDNN path is taken


def make(bias=True):
    torch.manual_seed(0)
    return Linear(IN, OUT, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_inference_path_matches_f_linear(bias, activation):
    layer = make(bias)
    x = torch.randn(3, 7, IN).transpose(0, 1)  # strided input
    expected = F.linear(x, layer.weight, layer.bias)
    if activation:
        expected = F.gelu(expected)
    with torch.no_grad():
        out = layer.forward_act(x, activation)
    assert layer._packed is not None, "the no-grad CPU call should use the prepacked weight"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_uses_f_linear_and_gets_gradients():
    layer = make()
    x = torch.randn(5, IN, requires_grad=True)
    layer(x).sum().backward()
    assert layer._packed is None
    assert layer.weight.grad is not None and x.grad is not None


def test_cache_sees_optimizer_steps_and_load_state_dict():
    layer = make()
    x = torch.randn(4, IN)
    with torch.no_grad():
        before = layer(x)
        layer.weight.add_(1.0)  # in place, as an optimizer step
        after = layer(x)
    torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)
    other = Linear(IN, OUT)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x), atol=1e-5, rtol=1e-5)


def test_bf16_without_onednn_bf16_gemms_falls_back_to_f_linear(monkeypatch):
    monkeypatch.setattr(linear, "_HAS_ONEDNN_BF16", False)  # an AVX2-only CPU
    layer = make()
    x = torch.randn(4, IN)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert not any(dtype == torch.bfloat16 for dtype, _ in (layer._packed or {}))


def test_bf16_autocast_path_returns_bf16_close_to_fp32():
    layer = make()
    x = torch.randn(4, IN)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)  # autocast's own path
    assert out.dtype == torch.bfloat16 == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FASTVIT_CPU_PREPACK", "0")
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, IN))
    assert layer._packed is None


def test_cache_is_not_pickled_or_deep_copied():
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, IN))
    assert layer._packed is not None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._packed is None
        torch.testing.assert_close(clone.weight, layer.weight)


def test_feedforward_fused_gelu_matches_the_unfused_module():
    torch.manual_seed(0)
    ff = FeedForward(IN, 2 * IN).eval()  # both GEMMs above PREPACK_MIN_WEIGHT: the fused GELU runs
    x = torch.randn(2, 5, IN)
    expected = ff.net[4](F.gelu(ff.net[1](ff.net[0](x))))
    with torch.no_grad():
        torch.testing.assert_close(ff(x), expected, atol=1e-5, rtol=1e-5)
    assert ff.net[1]._packed is not None and ff.net[4]._packed is not None


def test_module_built_under_inference_mode():
    with torch.inference_mode():
        layer = Linear(IN, OUT)
        x = torch.randn(3, IN)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_small_weights_keep_f_linear():
    assert 24 * 40 < PREPACK_MIN_WEIGHT
    layer = Linear(24, 40)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._packed is None


def test_fp32_and_bf16_packs_are_cached_side_by_side():
    layer = make()
    x = torch.randn(4, IN)
    with torch.no_grad():
        layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        packs = {dtype: entry[1] for (dtype, _), entry in layer._packed.items()}
        # bf16 is packed where oneDNN has bf16 GEMMs; an AVX2-only CPU keeps F.linear for it.
        assert set(packs) == ({torch.float32, torch.bfloat16} if linear._HAS_ONEDNN_BF16 else {torch.float32})
        layer(x)  # back to fp32: the fp32 pack is reused, not rebuilt
        assert layer._packed[(torch.float32, None)][1] is packs[torch.float32]
        layer.weight.add_(1.0)  # an in-place update invalidates the pack of the dtype in use
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
        assert layer._packed[(torch.float32, None)][1] is not packs[torch.float32]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(0, OUT), (0, 64), (64, OUT), (100, 101)])
def test_forward_rows_is_the_slice_of_the_output(bias, rows):
    layer = make(bias)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        full = layer(x)
        part = layer.forward_rows(x, *rows)
    torch.testing.assert_close(part, full[..., rows[0]:rows[1]], atol=1e-5, rtol=1e-5)
    # The 256x1 slice is under PREPACK_MIN_WEIGHT (F.linear); the others have their own pack.
    assert ((torch.float32, rows) in layer._packed) == (IN * (rows[1] - rows[0]) >= PREPACK_MIN_WEIGHT)
    x.requires_grad_(True)
    layer.forward_rows(x, *rows).sum().backward()  # training: F.linear on the slice, gradients flow
    assert layer.weight.grad[rows[0]:rows[1]].abs().sum() > 0
    assert layer.weight.grad[:rows[0]].abs().sum() == 0 and layer.weight.grad[rows[1]:].abs().sum() == 0


@pytest.mark.parametrize("rows", [(0, 0), (-1, 3), (10, OUT + 1), (5, 2)])
def test_forward_rows_rejects_bad_ranges(rows):
    with pytest.raises(ValueError, match="rows"):
        make().forward_rows(torch.randn(2, IN), *rows)
