"""NaViT: vit-pytorch's outputs for the same list of images and weights (grouped or not, several
sizes), every image packed into one sequence (no padding), the packing helpers, the presets, and a
``(b, c, h, w)`` batch through timm's surface (the registry-wide tests cover the rest)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from fastvit.na_vit import NaViT
from helpers import assert_close

import fastvit
from fastvit.models.na_vit import PackedTokens

HAS_VIT_PYTORCH = importlib.util.find_spec("vit_pytorch") is not None
KW = dict(image_size=64, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64, dim_head=16)


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in ((64, 32), (16, 48), (40, 40), (8, 8), (24, 64))]


@pytest.mark.skipif(not HAS_VIT_PYTORCH, reason="vit-pytorch is a test reference (pip install vit-pytorch)")
def test_outputs_equal_vit_pytorch_grouped_or_not():
    from vit_pytorch.na_vit import NaViT as Reference

    torch.manual_seed(0)
    ref = Reference(**KW).eval()
    fast = NaViT(**KW).eval()
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    images = _images()
    with torch.no_grad():
        for call in (lambda m: m([images[:2], images[2:]]), lambda m: m(images),
                     lambda m: m(images, group_images=True, group_max_seq_len=40)):
            assert_close(call(fast), call(ref), atol=1e-5, rtol=1e-5, what="NaViT logits")


def test_each_image_attends_only_to_itself():
    torch.manual_seed(0)
    model = NaViT(**KW).eval()
    images = _images()
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model([img]) for img in images])
    assert together.shape == (5, 10)
    assert_close(together, alone, atol=1e-5, rtol=1e-5, what="packed vs one image at a time")
    feats = model.forward_features(images)
    assert feats.packed.lengths == (32, 12, 25, 1, 24) and feats.tokens.shape == (1, 94, 32)


def test_token_dropout_keeps_a_fraction_of_each_image_and_trains():
    torch.manual_seed(0)
    model = NaViT(**KW, token_dropout_prob=0.5).train()
    feats = model.forward_features(_images())
    assert feats.packed.lengths == (16, 6, 12, 1, 12)
    model(_images()).sum().backward()
    assert model.pos_embed_height.grad is not None and model.attn_pool_queries.grad is not None


@pytest.mark.parametrize("images, match", [
    ([torch.randn(1, 16, 16)], "image 0 has 1 channels, expected 3"),
    ([torch.randn(3, 16, 12)], "not divisible by the patch size 8"),
    ([torch.randn(3, 72, 16)], "larger than image_size"),
    ([], "at least one image"),
])
def test_bad_images_raise_naming_the_image(images, match):
    with pytest.raises(ValueError, match=match):
        NaViT(**KW)(images)


def test_pack_images_and_unpack():
    images = [torch.arange(3 * 4 * 8.0).view(3, 4, 8), torch.randn(3, 8, 4)]
    patches, lengths, positions = fastvit.pack_images(images, patch_size=4)
    assert lengths == (2, 2) and patches.shape == (4, 48) and positions.tolist() == [[0, 0], [0, 1], [0, 0], [1, 0]]
    # patch (0, 1) of image 0 flattened as (c, p1, p2)
    assert torch.equal(patches[1], images[0][:, :4, 4:8].reshape(-1))
    parts = fastvit.unpack(patches, lengths)
    assert [p.shape[0] for p in parts] == [2, 2] and torch.equal(parts[1], patches[2:])
    with pytest.raises(ValueError, match="lengths sum to 5 but there are 4 tokens"):
        fastvit.unpack(patches, (3, 2))


def test_forward_intermediates_refuses_with_the_reason():
    with pytest.raises(ValueError, match="use forward_features"):
        NaViT(**KW).forward_intermediates(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):  # the input is checked first
        NaViT(**KW).forward_intermediates(torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_presets_are_registered_and_build():
    names = fastvit.list_models("navit_*")
    assert {"navit_tiny_patch16_256", "navit_small_patch16_256", "navit_base_patch16_256",
            "navit_base_patch32_256"} <= set(names)
    torch.manual_seed(0)
    model = fastvit.create_model("navit_small_patch16_256", depth=1).eval()
    assert (model.image_size, model.patch_size, model.num_features, model.num_classes) == ((256, 256), 16, 384, 1000)
    with torch.no_grad():
        assert model([torch.randn(3, 256, 128), torch.randn(3, 64, 64)]).shape == (2, 1000)


def test_a_batch_tensor_is_its_images_and_the_timm_surface_reads_packed_tokens():
    torch.manual_seed(0)
    model = NaViT(**KW).eval()
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        logits = model(x)
        assert_close(logits, model(list(x)), atol=0, rtol=0, what="a (b, c, h, w) batch vs its list of images")
        feats = model.forward_features(x)
        assert isinstance(feats, PackedTokens) and feats.packed.lengths == (24, 24, 24)
        assert feats.tokens.shape == (1, 72, 32)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (3, model.num_features)
        assert_close(model.forward_head(feats), logits, atol=1e-6, rtol=1e-6, what="forward_head")
        assert model.get_classifier() is model.mlp_head[1]
        model.reset_classifier(0)
        assert_close(model(x), pooled, atol=1e-6, rtol=1e-6, what="reset_classifier(0)")
        headless = NaViT(**{**KW, "num_classes": 0}).eval()
        headless.load_state_dict(model.state_dict())
        assert_close(headless(x), pooled, atol=1e-6, rtol=1e-6, what="num_classes=0")
    with pytest.raises(ValueError, match="expected a \\(b, c, h, w\\) batch"):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
def test_padded_mode_computes_what_packing_does(backend):
    """``pack=False``: each image a row of a padded batch with a KeyPaddingMask (the bench's baseline)."""
    torch.manual_seed(0)
    model = NaViT(**KW)
    images = _images()
    with fastvit.attention.use_backend(backend) if backend else torch.enable_grad():
        logits, padded_logits = model(images), model(images, pack=False)
        grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
        padded_grads = torch.autograd.grad(padded_logits.square().sum(), list(model.parameters()))
        feats, padded_feats = model.forward_features(images), model.forward_features(images, pack=False)
    assert_close(padded_logits, logits, atol=1e-5, rtol=1e-5, what="padded vs packed logits")
    assert padded_feats.packed == feats.packed
    assert_close(padded_feats.tokens, feats.tokens, atol=1e-5, rtol=1e-5, what="padded vs packed tokens")
    for (name, _), g, pg in zip(model.named_parameters(), grads, padded_grads):
        assert_close(pg, g, atol=1e-5, rtol=1e-4, what=f"padded vs packed d{name}")


def test_padded_mode_masks_the_padding(monkeypatch):
    import fastvit.layers.attention as attention_layer

    torch.manual_seed(0)
    model = NaViT(**KW).eval()
    seen = []
    real = attention_layer.attend

    def recording(*args, **kwargs):
        seen.append((args[0].shape[0], type(kwargs.get("bias")).__name__, kwargs.get("packed")))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_layer, "attend", recording)
    with torch.no_grad():
        model(_images(), pack=False)
    assert len(seen) == KW["depth"] + 1  # every block and the pooling
    assert all(b == 5 and kind == "KeyPaddingMask" and packed is None for b, kind, packed in seen), seen
