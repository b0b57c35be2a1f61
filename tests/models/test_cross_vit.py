"""CrossViT: vit-pytorch parity, one-query cross attention, non-square images, positions, bad input."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.cross_vit import CrossViT
from helpers import assert_close, assert_pair_matches

from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.cross_vit import CrossViT as RefCrossViT  # noqa: E402

# The seed README config, shrunk: 2 multi-scale blocks, 2 cross attention rounds, different widths.
SMALL = dict(num_classes=10, depth=2,
             sm_dim=32, sm_patch_size=8, sm_enc_depth=2, sm_enc_heads=2, sm_enc_mlp_dim=64,
             sm_enc_dim_head=16,
             lg_dim=48, lg_patch_size=16, lg_enc_depth=1, lg_enc_heads=3, lg_enc_mlp_dim=96,
             lg_enc_dim_head=16,
             cross_attn_depth=2, cross_attn_heads=2, cross_attn_dim_head=16)


pair_of_models = partial(helpers.pair_of_models, CrossViT, RefCrossViT)


@pytest.mark.parametrize("overrides", [{}, {"lg_dim": 32}, {"channels": 1}],
                         ids=["two-widths", "same-width", "1ch"])
def test_matches_vit_pytorch(overrides):
    kwargs = {**SMALL, "image_size": 32, **overrides}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, kwargs.get("channels", 3), 32, 32)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what=f"crossvit {overrides}")


def test_seed_readme_example_matches_vit_pytorch():
    kwargs = dict(image_size=256, num_classes=1000, depth=4,
                  sm_dim=192, sm_patch_size=16, sm_enc_depth=2, sm_enc_heads=8, sm_enc_mlp_dim=2048,
                  lg_dim=384, lg_patch_size=64, lg_enc_depth=3, lg_enc_heads=8, lg_enc_mlp_dim=2048,
                  cross_attn_depth=2, cross_attn_heads=8, dropout=0.1, emb_dropout=0.1)
    fast, ref = pair_of_models(**kwargs)
    assert_pair_matches(fast, ref, torch.randn(1, 3, 256, 256), out_shape=(1, 1000), what="seed README CrossViT")


def test_keeps_vit_pytorch_dropout_defaults():
    model = CrossViT(image_size=32, **SMALL)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.1}
    assert {m.attn_dropout for m in model.modules() if hasattr(m, "attn_dropout")} == {0.1}
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    assert not torch.allclose(model.train()(x), model(x))  # dropout is active in training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_cross_attention_is_one_query_over_the_other_branch_and_itself():
    model = CrossViT(image_size=32, **SMALL).eval()
    with torch.no_grad():
        _, attns = Recorder(model)(torch.randn(2, 3, 32, 32))
    # Per block: sm encoder (2 layers over 1 + 16 tokens), lg encoder (1 layer over 1 + 4), then 2 rounds of
    # (small CLS over 1 + 4 large tokens, large CLS over 1 + 16 small tokens).
    shapes = [tuple(a.shape) for a in attns]
    block = [(2, 2, 17, 17)] * 2 + [(2, 3, 5, 5)] + [(2, 2, 1, 5), (2, 2, 1, 17)] * 2
    assert shapes == block * 2
    cross = attns[3]
    assert torch.allclose(cross.sum(-1), torch.ones(2, 2, 1), atol=1e-5)


def test_non_square_images_and_patches():
    kwargs = {**SMALL, "image_size": (32, 64), "sm_patch_size": (8, 16), "lg_patch_size": 16}
    model = CrossViT(**kwargs).eval()
    assert model.sm_image_embedder.grid == (4, 4) and model.lg_image_embedder.grid == (2, 4)
    assert model.sm_image_embedder.pos_embedding.shape == (1, 17, 32)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_smaller_inputs_use_the_2d_grid_crop_and_legacy_flag_restores_vit_pytorch():
    fast, ref = pair_of_models(image_size=64, **SMALL)
    x = torch.randn(2, 3, 32, 32)  # a 4 x 4 (small) / 2 x 2 (large) grid out of 8 x 8 / 4 x 4 tables
    embedder = fast.sm_image_embedder
    pos = embedder.position_embedding(4, 4)
    assert torch.equal(pos[0, 1:], embedder.pos_embedding[0, 1:].view(8, 8, -1)[:4, :4].reshape(16, -1))
    with torch.no_grad():
        assert not torch.allclose(fast(x), ref(x), atol=1e-3)  # vit-pytorch slices the flat tables
        fast.legacy_pos_slicing = True
        assert fast.lg_image_embedder.legacy_pos_slicing
        assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5, what="legacy slicing")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 24, 32), r"image size \(24, 32\) is not divisible by the patch size \(16, 16\)"),
        ((1, 3, 64, 32), r"image size \(64, 32\) does not fit the model: expected at most \(32, 32\)"),
        ((1, 1, 32, 32), r"expected 3 channels, got 1"),
        ((3, 32, 32), r"expected an image batch"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    model = CrossViT(image_size=32, **SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"image size \(40, 40\) must be divisible by the patch size \(16"):
        CrossViT(image_size=40, **SMALL)
