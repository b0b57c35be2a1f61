"""NesT: vit-pytorch parity, block-local attention, smaller / non-square inputs, bad input, Recorder."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.nest import NesT, Transformer
from helpers import assert_close, assert_pair_matches, randomize_channel_norms

from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.nest import NesT as RefNesT  # noqa: E402

SMALL = dict(image_size=32, patch_size=4, num_classes=10, dim=16, heads=2, num_hierarchies=3, block_repeats=(2, 1, 1))


pair_of_models = partial(helpers.pair_of_models, NesT, RefNesT, prepare=randomize_channel_norms)


@pytest.mark.parametrize("overrides", [{}, {"num_hierarchies": 2, "block_repeats": 1}, {"channels": 1, "mlp_mult": 2},
                                       {"num_hierarchies": 1, "block_repeats": (2,)}],
                         ids=["small", "2-levels", "1ch", "1-level"])
def test_matches_vit_pytorch(overrides):
    kwargs = {**SMALL, **overrides}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, kwargs.get("channels", 3), 32, 32)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what=f"nest {overrides}")


def test_seed_readme_example_matches_vit_pytorch():
    fast, ref = pair_of_models(image_size=224, patch_size=4, dim=96, heads=3, num_hierarchies=3,
                               block_repeats=(8, 4, 1), num_classes=1000)
    assert_pair_matches(fast, ref, torch.randn(1, 3, 224, 224), out_shape=(1, 1000), what="seed README NesT")


def test_smaller_inputs_crop_the_2d_position_grid():
    fast, ref = pair_of_models(**SMALL)
    x = torch.randn(1, 3, 32, 16)  # blocks of 2x1 tokens instead of 2x2
    legacy = NesT(**SMALL, legacy_pos_slicing=True).eval()
    legacy.load_state_dict(fast.state_dict())
    with torch.no_grad():
        assert_close(legacy(x), ref(x), atol=1e-5, rtol=1e-5, what="legacy slicing vs vit-pytorch")
        assert not torch.allclose(fast(x), ref(x), atol=1e-4)  # the fix changes which positions are used


@pytest.mark.parametrize("legacy", [False, True])
def test_block_position_embedding_of_a_smaller_block(legacy):
    blocks = Transformer(16, (2, 2), depth=0, heads=2, mlp_mult=2, legacy_pos_slicing=legacy)
    out = blocks(torch.zeros(1, 16, 2, 1))  # a 2x1 block: tokens (0, 0) and (1, 0) of the 2x2 grid
    pos = blocks.pos_emb.detach()
    expected = pos[:2] if legacy else pos.view(2, 2)[:, 0]  # vit-pytorch: flat indices 0, 1; fixed: 0, 2
    torch.testing.assert_close(out[0, 0, :, 0], expected)
    assert (out == out[:, :1]).all()  # one scalar per position, shared by every channel


def test_non_square_image_and_patch():
    model = NesT(**{**SMALL, "image_size": (32, 64), "patch_size": (4, 8)}).eval()
    assert model(torch.randn(2, 3, 32, 64)).shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [
    ({"image_size": 30}, "divisible by the patch size"),
    ({"image_size": 40}, "must divide into 4x4 blocks"),  # 10x10 patches
    ({"block_repeats": (1, 1)}, "one entry per hierarchy"),
    ({"num_hierarchies": 0}, "at least 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NesT(**{**SMALL, **kwargs})


def test_bad_inputs():
    model = NesT(**SMALL).eval()
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="does not divide into 4x4 blocks"):
        model(torch.randn(1, 3, 24, 24))  # 6x6 patches


def test_recorder_sees_block_local_maps():
    model = NesT(**SMALL).eval()
    _, attns = Recorder(model)(torch.randn(2, 3, 32, 32))
    # 8x8 tokens in 4x4 / 2x2 / 1x1 blocks of 2x2 tokens: batch b * blocks, heads 2 / 4 / 8, 4 tokens.
    assert [tuple(a.shape) for a in attns] == [(32, 2, 4, 4), (32, 2, 4, 4), (8, 4, 4, 4), (2, 8, 4, 4)]
