"""The shared pieces of fastvit.layers that replaced per-model copies: the q/k/v split, token gathering,
the MLP layouts, per-stage tuples, the residual encoder and the ViT stem."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from fastvit.layers import (
    FeedForward,
    ResidualBlocks,
    ViTStem,
    cast_tuple,
    gather_tokens,
    mlp,
    split_qkv,
)


@pytest.mark.parametrize("parts", [2, 3])
def test_split_qkv_is_vit_pytorchs_chunk_and_rearrange(parts):
    x = torch.randn(2, 5, parts * 4 * 8)
    expected = [rearrange(t, "b n (h d) -> b h n d", h=4) for t in x.chunk(parts, dim=-1)]
    for got, want in zip(split_qkv(x, 4, parts=parts), expected):
        assert torch.equal(got, want)


def test_gather_tokens_is_per_image_indexing():
    x = torch.randn(3, 7, 2, 4)
    ids = torch.tensor([[0, 6, 6], [1, 2, 3], [5, 0, 4]])
    assert torch.equal(gather_tokens(x, ids), torch.stack([x[i, ids[i]] for i in range(3)]))


@pytest.mark.parametrize("kwargs,keys", [
    (dict(), ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]),
    (dict(dropout=None), ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]),
    (dict(conv=True, out_dropout=False), ["0.g", "0.b", "1.weight", "1.bias", "4.weight", "4.bias"]),
    (dict(conv=True, norm=False), ["0.weight", "0.bias", "3.weight", "3.bias"]),
], ids=["vit", "simple_vit", "crossformer", "levit"])
def test_mlp_keeps_each_vit_pytorch_key_layout(kwargs, keys):
    assert list(mlp(8, 16, **kwargs).state_dict()) == keys


def test_feed_forward_fused_gelu_path_is_the_plain_sequential():
    ff = FeedForward(8, 16).eval()
    x = torch.randn(2, 3, 8)
    assert ff.fused_gelu
    torch.testing.assert_close(ff(x), ff.net(x))
    conv = FeedForward(8, 16, conv=True).eval()
    assert not conv.fused_gelu and conv(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


def test_cast_tuple_repeats_or_pads():
    assert cast_tuple(2, 3, "depth") == (2, 2, 2)
    with pytest.raises(ValueError, match="depth must be a single value or a tuple of length 3"):
        cast_tuple((1, 2), 3, "depth")
    assert cast_tuple((1, 2), 3, "heads", pad=True) == (1, 2, 2)
    with pytest.raises(ValueError, match=r"dim \(1, 2, 3, 4\) has more entries than stages=3"):
        cast_tuple([1, 2, 3, 4], 3, "dim", pad=True)


def test_residual_blocks_register_norm_where_asked():
    block = [(nn.Linear(4, 4), nn.Linear(4, 4))]
    assert list(ResidualBlocks(block, norm=nn.LayerNorm(4)).state_dict())[:2] == ["norm.weight", "norm.bias"]
    x = torch.randn(2, 4)
    plain = ResidualBlocks([(nn.Identity(), nn.Identity())])
    assert torch.equal(plain(x), 4 * x)  # two residuals of the identity, no norm


class _Stem(ViTStem, nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.build_stem(**kwargs)


@pytest.mark.parametrize("flat,cls_in_positions,keys,pos_shape", [
    (True, True, ["cls_token", "pos_embedding"], (1 + 16, 8)),
    (False, True, ["pos_embedding", "cls_token"], (1, 1 + 16, 8)),
    (False, False, ["pos_embedding", "cls_token"], (1, 16, 8)),
], ids=["vit", "deepvit", "cait"])
def test_vit_stem_layouts_and_tokens(flat, cls_in_positions, keys, pos_shape):
    stem = _Stem(image_size=32, patch_size=8, channels=3, dim=8, flat=flat, cls_in_positions=cls_in_positions)
    assert [k for k in stem.state_dict() if k in keys] == keys  # vit-pytorch's creation order
    assert "to_patch_embedding.1.weight" in stem.state_dict() and tuple(stem.pos_embedding.shape) == pos_shape
    tokens = stem.embed(torch.randn(2, 3, 32, 16))  # a 4 x 2 grid out of 4 x 4: the top-left crop
    assert tokens.shape == (2, 8 + cls_in_positions, 8)
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        stem.embed(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        _Stem(image_size=32, patch_size=8, channels=3, dim=8, pool="max")
