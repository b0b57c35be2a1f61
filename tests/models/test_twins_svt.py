"""TwinsSVT: vit-pytorch parity, windowed (LSA) and sub-sampled (GSA) attention, sizes, bad input, Recorder."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from einops import rearrange
from fastvit.twins_svt import GlobalAttention, LocalAttention, TwinsSVT
from helpers import assert_close, assert_pair_matches, randomize_channel_norms

from fastvit import Recorder
from fastvit.attention import use_backend

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.twins_svt import LocalAttention as RefLocalAttention  # noqa: E402
from vit_pytorch.twins_svt import TwinsSVT as RefTwinsSVT  # noqa: E402

SMALL = dict(num_classes=10,
             s1_emb_dim=16, s1_patch_size=4, s1_local_patch_size=2, s1_global_k=2, s1_depth=1,
             s2_emb_dim=24, s2_patch_size=2, s2_local_patch_size=2, s2_global_k=2, s2_depth=2,
             s3_emb_dim=32, s3_patch_size=2, s3_local_patch_size=2, s3_global_k=2, s3_depth=1,
             s4_emb_dim=32, s4_patch_size=2, s4_local_patch_size=2, s4_global_k=1, s4_depth=1)


pair_of_models = partial(helpers.pair_of_models, TwinsSVT, RefTwinsSVT, prepare=randomize_channel_norms)


@pytest.mark.parametrize("overrides,size", [
    ({}, (64, 64)),
    ({}, (64, 128)),  # non-square: more windows along one side
    ({"s1_local_patch_size": 4, "s2_global_k": 4, "peg_kernel_size": 5}, (64, 64)),
], ids=["small", "non-square", "windows-4"])
def test_matches_vit_pytorch(overrides, size):
    kwargs = {**SMALL, **overrides}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, 3, *size)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what=f"twins {overrides} {size}")


def test_seed_readme_example_matches_vit_pytorch():
    fast, ref = pair_of_models(num_classes=1000)  # the README passes vit-pytorch's defaults explicitly
    assert_pair_matches(fast, ref, torch.randn(1, 3, 224, 224), out_shape=(1, 1000), what="seed README TwinsSVT")


def test_local_attention_never_mixes_windows():
    torch.manual_seed(0)
    attn = LocalAttention(8, heads=2, dim_head=4, patch_size=2).eval()
    ref = RefLocalAttention(8, heads=2, dim_head=4, patch_size=2).eval()
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(1, 8, 4, 4)
    y = x.clone()
    y[..., :2, :2] += torch.randn(1, 8, 2, 2)  # change only the top-left window (not by a per-pixel constant,
    # which the channel LayerNorm would remove)
    with torch.no_grad():
        out_x, out_y = attn(x), attn(y)
        assert_close(out_x, ref(x), atol=1e-5, rtol=1e-5, what="LSA vs vit-pytorch")
    changed = (out_x - out_y).abs().amax(dim=1) > 1e-6  # (1, 4, 4)
    assert changed[0, :2, :2].all() and not changed[0, 2:].any() and not changed[0, :2, 2:].any()


def test_channels_and_training_gradients():
    model = TwinsSVT(**SMALL, channels=1, dropout=0.1)
    out = model(torch.randn(2, 1, 64, 64))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("size,match", [
    ((62, 64), "stage 1 embeds 4x4 patches"),
    ((48, 48), "does not divide into 2x2 local-attention windows"),  # stage-2 map 6x6 -> stage-3 3x3
])
def test_sizes_that_do_not_fit_raise(size, match):
    model = TwinsSVT(**SMALL).eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 3, *size))


def test_gsa_kernel_larger_than_the_map_raises():
    model = TwinsSVT(**{**SMALL, "s4_global_k": 3}).eval()
    with pytest.raises(ValueError, match="smaller than its 3x3 global-attention"):
        model(torch.randn(1, 3, 64, 64))


def test_same_logits_with_sdpa_and_the_reference():
    model = TwinsSVT(**SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), use_backend("reference"):
        ref = model(x)
    with torch.no_grad(), use_backend("sdpa"):
        assert_close(model(x), ref, atol=1e-5, rtol=1e-5, what="twins sdpa")


def test_recorder_sees_window_and_subsampled_maps():
    model = TwinsSVT(**SMALL).eval()
    _, attns = Recorder(model)(torch.randn(1, 3, 64, 64))
    shapes = [tuple(a.shape) for a in attns]
    # stage 1: 16x16 map in 2x2 windows -> (64 windows, 8 heads, 4, 4); GSA k=2 -> (1, 8, 256, 64).
    assert shapes[0] == (64, 8, 4, 4) and shapes[1] == (1, 8, 256, 64)
    assert shapes[-1] == (1, 8, 4, 4)  # stage 4: 2x2 map, GSA only with k=1


@pytest.mark.parametrize("size,k", [((8, 8), 2), ((7, 9), 3), ((14, 14), 7)])
def test_gsa_keys_values_gemm_equals_the_strided_conv(size, k):
    torch.manual_seed(0)
    attn = GlobalAttention(8, heads=2, dim_head=4, k=k)
    x = torch.randn(2, 8, *size, requires_grad=True)
    k_fast, v_fast = attn.keys_values(x)
    conv = attn.to_kv(x)  # the module's own conv: (b, 2*h*d, h', w'), remainders dropped
    k_ref, v_ref = (rearrange(t, "b (h d) x y -> b h (x y) d", h=2) for t in conv.chunk(2, dim=1))
    assert_close(k_fast, k_ref, atol=1e-5, rtol=1e-5, what="k")
    assert_close(v_fast, v_ref, atol=1e-5, rtol=1e-5, what="v")
    g = torch.randn_like(k_ref)
    grads_fast = torch.autograd.grad((k_fast * g).sum() + v_fast.sum(), (x, attn.to_kv.weight))
    grads_ref = torch.autograd.grad((k_ref * g).sum() + v_ref.sum(), (x, attn.to_kv.weight))
    for a, e, name in zip(grads_fast, grads_ref, ("input", "weight")):
        assert_close(a, e, atol=1e-4, rtol=1e-4, what=f"grad {name}")
