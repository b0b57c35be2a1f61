"""torch.compile(fullgraph=True) traces the attention layer and the models without graph breaks (a graph
break under fullgraph=True raises), and mode="reduce-overhead" (inductor; CUDA graphs where there is a GPU)
serves fastvit's and patched timm models on the CPU.

Patched timm models under fullgraph=True: tests/compat/test_timm_patch.py::test_compile_fullgraph.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_VIT, assert_close

import fastvit
from fastvit.attention import KeyPaddingMask, RelPosBias, attend, plan_info


def test_vit_compiles_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    model = fastvit.ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.numel())


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_attend_with_descriptors_compiles_fullgraph(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 5, 8, generator=g)
    table, index = torch.randn(9, 2, generator=g), torch.randint(0, 9, (5, 5), generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])

    def fn(q):
        return attend(q, q, q, bias=(RelPosBias(table, index), KeyPaddingMask(mask)), backend=backend)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(q), fn(q))


def _fastvit_vit() -> torch.nn.Module:
    return fastvit.ViT(**SMALL_VIT)


def _patched_timm_vit() -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    from fastvit.compat.timm import patch_timm

    return patch_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                        patch_size=8, embed_dim=32, depth=2, num_heads=2))


@pytest.mark.parametrize("make_model", [_fastvit_vit, _patched_timm_vit], ids=["fastvit-vit", "timm-vit-patched"])
def test_reduce_overhead_mode_matches_eager_across_batch_sizes(make_model):
    """Twice with one input shape (the second call runs the compiled graph as it is), then another batch
    size (a recompile); the compiled graphs never touch the attention plans (compile traces attend's full
    path)."""
    torch.manual_seed(0)
    model = make_model().eval()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 3, 32, 32, generator=g)] * 2 + [torch.randn(3, 3, 32, 32, generator=g)]
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        with torch.no_grad():
            expected = [model(x) for x in inputs]
            built = plan_info()["built"]
            for i, (x, want) in enumerate(zip(inputs, expected)):
                assert_close(compiled(x), want, atol=1e-5, rtol=1e-5, what=f"call {i + 1}, batch {x.shape[0]}")
    finally:
        torch._dynamo.reset()
    assert plan_info()["built"] == built
