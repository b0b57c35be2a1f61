"""fastvit.layers.Linear: the CPU inference fast path matches F.linear and never leaks into training."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from fastvit.layers import FeedForward, Linear
from fastvit.layers.linear import prepack_enabled

pytestmark = pytest.mark.skipif(not prepack_enabled(), reason="this torch build has no oneDNN linear")


def make(bias=True):
    torch.manual_seed(0)
    return Linear(24, 40, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_inference_path_matches_f_linear(bias, activation):
    layer = make(bias)
    x = torch.randn(3, 7, 24).transpose(0, 1)  # strided input
    expected = F.linear(x, layer.weight, layer.bias)
    if activation:
        expected = F.gelu(expected)
    with torch.no_grad():
        out = layer.forward_act(x, activation)
    assert layer._packed is not None, "the no-grad CPU call should use the prepacked weight"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_uses_f_linear_and_gets_gradients():
    layer = make()
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).sum().backward()
    assert layer._packed is None
    assert layer.weight.grad is not None and x.grad is not None


def test_cache_sees_optimizer_steps_and_load_state_dict():
    layer = make()
    x = torch.randn(4, 24)
    with torch.no_grad():
        before = layer(x)
        layer.weight.add_(1.0)  # in place, as an optimizer step
        after = layer(x)
    torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)
    other = Linear(24, 40)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_path_returns_bf16_close_to_fp32():
    layer = make()
    x = torch.randn(4, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)  # autocast's own path
    assert out.dtype == torch.bfloat16 == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FASTVIT_CPU_PREPACK", "0")
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, 24))
    assert layer._packed is None


def test_cache_is_not_pickled_or_deep_copied():
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, 24))
    assert layer._packed is not None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._packed is None
        torch.testing.assert_close(clone.weight, layer.weight)


def test_feedforward_fused_gelu_matches_the_unfused_module():
    torch.manual_seed(0)
    ff = FeedForward(24, 48).eval()
    x = torch.randn(2, 5, 24)
    expected = ff.net[4](F.gelu(ff.net[1](ff.net[0](x))))
    with torch.no_grad():
        torch.testing.assert_close(ff(x), expected, atol=1e-5, rtol=1e-5)


def test_module_built_under_inference_mode():
    with torch.inference_mode():
        layer = Linear(24, 40)
        x = torch.randn(3, 24)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
