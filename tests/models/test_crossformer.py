"""CrossFormer: vit-pytorch parity (legacy DPB lookup), the fixed dynamic position bias, short / long
distance groups, sizes, bad input, gradients into the bias MLP, Recorder."""

from __future__ import annotations

import helpers
import pytest
import torch
from fastvit.crossformer import Attention, CrossFormer
from helpers import assert_close, assert_pair_matches, randomize_channel_norms

from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.crossformer import Attention as RefAttention  # noqa: E402
from vit_pytorch.crossformer import CrossFormer as RefCrossFormer  # noqa: E402

SMALL = dict(dim=(32, 32, 64, 64), depth=(1, 2, 1, 1), global_window_size=(2, 2, 2, 1), local_window_size=2,
             cross_embed_kernel_sizes=((4, 8), (2, 4), (2, 4), (2, 4)), num_classes=10)


def pair_of_models(**kwargs):
    """With vit-pytorch's mismatched position-bias lookup, which the parity tests need."""
    return helpers.pair_of_models(CrossFormer, RefCrossFormer, fast_kwargs={"legacy_dpb_offsets": True},
                                  prepare=randomize_channel_norms, **kwargs)


@pytest.mark.parametrize("overrides,size", [
    ({}, (64, 64)),
    ({}, (64, 128)),
    ({"local_window_size": (2, 2, 2, 1), "global_window_size": (4, 2, 1, 1), "channels": 1}, (64, 64)),
], ids=["small", "non-square", "windows-1ch"])
def test_matches_vit_pytorch_with_its_dpb_lookup(overrides, size):
    kwargs = {**SMALL, **overrides}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, kwargs.get("channels", 3), *size)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what=f"crossformer {overrides} {size}")


def test_seed_readme_example_matches_vit_pytorch():
    fast, ref = pair_of_models(num_classes=1000, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2),
                               global_window_size=(8, 4, 2, 1), local_window_size=7)
    img = torch.randn(1, 3, 224, 224)
    out = assert_pair_matches(fast, ref, img, out_shape=(1, 1000), what="seed README CrossFormer")
    default = CrossFormer(num_classes=1000).eval()
    default.load_state_dict(fast.state_dict())
    with torch.no_grad():
        assert not torch.allclose(default(img), out, atol=1e-4)  # the DPB fix changes outputs


@pytest.mark.parametrize("window", [2, 3, 7])
def test_fixed_dpb_gives_each_offset_its_own_bias(window):
    attn = Attention(16, "short", window, dim_head=8)
    bias = attn.position_bias()  # (w*w, w*w)
    with torch.no_grad():
        for i, j in [(0, 0), (0, window * window - 1), (window, 1), (window * window - 1, 0)]:
            (qy, qx), (ky, kx) = divmod(i, window), divmod(j, window)
            offset = torch.tensor([[qy - ky, qx - kx]], dtype=torch.float32)
            torch.testing.assert_close(bias[i, j], attn.dpb(offset)[0])
    legacy = Attention(16, "short", window, dim_head=8, legacy_dpb_offsets=True)
    legacy.load_state_dict(attn.state_dict())
    ref = RefAttention(16, "short", window, dim_head=8)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(1, 16, 2 * window, 2 * window)
    with torch.no_grad():
        assert_close(legacy(x), ref(x), atol=1e-5, rtol=1e-5, what="legacy lookup vs vit-pytorch")


def test_short_groups_are_adjacent_and_long_groups_are_strided():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 4, 4)
    y = x.clone()
    y[:, :, 0, 0] += torch.randn(16)  # change one position
    for kind, expected in (("short", [(0, 0), (0, 1), (1, 0), (1, 1)]), ("long", [(0, 0), (0, 2), (2, 0), (2, 2)])):
        attn = Attention(16, kind, 2, dim_head=8).eval()
        with torch.no_grad():
            changed = (attn(x) - attn(y)).abs().amax(dim=1)[0] > 1e-6  # (4, 4)
        assert sorted(map(tuple, changed.nonzero().tolist())) == expected, kind


def test_gradients_reach_the_position_bias_mlp():
    model = CrossFormer(**SMALL)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    dpb = model.layers[0][1].layers[0][0].dpb
    assert dpb[0].weight.grad is not None and dpb[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("size,match", [
    ((48, 64), "stage 3's 3x4 map does not divide into 2x2 short-distance"),
    ((32, 32), "stage 4's 1x1 map does not divide into 2x2 short-distance"),
])
def test_sizes_that_do_not_fit_raise(size, match):
    with pytest.raises(ValueError, match=match):
        CrossFormer(**SMALL).eval()(torch.randn(1, 3, *size))


def test_cross_embed_kernels_that_disagree_on_a_size_raise():
    model = CrossFormer(**{**SMALL, "cross_embed_kernel_sizes": ((3, 4), (2, 4), (2, 4), (2, 4)),
                           "cross_embed_strides": (2, 2, 2, 2)})
    with pytest.raises(ValueError, match="gives maps of sides"):
        model(torch.randn(1, 3, 32, 32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim must be a single value or a tuple of length 4"):
        CrossFormer(**{**SMALL, "dim": (32, 32, 64)})
    with pytest.raises(ValueError, match="attn_type"):
        Attention(16, "medium", 2)
    with pytest.raises(ValueError, match="channels"):
        CrossFormer(**SMALL)(torch.randn(1, 1, 64, 64))


def test_recorder_sees_short_and_long_groups():
    model = CrossFormer(**SMALL).eval()
    _, attns = Recorder(model)(torch.randn(1, 3, 64, 64))
    # stage 1: a 16x16 map; 2x2 short windows -> 64 groups, 2x2 long groups -> 64 groups; heads 32 / 32.
    assert tuple(attns[0].shape) == (64, 1, 4, 4) and tuple(attns[1].shape) == (64, 1, 4, 4)
