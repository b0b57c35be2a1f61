"""CvT: vit-pytorch parity (any image size), reduced-KV attention, the channel LayerNorm, bad input."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.cvt import CvT
from helpers import assert_matches_vit_pytorch, randomize_batchnorms

from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.cvt import CvT as RefCvT  # noqa: E402

# The seed README config (s3_heads=4), shrunk in width and depth.
SMALL = dict(num_classes=10, s1_emb_dim=16, s1_heads=1, s1_depth=1, s1_mlp_mult=2, s2_emb_dim=24, s2_heads=2,
             s2_depth=2, s2_mlp_mult=2, s3_emb_dim=32, s3_heads=4, s3_depth=1, s3_mlp_mult=2)


pair_of_models = partial(helpers.pair_of_models, CvT, RefCvT, prepare=randomize_batchnorms)


@pytest.mark.parametrize(
    "overrides,size",
    [
        ({}, (64, 64)),
        ({}, (48, 80)),  # non-square, not a multiple of the strides
        ({"channels": 1, "dropout": 0.1}, (32, 32)),
        ({"s1_kv_proj_stride": 1, "s2_proj_kernel": 5, "s3_emb_kernel": 5, "s3_kv_proj_stride": 3}, (64, 64)),
    ],
    ids=["readme-small", "non-square", "1ch", "kernels-strides"],
)
def test_matches_vit_pytorch(overrides, size):
    kwargs = {**SMALL, **overrides}
    assert_matches_vit_pytorch(pair_of_models, (2, kwargs.get("channels", 3), *size), what=f"cvt {overrides} {size}",
                               **kwargs)


def test_matches_vit_pytorch_in_train_mode_batchnorm():
    assert_matches_vit_pytorch(pair_of_models, (2, 3, 32, 32), train=True, what="cvt train-mode BN", **SMALL)


def test_seed_readme_example_matches_vit_pytorch():
    kwargs = dict(num_classes=1000, s3_heads=4)  # the README spells out the defaults but for s3_heads
    assert_matches_vit_pytorch(pair_of_models, (1, 3, 224, 224), out_shape=(1, 1000), what="seed README CvT", **kwargs)


def test_keys_and_values_are_strided():
    model = CvT(**{**SMALL, "s2_kv_proj_stride": 1}).eval()
    with torch.no_grad():
        _, attns = Recorder(model)(torch.randn(1, 3, 64, 64))
    # 64 px -> 16 x 16 (kv 8 x 8), 8 x 8 (kv stride 1: 8 x 8), 4 x 4 (kv 2 x 2).
    assert [tuple(a.shape) for a in attns] == [(1, 1, 256, 64), (1, 2, 64, 64), (1, 2, 64, 64), (1, 4, 16, 4)]


@pytest.mark.parametrize(
    "shape,match",
    [((1, 1, 32, 32), r"expected 3 channels, got 1"), ((3, 32, 32), r"expected an image batch")],
)
def test_bad_images_are_value_errors(shape, match):
    model = CvT(**SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))
