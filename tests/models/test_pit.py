"""PiT: vit-pytorch parity, pooling on (h, w) grids, positions for smaller inputs, bad input."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.pit import PiT, Pool
from helpers import assert_close, assert_pair_matches

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.pit import PiT as RefPiT  # noqa: E402

# The seed README config, shrunk: three stages, 15 x 15 -> 8 x 8 -> 4 x 4 overlapping patches.
SMALL = dict(image_size=64, patch_size=8, num_classes=10, dim=32, depth=(1, 2, 1), heads=2, dim_head=16,
             mlp_dim=64, dropout=0.1, emb_dropout=0.1)


pair_of_models = partial(helpers.pair_of_models, PiT, RefPiT)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"heads": (1, 2, 4)}, {"channels": 1}, {"image_size": 48, "patch_size": 6, "depth": (1, 1)}],
    ids=["readme-small", "heads-per-stage", "1ch", "odd-stride"],
)
def test_matches_vit_pytorch(overrides):
    kwargs = {**SMALL, **overrides}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, kwargs.get("channels", 3), kwargs["image_size"], kwargs["image_size"])
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what=f"pit {overrides}")


def test_seed_readme_example_matches_vit_pytorch():
    kwargs = dict(image_size=224, patch_size=14, dim=256, num_classes=1000, depth=(3, 3, 3), heads=16,
                  mlp_dim=2048, dropout=0.1, emb_dropout=0.1)
    fast, ref = pair_of_models(**kwargs)
    assert_pair_matches(fast, ref, torch.randn(1, 3, 224, 224), out_shape=(1, 1000), what="seed README PiT")


def test_pool_keeps_the_grid_layout_of_non_square_maps():
    torch.manual_seed(0)
    pool = Pool(8)
    fmap = torch.randn(2, 8, 5, 7)  # (b, c, h, w)
    cls = torch.randn(2, 1, 8)
    tokens = torch.cat((cls, fmap.flatten(2).transpose(1, 2)), dim=1)  # row-major (h w) tokens
    with torch.no_grad():
        out, grid = pool(tokens, (5, 7))
    assert grid == (3, 4)
    with torch.no_grad():
        expected = pool.downsample(fmap).flatten(2).transpose(1, 2)
        assert_close(out[:, 1:], expected, atol=1e-5, rtol=1e-5, what="pooled tokens")
        assert_close(out[:, :1], pool.cls_ff(cls), atol=1e-6, rtol=1e-6, what="pooled cls")


def test_non_square_images_and_patches():
    model = PiT(**{**SMALL, "image_size": (32, 64), "patch_size": (8, 16)}).eval()
    assert model.grid == (7, 7)
    model = PiT(**{**SMALL, "image_size": (32, 64)}).eval()
    assert model.grid == (7, 15) and model.pos_embedding.shape == (1, 106, 32)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_smaller_inputs_use_the_2d_grid_crop_and_legacy_flag_restores_vit_pytorch():
    fast, ref = pair_of_models(**SMALL)
    x = torch.randn(2, 3, 32, 32)  # a 7 x 7 grid out of the 15 x 15 table
    pos = fast.position_embedding(7, 7)
    assert torch.equal(pos[0, 1:], fast.pos_embedding[0, 1:].view(15, 15, -1)[:7, :7].reshape(49, -1))
    with torch.no_grad():
        assert not torch.allclose(fast(x), ref(x), atol=1e-3)  # vit-pytorch slices the flat table
        fast.legacy_pos_slicing = True
        assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5, what="legacy slicing")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 60, 64), r"image size \(60, 64\) is not divisible by the patch size \(8, 8\)"),
        ((1, 3, 64, 72), r"image size \(64, 72\) does not fit the model: expected at most \(64, 64\)"),
        ((1, 4, 64, 64), r"expected 3 channels, got 4"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    model = PiT(**SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"depth": 3}, "depth must be a tuple of integers"),
        ({"heads": (2, 4)}, r"heads \(2, 4\) must have one entry per stage of depth \(1, 2, 1\)"),
        ({"patch_size": 1}, r"patch_size \(1, 1\) must be at least 2"),
        ({"image_size": 60}, r"image size \(60, 60\) must be divisible by the patch size \(8, 8\)"),
    ],
)
def test_constructor_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        PiT(**{**SMALL, **overrides})


def test_depth_may_be_a_list():
    assert len(PiT(**{**SMALL, "depth": [1, 1]}).layers) == 3
