"""SimMIM: vit-pytorch parity (loss and gradients under the same seed), checkpoints, positions, bad input."""

from __future__ import annotations

import math

import helpers
import pytest
import torch
from helpers import SMALL_VIT as SMALL
from helpers import assert_close, seeded_outputs
from torch import nn

from fastvit import ViT
from fastvit.ssl.simmim import SimMIM

vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.simmim import SimMIM as RefSimMIM  # noqa: E402
from vit_pytorch.vit import ViT as RefViT  # noqa: E402


def legacy_3d_positions(pos: torch.Tensor, pool: str) -> nn.Parameter:
    """The pre-1.16.1 table ``(1, 1 + N, dim)`` vit-pytorch's SimMIM slices with ``[:, 1:N + 1]``.

    A mean-pool encoder has no CLS row any more; a placeholder row takes the slot the slice skips.
    """
    if pool == "mean":
        pos = torch.cat((torch.full_like(pos[:1], float("nan")), pos))  # NaN: any use of it would show
    return nn.Parameter(pos.detach()[None])


def pair_of_wrappers(vit_kwargs: dict, sim_kwargs: dict):
    """(fastvit SimMIM, vit-pytorch SimMIM) with the same weights, the reference made runnable."""
    torch.manual_seed(0)
    ref = RefSimMIM(encoder=RefViT(**vit_kwargs), **sim_kwargs)
    fast = SimMIM(encoder=ViT(**vit_kwargs), **sim_kwargs)
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    # vit-pytorch 1.26.11 slices pos_embedding[:, 1:n + 1], written for the pre-1.16.1 3-D layout, and
    # fails on its own 2-D table (either pooling). Give its encoder that layout so it runs as intended.
    ref.encoder.pos_embedding = legacy_3d_positions(ref.encoder.pos_embedding, ref.encoder.pool)
    return fast, ref


def positions_in_fastvit_layout(pool: str):
    """``assert_grads_match``'s ``ref_grad_for``: the 3-D table's gradient without its placeholder row."""

    def ref_grad_for(name, ref_grad, param):
        if name != "encoder.pos_embedding":
            return ref_grad
        return ref_grad[0, 1:] if pool == "mean" else ref_grad[0]

    return ref_grad_for


CASES = {
    "cls": (dict(pool="cls"), {}),
    "mean": (dict(pool="mean"), {}),
    "non-square": (dict(image_size=(32, 48), patch_size=(8, 16)), {}),
    "mean-non-square-1ch": (dict(pool="mean", channels=1, image_size=(24, 40), patch_size=(8, 4)), {}),
    "one-masked": (dict(pool="mean"), dict(masking_ratio=1 / 16)),  # int(0.0625 * 16) = 1
    "one-visible": (dict(pool="cls"), dict(masking_ratio=0.99)),  # int(0.99 * 16) = 15 of 16
    "ratio-0.75": (dict(pool="cls", dim_head=8, heads=4), dict(masking_ratio=0.75)),
}


@pytest.mark.parametrize("vit_kwargs,sim_kwargs", list(CASES.values()), ids=list(CASES))
def test_loss_and_gradients_match_vit_pytorch(vit_kwargs, sim_kwargs):
    vit_kwargs = {**SMALL, **vit_kwargs}
    fast, ref = pair_of_wrappers(vit_kwargs, sim_kwargs)
    pool = vit_kwargs.get("pool", "cls")
    helpers.assert_masked_pretraining_matches(fast, ref, vit_kwargs, what="simmim", loss_atol=1e-6, min_grads=15,
                                      ref_grad_for=positions_in_fastvit_layout(pool))
    if pool == "cls":
        assert not fast.encoder.pos_embedding.grad[0].any()  # the CLS slot: the encoder runs without CLS


def test_paper_loss_scale():
    """``divide_by_num_masked=False``: the mean over masked pixels, ``num_masked`` times vit-pytorch's loss."""
    torch.manual_seed(0)
    sim = SimMIM(encoder=ViT(**SMALL), masking_ratio=0.5)
    paper = SimMIM(encoder=sim.encoder, masking_ratio=0.5, divide_by_num_masked=False)
    paper.load_state_dict(sim.state_dict())
    loss, paper_loss = seeded_outputs(4, torch.randn(2, 3, 32, 32), sim, paper)
    assert_close(paper_loss, loss * 8, atol=0.0, rtol=1e-6, what="paper scale = 8 masked patches x vit-pytorch")
    assert 0.3 < paper_loss < 3  # an L1 per pixel of unit-variance targets, not ~1/8 of it


def test_a_different_seed_gives_a_different_mask():
    fast, _ = pair_of_wrappers(SMALL, {})
    img = torch.randn(2, 3, 32, 32)
    losses = [seeded_outputs(seed, img, fast)[0] for seed in (1, 1, 2)]
    assert losses[0] == losses[1] and losses[0] != losses[2]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_1_26_11_fails_on_its_own_vit(pool):
    """Why the parity runs the reference on the 3-D layout. If this starts failing, vit-pytorch fixed the
    slicing: compare against it directly."""
    ref = RefSimMIM(encoder=RefViT(**SMALL, pool=pool))
    with pytest.raises(RuntimeError):
        ref(torch.randn(1, 3, 32, 32))


def test_same_seed_same_initial_weights():
    ref_encoder, fast_encoder = RefViT(**SMALL), ViT(**SMALL)
    torch.manual_seed(3)
    ref = RefSimMIM(encoder=ref_encoder)
    torch.manual_seed(3)
    fast = SimMIM(encoder=fast_encoder)
    for key in ("mask_token", "to_pixels.weight", "to_pixels.bias"):
        assert torch.equal(fast.state_dict()[key], ref.state_dict()[key]), key


def test_state_dict_keys_and_loading():
    torch.manual_seed(0)
    ref = RefSimMIM(encoder=RefViT(**SMALL, pool="mean"))
    fast = SimMIM(encoder=ViT(**SMALL, pool="mean"))
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())  # same keys and shapes: no converter needed
    for key, value in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key

    old = RefSimMIM(encoder=RefViT(**SMALL)).state_dict()
    old["encoder.pos_embedding"] = old["encoder.pos_embedding"][None]  # pre-1.16.1 (1, N + 1, dim)
    fresh = SimMIM(encoder=ViT(**SMALL))
    fresh.load_vit_pytorch_state_dict({"model": old})
    assert torch.equal(fresh.encoder.pos_embedding, old["encoder.pos_embedding"][0])
    broken = {k: v for k, v in old.items() if k != "mask_token"}
    broken["to_pixels.scale"] = torch.ones(1)
    bad_keys = r"(?s)missing keys \(1\): mask_token.*unexpected keys \(1\): to_pixels\.scale"
    with pytest.raises(ValueError, match=bad_keys):
        fresh.load_vit_pytorch_state_dict(broken)
    with pytest.raises(ValueError, match=r"to_pixels\.weight: checkpoint \(3, 32\) vs model \(192, 32\)"):
        fresh.load_vit_pytorch_state_dict({**old, "to_pixels.weight": torch.zeros(3, 32)})


@pytest.mark.parametrize("legacy", [False, True], ids=["2d-crop", "legacy-flat-slice"])
def test_smaller_images_use_the_encoders_positions(legacy):
    torch.manual_seed(0)
    big = SimMIM(encoder=ViT(**SMALL, legacy_pos_slicing=legacy))
    cells = list(range(8)) if legacy else [r * 4 + c for r in range(4) for c in range(2)]  # 4 x 2 of 4 x 4
    small = SimMIM(encoder=ViT(**{**SMALL, "image_size": (32, 16)}))
    sd = big.state_dict()
    sd["encoder.pos_embedding"] = sd["encoder.pos_embedding"][[0] + [1 + c for c in cells]]
    small.load_state_dict(sd)
    loss, expected = seeded_outputs(7, torch.randn(2, 3, 32, 16), big, small)
    assert_close(loss, expected, atol=1e-7, rtol=1e-6, what=f"simmim {'legacy' if legacy else 'crop'}")


def test_vectorised_and_free_of_host_syncs():
    torch.manual_seed(0)
    helpers.assert_vectorised_without_host_syncs(SimMIM(encoder=ViT(**SMALL)), (32, 16))


def test_seed_readme_example(tmp_path):
    v = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=8, mlp_dim=2048)
    mim = SimMIM(encoder=v, masking_ratio=0.5)
    images = torch.randn(2, 3, 256, 256)  # the README uses 8; the model is the README's
    loss = mim(images)
    loss.backward()
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.item() > 0
    assert mim.mask_token.grad.abs().sum() > 0 and v.to_patch_embedding[2].weight.grad.abs().sum() > 0
    assert v.cls_token.grad is None and v.mlp_head.weight.grad is None
    torch.save(v.state_dict(), tmp_path / "trained-vit.pt")
    restored = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=8, mlp_dim=2048)
    restored.load_state_dict(torch.load(tmp_path / "trained-vit.pt"))
    assert torch.equal(restored.transformer.norm.weight, v.transformer.norm.weight)


def test_module_path_alias():
    from fastvit.simmim import SimMIM as AliasSimMIM

    assert AliasSimMIM is SimMIM


@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.5, float("nan"), "0.5", None, True])
def test_bad_masking_ratio(ratio):
    with pytest.raises(ValueError, match=f"masking_ratio.*{ratio!r}"):
        SimMIM(encoder=ViT(**SMALL), masking_ratio=ratio)


def test_masking_ratio_that_masks_no_patch():
    # vit-pytorch would divide an empty mean by zero; fastvit refuses up front.
    with pytest.raises(ValueError, match="masking_ratio=0.05 masks 0 of 16 patches"):
        SimMIM(encoder=ViT(**SMALL), masking_ratio=0.05)
    sim = SimMIM(encoder=ViT(**SMALL), masking_ratio=0.2)
    with pytest.raises(ValueError, match="masks 0 of 4 patches"):  # fine at 16 patches (3), not at 4
        sim(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize(
    "encoder,match",
    [
        (nn.Conv2d(3, 8, 3), "Conv2d has no to_patch_embedding, pos_embedding, transformer"),
        (None, "NoneType has no"),
    ],
    ids=["conv", "none"],
)
def test_encoder_that_is_not_a_vit(encoder, match):
    with pytest.raises(ValueError, match=match):
        SimMIM(encoder=encoder)


def test_encoder_with_a_bad_patch_embedding_or_position_table():
    vit = ViT(**SMALL)
    vit.to_patch_embedding = nn.Identity()
    with pytest.raises(ValueError, match="to_patch_embedding must be an nn.Sequential"):
        SimMIM(encoder=vit)
    vit = ViT(**SMALL)
    vit.pos_embedding = nn.Parameter(torch.zeros(2, 17, 32))
    with pytest.raises(ValueError, match=r"pos_embedding must be .*got \(2, 17, 32\)"):
        SimMIM(encoder=vit)


def test_bad_images():
    sim = SimMIM(encoder=ViT(**SMALL))
    with pytest.raises(ValueError, match="expected 3 channels, got 4"):
        sim(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"expected an image batch \(b, c, h, w\), got \(3, 32, 32\)"):
        sim(torch.randn(3, 32, 32))
