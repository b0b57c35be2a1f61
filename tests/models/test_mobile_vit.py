"""MobileViT: vit-pytorch parity (eval and train-mode BatchNorm), sizes, the stem fix, bad input, Recorder."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.mobile_vit import MobileViT
from helpers import assert_matches_vit_pytorch, randomize_batchnorms

from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.mobile_vit import MobileViT as RefMobileViT  # noqa: E402

SMALL = dict(image_size=(64, 64), dims=[16, 24, 32], channels=[8, 8, 16, 16, 16, 16, 24, 24, 32, 32, 64],
             num_classes=10, expansion=2, depths=(1, 2, 1))


pair_of_models = partial(helpers.pair_of_models, MobileViT, RefMobileViT, prepare=randomize_batchnorms)


@pytest.mark.parametrize("overrides,size", [
    ({}, (64, 64)),
    ({}, (128, 64)),  # another size than image_size, non-square
    ({"patch_size": (1, 2), "kernel_size": 3, "expansion": 4}, (64, 64)),
    ({"expansion": 1}, (64, 64)),  # MV2 blocks without the expanding 1x1 conv
], ids=["small", "non-square", "patch-1x2", "expansion-1"])
def test_matches_vit_pytorch(overrides, size):
    kwargs = {**SMALL, **overrides}
    if kwargs["expansion"] == 1:  # the depthwise conv then runs on the input width: widths must chain
        kwargs["channels"] = [16] * 10 + [64]
    assert_matches_vit_pytorch(pair_of_models, (2, 3, *size), what=f"mobilevit {overrides} {size}", **kwargs)


def test_matches_vit_pytorch_in_train_mode_batchnorm():
    assert_matches_vit_pytorch(pair_of_models, (2, 3, 64, 64), train=True, what="mobilevit train-mode BN", **SMALL)


def test_seed_readme_example_matches_vit_pytorch():
    kwargs = dict(image_size=(256, 256), dims=[96, 120, 144],
                  channels=[16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384], num_classes=1000)
    assert_matches_vit_pytorch(pair_of_models, (1, 3, 256, 256), out_shape=(1, 1000), what="seed README MobileViT",
                               **kwargs)


def test_stem_takes_the_width_it_receives():
    # channels[2] != channels[3]: vit-pytorch builds its 4th stem block for channels[2] and fails.
    kwargs = {**SMALL, "channels": [8, 8, 12, 16, 16, 16, 24, 24, 32, 32, 64]}
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(RuntimeError):
        RefMobileViT(**kwargs).eval()(x)
    out = MobileViT(**kwargs).eval()(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_int_image_size_and_input_channels():
    model = MobileViT(**{**SMALL, "image_size": 64, "in_channels": 1}).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("kwargs,match", [
    ({"dims": [16, 24]}, "dims must have 3 entries"),
    ({"depths": (1, 1, 1, 1)}, "depths must have 3 entries"),
    ({"channels": [8] * 10}, "channels must have 11 entries"),
    ({"image_size": (63, 64)}, "divisible by the patch size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MobileViT(**{**SMALL, **kwargs})


def test_input_not_divisible_by_32_patches_is_a_value_error():
    model = MobileViT(**SMALL).eval()
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 96, 64))  # 96 / 32 = 3 is not divisible by the 2-pixel patch


def test_recorder_returns_one_map_per_attention_layer():
    model = MobileViT(**SMALL).eval()
    preds, attns = Recorder(model)(torch.randn(2, 3, 64, 64))
    assert preds.shape == (2, 10)
    # (b * ph * pw, heads, n, n): 8x8, 4x4, 2x2 maps in 2x2 patches -> 16, 4, 1 tokens; depths 1, 2, 1.
    assert [tuple(a.shape) for a in attns] == [(8, 4, 16, 16), (8, 4, 4, 4), (8, 4, 4, 4), (8, 4, 1, 1)]
    for a in attns:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
