"""fastvit.layers.conv: the conv blocks the hierarchical models share, against vit-pytorch's modules
and key layouts."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from fastvit.layers import PEG, ChanLayerNorm, DepthWiseConv2d, DropPath, conv_output_size

vit_pytorch = pytest.importorskip("vit_pytorch", reason="needs vit-pytorch (pip install fastvit[dev])")
from vit_pytorch.cvt import DepthWiseConv2d as RefCvTDepthWise  # noqa: E402
from vit_pytorch.cvt import LayerNorm as RefChanLayerNorm  # noqa: E402
from vit_pytorch.pit import DepthWiseConv2d as RefPiTDepthWise  # noqa: E402
from vit_pytorch.regionvit import PEG as RefRegionPEG  # noqa: E402
from vit_pytorch.twins_svt import PEG as RefTwinsPEG  # noqa: E402


def test_channel_layernorm_is_vit_pytorchs():
    torch.manual_seed(0)
    ref, norm = RefChanLayerNorm(8), ChanLayerNorm(8)
    with torch.no_grad():
        ref.g.copy_(torch.randn(1, 8, 1, 1)), ref.b.copy_(torch.randn(1, 8, 1, 1))
    norm.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 5, 3) * 3 + 1
    assert_close(norm(x), ref(x), atol=1e-5, rtol=1e-5, what="channel layernorm")
    # (x - mean) / sqrt(var + eps), not the seed-era (x - mean) / (std + eps).
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    unit = ChanLayerNorm(8, eps=0.5)
    assert_close(unit(x), (x - mean) / (var + 0.5).sqrt(), atol=1e-5, rtol=1e-5, what="formula")


@pytest.mark.parametrize("ref_cls,batch_norm", [(RefCvTDepthWise, True), (RefPiTDepthWise, False)], ids=["cvt", "pit"])
def test_depthwise_conv_has_both_vit_pytorch_layouts(ref_cls, batch_norm):
    torch.manual_seed(0)
    ref = ref_cls(4, 8, kernel_size=3, padding=1, stride=2).eval()
    fast = DepthWiseConv2d(4, 8, kernel_size=3, padding=1, stride=2, batch_norm=batch_norm).eval()
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        assert_close(fast(x), ref(x), atol=1e-6, rtol=1e-6, what="depthwise conv")


@pytest.mark.parametrize("ref_cls,wrapped", [(RefRegionPEG, False), (RefTwinsPEG, True)], ids=["regionvit", "twins"])
def test_peg_has_both_vit_pytorch_layouts(ref_cls, wrapped):
    torch.manual_seed(0)
    ref, fast = ref_cls(6, 3), PEG(6, 3, wrapped=wrapped)
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 5)
    assert_close(fast(x), ref(x), atol=1e-6, rtol=1e-6, what="PEG")


def test_drop_path_is_identity_in_eval_and_drops_whole_samples_in_training():
    drop = DropPath(0.5)
    x = torch.randn(64, 3, 4)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    kept = (out != 0).flatten(1).all(1)
    assert torch.equal(out[kept], x[kept] * 2) and (out[~kept] == 0).all() and 0 < kept.sum() < 64


def test_conv_output_size_is_the_conv_arithmetic():
    conv = torch.nn.Conv2d(1, 1, kernel_size=7, stride=4, padding=2)
    assert conv(torch.zeros(1, 1, 31, 31)).shape[-1] == conv_output_size(31, 7, 4, 2)
