"""LeViT: vit-pytorch parity (eval and train BatchNorm), relative position bias indices and scaling,
subsampled queries, distillation head, image sizes, bad input."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.levit import LeViT
from helpers import assert_close, assert_pair_matches, randomize_batchnorms

from fastvit import Recorder
from fastvit.attention import RelPosBias, attend
from fastvit.models.levit import Attention, levit_pos_indices

vit_pytorch = pytest.importorskip("vit_pytorch",
                                  reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.levit import LeViT as RefLeViT  # noqa: E402

# The seed README config, shrunk: 64 px -> 4 x 4 -> 2 x 2 -> 1 x 1 maps; key width 16, value width 32.
SMALL = dict(image_size=64, num_classes=10, stages=3, dim=(32, 48, 64), depth=2, heads=(2, 3, 4), mlp_mult=2,
             dim_key=16, dim_value=32, dropout=0.1)


pair_of_models = partial(helpers.pair_of_models, LeViT, RefLeViT,
                         prepare=partial(randomize_batchnorms, gamma_mean=0.0, gamma_std=1.0))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"image_size": 32}, {"image_size": 48}, {"stages": 2, "dim": 32, "heads": 2, "depth": (1, 2)},
     {"dim_key": 16, "dim_value": 64}],
    ids=["readme-small", "32px", "48px", "two-stages", "dk16-dv64"],
)
def test_matches_vit_pytorch_in_eval(overrides):
    kwargs = {**SMALL, **overrides}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, 3, kwargs["image_size"], kwargs["image_size"])
    with torch.no_grad():
        out, expected = fast(x), ref(x)
    assert expected.abs().max() > 1e-2  # the attention is not zeroed out
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"levit {overrides}")


def test_matches_vit_pytorch_in_train_mode_batchnorm():
    kwargs = {**SMALL, "dropout": 0.0}
    fast, ref = pair_of_models(**kwargs)
    fast.train(), ref.train()
    x = torch.randn(4, 3, 64, 64)
    assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4, what="levit train-mode BN")
    for (name, a), b in zip(ref.named_buffers(), fast.buffers()):
        assert_close(b.float(), a.float(), atol=1e-5, rtol=1e-5, what=f"buffer {name} after a training step")


def test_seed_readme_example_matches_vit_pytorch():
    kwargs = dict(image_size=224, num_classes=1000, stages=3, dim=(256, 384, 512), depth=4, heads=(4, 6, 8),
                  mlp_mult=2, dropout=0.1)
    fast, ref = pair_of_models(**kwargs)
    assert_pair_matches(fast, ref, torch.randn(1, 3, 224, 224), out_shape=(1, 1000), what="seed README LeViT")


def test_distillation_head_returns_both_outputs_like_vit_pytorch():
    fast, ref = pair_of_models(**{**SMALL, "num_distill_classes": 7})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (out, distill), (ref_out, ref_distill) = fast(x), ref(x)
    assert out.shape == (2, 10) and distill.shape == (2, 7)
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, what="logits")
    assert_close(distill, ref_distill, atol=1e-5, rtol=1e-5, what="distillation logits")
    assert LeViT(**SMALL).distill_head is None


def test_output_batchnorms_start_at_zero_gamma():
    model = LeViT(**SMALL)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 2 * 3 + 2
    assert all(torch.equal(a.to_out[2].weight, torch.zeros_like(a.to_out[2].weight)) for a in attns)


def test_attention_adds_the_table_divided_by_the_scale():
    """vit-pytorch's logits are ``q k^T * scale + table[index] / scale``; check one shrinking block by hand,
    with its 1x1 convs run as convs on the map (fastvit runs them as Linears on tokens)."""
    torch.manual_seed(0)
    attn = Attention(8, fmap_size=(3, 4), heads=2, dim_key=4, dim_value=6, downsample=True).eval()
    randomize_batchnorms(attn, gamma_mean=0.0, gamma_std=1.0)
    x = torch.randn(2, 8, 3, 4)  # (b, c, h, w)
    tokens = x.flatten(2).transpose(1, 2)  # (b, 12, c)
    with torch.no_grad():
        q = attn.to_q(x).reshape(2, 2, 4, -1).transpose(-1, -2)  # (b, h, 2*2, dk): the stride-2 grid
        k = attn.to_k(x).reshape(2, 2, 4, -1).transpose(-1, -2)  # (b, h, 12, dk)
        v = attn.to_v(x).reshape(2, 2, 6, -1).transpose(-1, -2)  # (b, h, 12, dv)
        bias = attn.pos_bias.weight[attn.pos_indices].permute(2, 0, 1)  # (h, nq, nk)
        probs = (q @ k.transpose(-1, -2) * 0.5 + bias / 0.5).softmax(-1)
        expected = attn.to_out((probs @ v).transpose(-1, -2).reshape(2, 12, 2, 2))  # (b, c_out, 2, 2)
        out = attn(tokens)  # (b, 4, c_out)
        assert_close(out, expected.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5, what="attention by hand")
        out = attend(q, k, v, scale=0.5, bias=RelPosBias(attn.pos_bias.weight / 0.5, attn.pos_indices))
        assert out.shape == (2, 2, 4, 6)  # Nq != Nk, Dv != D


@pytest.mark.parametrize("fmap,stride", [((4, 4), 1), ((5, 5), 2), ((3, 5), 1), ((4, 7), 2)])
def test_pos_indices_are_absolute_offsets_on_the_grid(fmap, stride):
    fh, fw = fmap
    index = levit_pos_indices(fmap, stride)
    queries = [(i, j) for i in range(0, fh, stride) for j in range(0, fw, stride)]
    keys = [(i, j) for i in range(fh) for j in range(fw)]
    expected = torch.tensor([[abs(qi - ki) * fw + abs(qj - kj) for ki, kj in keys] for qi, qj in queries])
    assert torch.equal(index, expected)
    assert index.max() < fh * fw


def test_subsampled_queries_are_a_quarter_of_the_keys():
    model = LeViT(**SMALL).eval()
    with torch.no_grad():
        _, attns = Recorder(model)(torch.randn(1, 3, 64, 64))
    shapes = [tuple(a.shape[-2:]) for a in attns]
    assert shapes == [(16, 16)] * 2 + [(4, 16)] + [(4, 4)] * 2 + [(1, 4)] + [(1, 1)] * 2
    assert [a.shape[1] for a in attns] == [2, 2, 4, 3, 3, 6, 4, 4]  # shrinking blocks double the heads


def test_non_square_and_non_multiple_of_16_images():
    model = LeViT(**{**SMALL, "image_size": (64, 96), "channels": 1}).eval()
    assert model.backbone[0].layers[0][0].pos_bias.weight.shape == (4 * 6, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 96)).shape == (2, 10)
    # vit-pytorch sizes its tables for 200 // 16 = 12 and crashes; the stem really gives 13 x 13.
    model = LeViT(**{**SMALL, "image_size": 200}).eval()
    assert model.backbone[0].layers[0][0].pos_indices.shape == (169, 169)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 200, 200)).shape == (1, 10)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 32, 32), r"image size \(32, 32\) does not fit the model: expected exactly \(64, 64\)"),
        ((1, 3, 64, 80), r"image size \(64, 80\) does not fit the model: expected exactly \(64, 64\)"),
        ((1, 1, 64, 64), r"expected 3 channels, got 1"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    model = LeViT(**SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"dim \(32, 48, 64, 80\) has more entries than stages=3"):
        LeViT(**{**SMALL, "dim": (32, 48, 64, 80)})
