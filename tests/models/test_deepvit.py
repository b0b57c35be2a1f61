"""DeepViT: vit-pytorch parity (eval and seeded training), re-attention dispatch, (h, w) sizes,
smaller inputs, Recorder, bad input."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.deepvit import DeepViT
from helpers import assert_close, assert_matches_vit_pytorch

import fastvit
from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch", reason="needs vit-pytorch (pip install fastvit[dev])")
from vit_pytorch.deepvit import DeepViT as RefDeepViT  # noqa: E402

# The seed README config, shrunk: 64 px, patch 16, width 64, 2 blocks, 4 heads.
SEED_SMALL = dict(image_size=64, patch_size=16, num_classes=10, dim=64, depth=2, heads=4, dim_head=16,
                  mlp_dim=128, dropout=0.1, emb_dropout=0.1)


pair_of_models = partial(helpers.pair_of_models, DeepViT, RefDeepViT)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_matches_vit_pytorch_in_eval(pool):
    assert_matches_vit_pytorch(pair_of_models, (2, 3, 64, 64), what=f"deepvit pool={pool}", **SEED_SMALL, pool=pool)


def test_matches_vit_pytorch_in_training_with_the_same_seed():
    """Dropout on the probabilities sits before the head mixing, as in vit-pytorch (reference path:
    its dropout draws the same random numbers)."""
    fast, ref = pair_of_models(**{**SEED_SMALL, "dropout": 0.2, "emb_dropout": 0.2})
    fast.train(), ref.train()
    x = torch.randn(2, 3, 64, 64)
    with fastvit.use_backend("reference"):
        torch.manual_seed(1)
        expected = ref(x)
        torch.manual_seed(1)
        actual = fast(x)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5, what="deepvit train")


def test_re_attention_is_declared_as_head_mixing():
    model = DeepViT(**SEED_SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), fastvit.use_backend("sdpa"), pytest.raises(ValueError, match="head mixing"):
        model(x)
    with torch.no_grad():
        with fastvit.use_backend("reference"):
            expected = model(x)
        with fastvit.use_backend("sdpa", strict=False):  # falls back for the head-mixed calls
            assert_close(model(x), expected, atol=1e-6, rtol=1e-6, what="fallback")


@pytest.mark.parametrize("image_size,patch_size", [((32, 64), (16, 8)), ((48, 32), 16)])
def test_non_square_images_and_patches(image_size, patch_size):
    model = DeepViT(**{**SEED_SMALL, "image_size": image_size, "patch_size": patch_size}).eval()
    out = model(torch.randn(2, 3, *image_size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    grid = (image_size[0] // (patch_size if isinstance(patch_size, int) else patch_size[0]),
            image_size[1] // (patch_size if isinstance(patch_size, int) else patch_size[1]))
    assert model.pos_embedding.shape == (1, grid[0] * grid[1] + 1, 64)


def test_smaller_inputs_use_the_2d_grid_crop_and_legacy_flag_restores_vit_pytorch():
    fast, ref = pair_of_models(**SEED_SMALL)
    x = torch.randn(1, 3, 32, 32)  # a 2 x 2 grid out of the 4 x 4 table
    with torch.no_grad():
        pos = fast.position_embedding(2, 2)
        table = fast.pos_embedding[0, 1:].view(4, 4, -1)
        assert torch.equal(pos[0, 1:], table[:2, :2].reshape(4, -1))
        assert not torch.allclose(fast(x), ref(x), atol=1e-3)  # vit-pytorch takes the first 4 flat rows
        fast.legacy_pos_slicing = True
        assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5, what="legacy slicing")


def test_recorder_records_the_pre_mixing_probabilities():
    model = DeepViT(**SEED_SMALL).eval()
    with torch.no_grad():
        preds, attns = Recorder(model)(torch.randn(2, 3, 64, 64))
    assert preds.shape == (2, 10)
    assert attns.shape == (2, 2, 4, 17, 17)  # (b, depth, heads, n, n); vit-pytorch's Recorder gives None
    assert torch.allclose(attns.sum(-1), torch.ones(2, 2, 4, 17), atol=1e-5)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 60, 64), r"image size \(60, 64\) is not divisible by the patch size \(16, 16\)"),
        ((1, 3, 80, 64), r"image size \(80, 64\) does not fit the model: expected at most \(64, 64\)"),
        ((1, 4, 64, 64), r"expected 3 channels, got 4"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    model = DeepViT(**SEED_SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"image size \(60, 60\) must be divisible by the patch size"):
        DeepViT(**{**SEED_SMALL, "image_size": 60})
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean', got 'max'"):
        DeepViT(**SEED_SMALL, pool="max")


def test_channels():
    model = DeepViT(**SEED_SMALL, channels=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_compiles_fullgraph_in_eval():
    torch.manual_seed(0)
    model = DeepViT(**{**SEED_SMALL, "depth": 1}).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))
