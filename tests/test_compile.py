"""torch.compile(fullgraph=True) traces the attention layer and the models without graph breaks."""

from __future__ import annotations

import pytest
import torch

import fastvit
from fastvit.attention import KeyPaddingMask, RelPosBias, attend


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
