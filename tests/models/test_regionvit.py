"""RegionViT: vit-pytorch parity, the regional-to-local attention (windows, bias, region tokens), sizes,
bad input, Recorder."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.regionvit import R2LTransformer, RegionViT
from helpers import assert_close, assert_matches_vit_pytorch, randomize_channel_norms

from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.regionvit import R2LTransformer as RefR2LTransformer  # noqa: E402
from vit_pytorch.regionvit import RegionViT as RefRegionViT  # noqa: E402

SMALL = dict(dim=(16, 16, 32, 32), depth=(1, 2, 1, 1), window_size=2, num_classes=10)


pair_of_models = partial(helpers.pair_of_models, RegionViT, RefRegionViT, prepare=randomize_channel_norms)


@pytest.mark.parametrize("overrides,size", [
    ({}, (64, 64)),
    ({}, (64, 128)),
    ({"tokenize_local_3_conv": True, "use_peg": True}, (64, 64)),
    ({"window_size": 4, "dim": 16}, (128, 128)),
], ids=["small", "non-square", "3conv-peg", "window-4"])
def test_matches_vit_pytorch(overrides, size):
    assert_matches_vit_pytorch(pair_of_models, (2, 3, *size), what=f"regionvit {overrides} {size}",
                               **{**SMALL, **overrides})


def test_seed_readme_example_matches_vit_pytorch():
    assert_matches_vit_pytorch(pair_of_models, (1, 3, 224, 224), out_shape=(1, 1000), what="seed README RegionViT",
                               dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), window_size=7, num_classes=1000,
                               tokenize_local_3_conv=False, use_peg=False)


def test_r2l_block_matches_vit_pytorch_on_both_token_sets_and_gradients():
    torch.manual_seed(0)
    fast = R2LTransformer(16, window_size=3, depth=2)
    ref = RefR2LTransformer(16, window_size=3, depth=2)
    ref.load_state_dict(fast.state_dict())
    local, region = torch.randn(2, 16, 6, 9), torch.randn(2, 16, 2, 3)
    out_local, out_region = fast(local, region)
    ref_local, ref_region = ref(local, region)
    assert_close(out_local, ref_local, atol=1e-5, rtol=1e-5, what="local tokens")
    assert_close(out_region, ref_region, atol=1e-5, rtol=1e-5, what="region tokens")
    (out_local.sum() + out_region.sum()).backward()
    (ref_local.sum() + ref_region.sum()).backward()
    assert_close(fast.local_rel_pos_bias.weight.grad, ref.local_rel_pos_bias.weight.grad, atol=1e-4, rtol=1e-4,
                 what="bias table gradient")


def test_local_tokens_only_see_their_region():
    torch.manual_seed(0)
    block = R2LTransformer(16, window_size=2, depth=1).eval()
    local, region = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2)
    changed_local = local.clone()
    changed_local[..., :2, :2] += torch.randn(16, 2, 2)  # the top-left region's window only
    with torch.no_grad():
        a, _ = block(local, region)
        b, _ = block(changed_local, region)
    moved = (a - b).abs().amax(dim=1)[0] > 1e-6
    assert moved[:2, :2].all() and not moved[2:].any() and not moved[:2, 2:].any()


@pytest.mark.parametrize("size,match", [
    ((60, 64), "divisible by the region size 8"),
    ((48, 64), "at stage 3 the 3x4 local tokens do not split"),  # 12x16 / 6x8 -> 6x8 / 3x4 -> 3x4 / 2x2
])
def test_sizes_that_do_not_fit_raise(size, match):
    model = RegionViT(**SMALL).eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 3, *size))


def test_channels_and_bad_arguments():
    model = RegionViT(**SMALL, channels=1).eval()  # vit-pytorch's local encoder would expect 3 channels
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="depth must be a single value or a tuple of length 4"):
        RegionViT(**{**SMALL, "depth": (1, 1)})


def test_recorder_sees_region_and_window_maps():
    model = RegionViT(**SMALL).eval()
    _, attns = Recorder(model)(torch.randn(1, 3, 64, 64))
    # Each attention module runs twice per block (regions, then windows); the recorder keeps the last:
    # stage 1 windows: 8x8 regions -> 64 windows of 1 region + 2x2 local tokens, 4 heads.
    assert tuple(attns[0].shape) == (64, 4, 5, 5)
