"""MAE: vit-pytorch parity (loss and gradients under the same seed), checkpoints, positions, bad input."""

from __future__ import annotations

import math
import warnings

import helpers
import pytest
import torch
from helpers import SMALL_VIT as SMALL
from helpers import assert_close, seeded_outputs
from torch import nn

from fastvit import ViT
from fastvit.ssl.mae import MAE

vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.mae import MAE as RefMAE  # noqa: E402
from vit_pytorch.vit import ViT as RefViT  # noqa: E402

DECODER = dict(decoder_dim=16, decoder_depth=2, decoder_heads=2, decoder_dim_head=8)


def pair_of_wrappers(vit_kwargs: dict, mae_kwargs: dict):
    """(fastvit MAE, vit-pytorch MAE) with the same weights; the reference made runnable for CLS encoders."""
    torch.manual_seed(0)
    ref = RefMAE(encoder=RefViT(**vit_kwargs), **mae_kwargs)
    fast = MAE(encoder=ViT(**vit_kwargs), **mae_kwargs)
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    if ref.encoder.pool == "cls":
        # vit-pytorch 1.26.11 slices pos_embedding[:, 1:n + 1], written for the pre-1.16.1 3-D layout, and
        # fails on its own 2-D table. Give its encoder that layout so the reference runs as intended.
        ref.encoder.pos_embedding = nn.Parameter(ref.encoder.pos_embedding.detach()[None])  # (1, N + 1, dim)
    return fast, ref


CASES = {
    "mean": (dict(pool="mean"), dict(DECODER)),
    "cls": (dict(pool="cls"), dict(DECODER)),
    "non-square": (dict(pool="mean", image_size=(32, 48), patch_size=(8, 16)), dict(DECODER)),
    "cls-non-square-1ch": (dict(channels=1, image_size=(24, 40), patch_size=(8, 4)), dict(DECODER)),
    "same-width-identity-proj": (dict(pool="cls"), dict(DECODER, decoder_dim=32)),
    "one-masked": (dict(pool="mean"), dict(DECODER, masking_ratio=1 / 16)),  # int(0.0625 * 16) = 1
    "one-visible": (dict(pool="cls"), dict(DECODER, masking_ratio=0.99)),  # int(0.99 * 16) = 15 of 16
    "decoder-defaults": (dict(pool="mean"), dict(decoder_dim=24)),  # depth 1, 8 heads of 64
}


@pytest.mark.parametrize("vit_kwargs,mae_kwargs", list(CASES.values()), ids=list(CASES))
def test_loss_and_gradients_match_vit_pytorch(vit_kwargs, mae_kwargs):
    vit_kwargs = {**SMALL, **vit_kwargs}
    fast, ref = pair_of_wrappers(vit_kwargs, mae_kwargs)
    # at least 20 gradients: encoder, decoder and the wrapper's own parameters (mask token, position table, heads)
    helpers.assert_masked_pretraining_matches(fast, ref, vit_kwargs, what="mae", loss_atol=1e-5, min_grads=20)


def test_vit_pytorch_vit_as_encoder():
    """Any ViT-like encoder works: vit-pytorch's own ViT (no grid / position_embedding) gives its loss."""
    torch.manual_seed(0)
    encoder = RefViT(**SMALL, pool="mean")
    ref = RefMAE(encoder=encoder, **DECODER)
    fast = MAE(encoder=encoder, **DECODER)
    fast.load_state_dict(ref.state_dict())
    expected, actual = seeded_outputs(1, torch.randn(2, 3, 32, 32), ref, fast)
    assert_close(actual, expected, atol=1e-6, rtol=1e-6, what="mae on vit-pytorch's ViT")


def test_a_different_seed_gives_a_different_mask():
    fast, _ = pair_of_wrappers({**SMALL, "pool": "mean"}, DECODER)
    img = torch.randn(2, 3, 32, 32)
    losses = [seeded_outputs(seed, img, fast)[0] for seed in (1, 1, 2)]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_vit_pytorch_1_26_11_fails_with_a_cls_encoder():
    """Why the CLS-encoder parity runs the reference on the 3-D layout. If this starts failing, vit-pytorch
    fixed the slicing: compare against it directly."""
    ref = RefMAE(encoder=RefViT(**SMALL, pool="cls"), **DECODER)
    with pytest.raises(RuntimeError):
        ref(torch.randn(1, 3, 32, 32))


def test_same_seed_same_initial_weights():
    """Parameters are created in vit-pytorch's order, so the same seed gives the same decoder."""
    ref_encoder, fast_encoder = RefViT(**SMALL), ViT(**SMALL)
    torch.manual_seed(3)
    ref = RefMAE(encoder=ref_encoder, **DECODER)
    torch.manual_seed(3)
    fast = MAE(encoder=fast_encoder, **DECODER)
    ref_sd = ref.state_dict()
    wrapper_keys = [k for k in fast.state_dict() if not k.startswith(("encoder.", "patch_to_emb."))]
    assert "decoder.layers.1.0.to_qkv.weight" in wrapper_keys
    for key in wrapper_keys:
        assert torch.equal(fast.state_dict()[key], ref_sd[key]), key


def test_state_dict_keys_and_plain_load_state_dict():
    torch.manual_seed(0)
    ref = RefMAE(encoder=RefViT(**SMALL), **DECODER)
    fast = MAE(encoder=ViT(**SMALL), **DECODER)
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())  # same keys and shapes: no converter needed
    for key, value in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
    assert fast.decoder_pos_emb.weight.shape == (17, 16)  # as many rows as pos_embedding (CLS slot included)


def test_load_vit_pytorch_state_dict_converts_the_old_3d_layout_and_names_bad_keys():
    fast, ref = pair_of_wrappers(SMALL, DECODER)  # ref now holds a (1, 17, 32) pos_embedding
    old = ref.state_dict()
    assert old["encoder.pos_embedding"].shape == (1, 17, 32)
    fresh = MAE(encoder=ViT(**SMALL), **DECODER)
    fresh.load_vit_pytorch_state_dict({"state_dict": old})
    assert torch.equal(fresh.encoder.pos_embedding, old["encoder.pos_embedding"][0])

    broken = dict(old)
    del broken["to_pixels.weight"]
    broken["decoder.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)to_pixels\.weight.*decoder\.bogus"):
        fresh.load_vit_pytorch_state_dict(broken)
    wrong = {**old, "mask_token": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"mask_token: checkpoint \(5,\) vs model \(16,\)"):
        fresh.load_vit_pytorch_state_dict(wrong)
    with pytest.raises(ValueError, match="mapping"):
        fresh.load_vit_pytorch_state_dict([1, 2])


def _wrapper_for_crop(big: MAE, pool: str, legacy: bool, grid=(4, 2)) -> MAE:
    """An MAE whose encoder is built for the smaller image, with the rows the big one should use."""
    h, w = grid
    cells = [r * 4 + c for r in range(h) for c in range(w)] if not legacy else list(range(h * w))
    prefix = [0] if pool == "cls" else []
    offset = len(prefix)
    small = MAE(encoder=ViT(**{**SMALL, "image_size": (8 * h, 8 * w), "pool": pool}), **DECODER)
    sd = big.state_dict()
    sd["encoder.pos_embedding"] = sd["encoder.pos_embedding"][prefix + [offset + c for c in cells]]
    # the decoder table is indexed by patch (0 .. N-1); a CLS encoder's table has one more, unused row
    sd["decoder_pos_emb.weight"] = sd["decoder_pos_emb.weight"][cells + ([16] if pool == "cls" else [])]
    small.load_state_dict(sd)
    return small


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("legacy", [False, True], ids=["2d-crop", "legacy-flat-slice"])
def test_smaller_images_use_the_encoders_positions(pool, legacy):
    torch.manual_seed(0)
    big = MAE(encoder=ViT(**SMALL, pool=pool, legacy_pos_slicing=legacy), **DECODER)
    small = _wrapper_for_crop(big, pool, legacy)
    img = torch.randn(2, 3, 32, 16)  # a 4 x 2 patch grid inside the 4 x 4 one
    loss, expected, other = seeded_outputs(7, img, big, small, _wrapper_for_crop(big, pool, not legacy))
    assert_close(loss, expected, atol=1e-6, rtol=1e-6, what=f"mae {pool} {'legacy' if legacy else 'crop'}")
    assert (loss - other).abs() > 1e-4  # the two position choices really differ here


def test_bfloat16_model_runs():
    """vit-pytorch builds the decoder input in fp32, which a bf16 decoder rejects."""
    fast, ref = pair_of_wrappers({**SMALL, "pool": "mean"}, DECODER)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        fp32 = fast(img)
        ref.to(torch.bfloat16)
        with pytest.raises(RuntimeError):
            ref(img.bfloat16())
        fast.to(torch.bfloat16)
        torch.manual_seed(1)
        bf16 = fast(img.bfloat16())
    assert bf16.dtype == torch.bfloat16
    assert_close(bf16.float(), fp32, atol=0.0, rtol=3e-2, what="bf16 vs fp32 loss")


@pytest.mark.parametrize("size", [(32, 32), (32, 16)], ids=["full", "smaller"])
def test_vectorised_and_free_of_host_syncs(size):
    torch.manual_seed(0)
    helpers.assert_vectorised_without_host_syncs(MAE(encoder=ViT(**SMALL), **DECODER), size)


def test_seed_readme_example(tmp_path):
    v = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=8, mlp_dim=2048)
    mae = MAE(encoder=v, masking_ratio=0.75, decoder_dim=512, decoder_depth=6)
    images = torch.randn(2, 3, 256, 256)  # the README uses 8; the model is the README's
    loss = mae(images)
    loss.backward()
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.item() > 0
    assert v.to_patch_embedding[2].weight.grad.abs().sum() > 0
    assert v.transformer.layers[5][1].net[4].weight.grad.abs().sum() > 0
    assert v.cls_token.grad is None and v.mlp_head.weight.grad is None
    torch.save(v.state_dict(), tmp_path / "trained-vit.pt")
    restored = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=8, mlp_dim=2048)
    restored.load_state_dict(torch.load(tmp_path / "trained-vit.pt"))
    assert torch.equal(restored.pos_embedding, v.pos_embedding)


def test_module_path_alias():
    from fastvit.mae import MAE as AliasMAE

    assert AliasMAE is MAE


@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.5, float("nan"), "0.5", None, True])
def test_bad_masking_ratio(ratio):
    with pytest.raises(ValueError, match=f"masking_ratio.*{ratio!r}"):
        MAE(encoder=ViT(**SMALL), decoder_dim=16, masking_ratio=ratio)


def test_masking_ratio_that_masks_no_patch():
    # vit-pytorch returns a NaN loss (the MSE of an empty tensor); fastvit refuses up front.
    ref = RefMAE(encoder=RefViT(**SMALL, pool="mean"), decoder_dim=16, masking_ratio=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isnan(ref(torch.randn(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="masking_ratio=0.05 masks 0 of 16 patches"):
        MAE(encoder=ViT(**SMALL), decoder_dim=16, masking_ratio=0.05)
    mae = MAE(encoder=ViT(**SMALL), decoder_dim=16, masking_ratio=0.2)
    with pytest.raises(ValueError, match="masks 0 of 4 patches"):  # fine at 16 patches (3), not at 4
        mae(torch.randn(1, 3, 16, 16))
    mae.masking_ratio = 0.01  # vit-pytorch reads the attribute in forward; so does fastvit
    with pytest.raises(ValueError, match="masks 0 of 16"):
        mae(torch.randn(1, 3, 32, 32))


class _NoPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_patch_embedding = nn.Sequential(nn.Identity(), nn.Identity(), nn.Linear(12, 8))
        self.transformer = nn.Identity()


@pytest.mark.parametrize(
    "encoder,match",
    [
        (nn.Linear(3, 3), "Linear has no to_patch_embedding, pos_embedding, transformer"),
        (_NoPositions(), "_NoPositions has no pos_embedding"),
        ("vit", "str has no"),
    ],
    ids=["linear", "no-positions", "not-a-module"],
)
def test_encoder_that_is_not_a_vit(encoder, match):
    with pytest.raises(ValueError, match=match):
        MAE(encoder=encoder, decoder_dim=16)


def test_bad_decoder_sizes_and_images():
    for name, value in [("decoder_dim", 0), ("decoder_heads", 0), ("decoder_dim_head", 1.5), ("decoder_depth", -1)]:
        with pytest.raises(ValueError, match=f"{name} must be an integer >= ., got {value!r}"):
            MAE(encoder=ViT(**SMALL), **{"decoder_dim": 16, name: value})
    mae = MAE(encoder=ViT(**SMALL), decoder_dim=16)
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        mae(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="does not fit the model"):
        mae(torch.randn(1, 3, 64, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        mae(torch.randn(1, 3, 30, 32))
