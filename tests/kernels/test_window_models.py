"""The windowed models on the triton backend (the fused window kernel, in the Triton interpreter on
the CPU) against the same weights on the reference backend: logits and every parameter's gradient.

``use_backend("triton")`` is strict: every attention call of the model must be served by triton (a
refusal raises), so these runs prove the models' ``attend(..., window=...)`` calls reach the window
kernel, with their shifts, dilations and biases, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from fastvit.crossformer import CrossFormer
from fastvit.kernels import window_attention as kwin
from fastvit.nest import NesT
from fastvit.twins_svt import Transformer as TwinsStage
from helpers import assert_close

from fastvit.attention import get_backend, use_backend

ok, why = get_backend("triton").availability()
pytestmark = pytest.mark.skipif(not ok, reason=f"triton unavailable: {why}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _twins():
    # one Twins-SVT stage (LSA in 2x2 windows, then GSA over 2x2-strided keys) on an 8x12 map: the full
    # model has 8 heads of 64 everywhere, minutes of programs in the interpreter
    return TwinsStage(16, depth=1, heads=2, dim_head=8, local_patch_size=2, global_k=2), (16, 8, 12)


def _nest():
    return NesT(image_size=32, patch_size=4, num_classes=10, dim=16, heads=2, num_hierarchies=3,
                block_repeats=(1, 1, 1)), (3, 32, 32)


def _crossformer():
    # short distance in 2x2 windows, long distance with interval 4 (a dilated window) in stage 1
    return CrossFormer(dim=(32, 32, 64, 64), depth=(1, 1, 1, 1), global_window_size=(4, 2, 2, 1),
                       local_window_size=2, cross_embed_kernel_sizes=((4, 8), (2, 4), (2, 4), (2, 4)),
                       num_classes=10), (3, 64, 64)


def _timm(name: str, **kwargs):
    timm = pytest.importorskip("timm")
    from fastvit.compat.timm import patch_timm

    return patch_timm(timm.create_model(name, pretrained=False, **kwargs)), (3, kwargs["img_size"], kwargs["img_size"])


MODELS = {
    "twins_svt": _twins,
    "nest": _nest,
    "crossformer": _crossformer,
    # shifted windows with Swin's relative table
    "timm_swin": lambda: _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4,
                               embed_dim=16, depths=(2,), num_heads=(2,)),
    # block attention and grid attention (a dilated window), relative tables
    "timm_maxvit": lambda: _timm("maxvit_tiny_tf_224", img_size=64, embed_dim=(16,), depths=(1,), stem_width=16,
                                 transformer_window_size=(4, 4), transformer_grid_size=(4, 4),
                                 transformer_dim_head=8),
}


# what the model's windows must exercise in the kernel
FEATURES = {"timm_swin": ("shift",), "timm_maxvit": ("dilation",), "crossformer": ("dilation",)}


def _run(model, image, backend: str):
    model.zero_grad(set_to_none=True)
    with use_backend(backend):
        logits = model(image)
    torch.manual_seed(7)
    (logits * torch.randn_like(logits)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("name", list(MODELS))
def test_windowed_model_on_triton_matches_the_reference(name, monkeypatch):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model = model.to(DEVICE).eval()  # eval: no dropout, batch norms fixed, so both runs see the same model
    image = torch.randn(2, *shape, device=DEVICE)
    expected, expected_grads = _run(model, image, "reference")
    calls = []
    fused = kwin.window_attention
    monkeypatch.setattr(kwin, "window_attention", lambda *a, **kw: calls.append(kw) or fused(*a, **kw))
    logits, grads = _run(model, image, "triton")
    assert calls, f"{name} made no windowed call to the fused window kernel"
    for feature, plain in (("shift", (0, 0)), ("dilation", (1, 1))):
        if feature in FEATURES.get(name, ()):
            assert any(tuple(kw[feature]) != plain for kw in calls), f"{name} made no call with a {feature}"
    assert_close(logits, expected, atol=1e-4, rtol=1e-4, what=f"{name} logits")
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    # fp32 sums in another order: errors relative to the largest gradient of the model (a parameter whose
    # gradient is ~1e-7 everywhere, e.g. a position embedding behind a norm, is noise at any atol of its own)
    largest = max(float(g.abs().max()) for g in expected_grads.values())
    for n, g in grads.items():
        assert_close(g, expected_grads[n], atol=1e-5 * largest, rtol=1e-3, what=f"{name} grad {n}")
