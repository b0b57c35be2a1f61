"""Every registered preset (built with its small test_overrides): shape, no NaN, a gradient on every
parameter, the same logits under every CPU backend, state_dict round trip, vit-pytorch parity, and
vit-pytorch's state_dict order and initialisation under the same seed. tests/models/ holds only what
each model adds to these."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_close

import fastvit
from fastvit.models import get_model_entry, list_models

MODELS = list_models()
HAS_VIT_PYTORCH = importlib.util.find_spec("vit_pytorch") is not None


def build(name: str, seed: int = 0):
    entry = get_model_entry(name)
    torch.manual_seed(seed)
    model = entry.build(**entry.test_overrides)
    return entry, model


def example(entry, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *entry.test_input(), generator=g)


def logits(out):
    """Models with extra outputs (distillation heads) return tuples; the logits come first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def test_registry_is_populated_with_the_vit_presets():
    for name in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"):
        assert name in MODELS
    expected = sorted(n for n in MODELS if n.startswith("vit_") and n.endswith("patch16_224"))
    assert list_models("vit_*_patch16_224") == expected
    with pytest.raises(ValueError, match="unknown model 'vit_small'; did you mean"):
        fastvit.create_model("vit_small")


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_finite_and_every_parameter_gets_a_gradient(name):
    entry, model = build(name)
    x = example(entry)
    out = logits(model(x))
    num_classes = {**entry.kwargs, **entry.test_overrides}.get("num_classes")
    assert out.shape == (2, num_classes), f"{name}: output {tuple(out.shape)}"
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.numel() and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_same_logits_under_every_cpu_backend(name):
    entry, model = build(name)
    model.eval()
    x = example(entry)
    with torch.no_grad(), fastvit.use_backend("reference"):
        ref = logits(model(x))
    for backend in ("auto", "sdpa"):
        # strict=False: calls a backend cannot serve (head mixing, probabilities) fall back to auto.
        with torch.no_grad(), fastvit.use_backend(backend, strict=False):
            out = logits(model(x))
        assert_close(out, ref, atol=1e-4, rtol=1e-4, what=f"{name} under {backend}")


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    entry, a = build(name, seed=0)
    _, b = build(name, seed=1)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = example(entry)
    with torch.no_grad():
        assert torch.equal(logits(a(x)), logits(b(x)))


@pytest.mark.skipif(not HAS_VIT_PYTORCH, reason="vit-pytorch is not installed (pip install fastvit[dev])")
@pytest.mark.parametrize("name", [n for n in MODELS if get_model_entry(n).vit_pytorch])
def test_vit_pytorch_parity(name):
    entry = get_model_entry(name)
    torch.manual_seed(0)
    reference = entry.build_vit_pytorch(**entry.test_overrides).eval()
    torch.manual_seed(1)  # different init: the weights must come from the checkpoint
    model = entry.build(**entry.test_overrides, **entry.vit_pytorch_compat).eval()
    model.load_vit_pytorch_state_dict(reference.state_dict())
    x = example(entry)
    with torch.no_grad():
        assert_close(logits(model(x)), logits(reference(x)), atol=1e-5, rtol=1e-5, what=f"{name} vs vit-pytorch")


# Presets whose random init (not their keys or outputs) differs from vit-pytorch's under the same seed.
INIT_DIFFERS = {"cct_14", "cct_16", "regionvit_seed_224", "twins_svt_seed_224"}


@pytest.mark.skipif(not HAS_VIT_PYTORCH, reason="vit-pytorch is not installed (pip install fastvit[dev])")
@pytest.mark.parametrize("name", [n for n in MODELS if get_model_entry(n).vit_pytorch and n not in INIT_DIFFERS])
def test_same_seed_gives_vit_pytorchs_state_dict_order_and_initialisation(name):
    entry = get_model_entry(name)
    torch.manual_seed(3)
    ref_sd = entry.build_vit_pytorch(**entry.test_overrides).state_dict()
    torch.manual_seed(3)
    fast_sd = entry.build(**entry.test_overrides, **entry.vit_pytorch_compat).state_dict()
    assert list(fast_sd) == list(ref_sd), f"{name}: state_dict keys or their order differ from vit-pytorch's"
    for key, value in ref_sd.items():  # buffers too (LeViT's pos_indices, computed independently)
        assert value.dtype == fast_sd[key].dtype and torch.equal(value, fast_sd[key]), f"{name}: {key}"


@pytest.mark.parametrize("name", MODELS)
def test_wrong_channel_count_is_a_value_error(name):
    entry, model = build(name)
    c, h, w = entry.test_input()
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, c + 1, h, w))


@pytest.mark.parametrize("name", MODELS)
def test_cpu_inference_fast_paths(name, monkeypatch):
    """The oneDNN Linear path (forced on for the small test sizes) gives the training path's logits,
    and bf16 autocast stays close to fp32."""
    import fastvit.layers.linear as linear

    if not linear.prepack_enabled():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(linear, "PREPACK_MIN_WEIGHT", 0)
    entry, model = build(name)
    model.eval()
    x = example(entry)
    plain = logits(model(x)).detach()  # grad enabled, weights require grad: F.linear everywhere
    with torch.inference_mode():
        fast = logits(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = logits(model(x)).float()
    packed = [n for n, m in model.named_modules() if isinstance(m, linear.Linear) and m._packed]
    assert packed, f"{name}: no Linear took the oneDNN path"
    assert_close(fast, plain, atol=1e-4, rtol=1e-4, what=f"{name} prepacked vs F.linear")
    rel = ((half - plain).norm() / plain.norm()).item()
    assert 0 < rel < 5e-2, f"{name}: bf16 autocast logits differ from fp32 by {rel:.3g} (relative L2)"
