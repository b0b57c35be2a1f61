"""MPP: vit-pytorch parity (same seed: loss and gradients), the corruption statistics, the colour-bin targets,
vit-pytorch checkpoints, the seed README example, bad arguments and images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from fastvit.deepvit import DeepViT
from fastvit.mpp import MPP, MPPLoss
from helpers import SMALL_VIT as SMALL
from helpers import assert_close
from torch import nn

from fastvit import ViT

vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed (pip install fastvit[dev])")
from vit_pytorch.deepvit import DeepViT as RefDeepViT  # noqa: E402
from vit_pytorch.mpp import MPP as RefMPP  # noqa: E402
from vit_pytorch.mpp import MPPLoss as RefMPPLoss  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def with_3d_layout(ref: nn.Module) -> nn.Module:
    """vit-pytorch's MPP indexes the pre-1.16 3-D CLS/position layout; give its 1.26 ViT 3-D copies so it runs
    (only the ViT's own forward would need the 2-D ones, and MPP never calls it)."""
    if ref.cls_token.dim() == 2:
        ref.cls_token = nn.Parameter(ref.cls_token.detach().unsqueeze(0))  # (1, 1, dim)
        ref.pos_embedding = nn.Parameter(ref.pos_embedding.detach().unsqueeze(0))  # (1, N + 1, dim)
    return ref


def pair_of_mpps(model_kwargs: dict, mpp_kwargs: dict, deepvit: bool = False, legacy_pos_slicing: bool = False):
    fast_cls, ref_cls = (DeepViT, RefDeepViT) if deepvit else (ViT, vit_pytorch.ViT)
    torch.manual_seed(0)
    ref = ref_cls(**model_kwargs)
    fast = fast_cls(**model_kwargs, legacy_pos_slicing=legacy_pos_slicing)
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    torch.manual_seed(1)
    ref_mpp = RefMPP(with_3d_layout(ref), **mpp_kwargs)
    torch.manual_seed(1)
    fast_mpp = MPP(fast, **mpp_kwargs)
    return fast_mpp, ref_mpp


def assert_same_loss_and_grads(fast_mpp, ref_mpp, images, seed, what):
    torch.manual_seed(seed)
    ref_loss = ref_mpp(images)
    torch.manual_seed(seed)
    fast_loss = fast_mpp(images)
    assert_close(fast_loss, ref_loss, atol=1e-5, rtol=1e-5, what=f"{what}: loss")
    ref_loss.backward()
    fast_loss.backward()
    ref_params, fast_params = dict(ref_mpp.named_parameters()), dict(fast_mpp.named_parameters())
    assert list(ref_params) == list(fast_params)
    for name, ref_param in ref_params.items():
        fast_grad = fast_params[name].grad
        if ref_param.grad is None:  # mlp_head (MPP never runs the classifier)
            assert fast_grad is None, f"{what}: {name} has a gradient, vit-pytorch's has none"
            continue
        assert_close(fast_grad.reshape(ref_param.shape), ref_param.grad, atol=1e-5, rtol=1e-4,
                     what=f"{what}: grad of {name}")
    return fast_loss


CASES = {
    "readme-probs-dropout": (dict(dropout=0.1, emb_dropout=0.1),
                             dict(mask_prob=0.15, random_patch_prob=0.30, replace_prob=0.50), (32, 32), False),
    "defaults": ({}, {}, (32, 32), False),  # random_patch_prob / (1 - replace_prob) = 1
    "no-random-patches": ({}, dict(mask_prob=0.5, random_patch_prob=0.0, replace_prob=0.8), (32, 32), False),
    "mean-std-2bits": ({}, dict(mask_prob=0.4, output_channel_bits=2, max_pixel_val=1.0, mean=MEAN, std=STD),
                       (32, 32), False),
    "1ch-non-square": (dict(image_size=(32, 48), channels=1),
                       dict(mask_prob=0.3, channels=1, random_patch_prob=0.2, replace_prob=0.6), (32, 48), False),
    "smaller-height": ({}, dict(mask_prob=0.3), (24, 32), False),  # full width: the 2-D crop is the flat slice
    "deepvit": (dict(dropout=0.1), dict(mask_prob=0.25), (32, 32), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_vit_pytorch(case):
    model_overrides, mpp_kwargs, size, deepvit = CASES[case]
    model_kwargs = {**SMALL, **model_overrides}
    fast_mpp, ref_mpp = pair_of_mpps(model_kwargs, dict(patch_size=8, dim=32, **mpp_kwargs), deepvit=deepvit)
    channels = model_kwargs.get("channels", 3)
    torch.manual_seed(7)
    images = torch.rand(6, channels, *size)
    if "mean" in mpp_kwargs:
        images = (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    loss = assert_same_loss_and_grads(fast_mpp, ref_mpp, images, seed=11, what=case)
    assert 0 < loss.item() < 2 * math.log(2 ** (3 * channels))  # a real classification loss, not 0 or NaN


def test_narrow_images_take_the_2d_crop_of_the_positions():
    """On an image narrower than the model, vit-pytorch's flat slice gives patches the wrong grid cells;
    fastvit takes the model's 2-D crop, and the model's legacy flag restores vit-pytorch's loss."""
    images = torch.rand(4, 3, 32, 16)
    mpp_kwargs = dict(patch_size=8, dim=32, mask_prob=0.5)
    legacy, ref_mpp = pair_of_mpps(SMALL, mpp_kwargs, legacy_pos_slicing=True)
    assert_same_loss_and_grads(legacy, ref_mpp, images, seed=3, what="legacy_pos_slicing")
    fixed, ref_mpp = pair_of_mpps(SMALL, mpp_kwargs)
    torch.manual_seed(3)
    fixed_loss = fixed(images)
    torch.manual_seed(3)
    assert abs(fixed_loss.item() - ref_mpp(images).item()) > 1e-4


def test_same_seed_gives_vit_pytorchs_wrapper_parameters_and_keys():
    fast_mpp, ref_mpp = pair_of_mpps(SMALL, dict(patch_size=8, dim=32, output_channel_bits=2))
    assert fast_mpp.to_bits.weight.shape == (2 ** 6, 32)
    assert fast_mpp.mask_token.shape == (1, 1, 3 * 8 * 8)
    for name in ("to_bits.weight", "to_bits.bias", "mask_token"):
        assert torch.equal(fast_mpp.state_dict()[name], ref_mpp.state_dict()[name]), name
    assert list(fast_mpp.state_dict()) == list(ref_mpp.state_dict())
    # patch_to_emb is the model's own embedding (without the Rearrange), not a copy
    assert fast_mpp.patch_to_emb[0][1] is fast_mpp.transformer.to_patch_embedding[2]


def test_loads_a_vit_pytorch_mpp_checkpoint():
    torch.manual_seed(0)
    ref = vit_pytorch.ViT(**SMALL)
    ref_mpp = RefMPP(ref, patch_size=8, dim=32, mask_prob=0.3)
    torch.manual_seed(5)  # different weights everywhere
    fast_mpp = MPP(ViT(**SMALL), patch_size=8, dim=32, mask_prob=0.3)
    fast_mpp.load_vit_pytorch_state_dict(ref_mpp.state_dict())  # vit-pytorch 1.26's 2-D cls/pos layout
    with_3d_layout(ref)
    images = torch.rand(4, 3, 32, 32)
    assert_same_loss_and_grads(fast_mpp, ref_mpp, images, seed=2, what="loaded checkpoint")


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("mask_token"), r"missing keys \(1\): mask_token"),
    (lambda sd: sd.update({"to_bits.extra": torch.zeros(1)}), r"unexpected keys \(1\): to_bits.extra"),
    (lambda sd: sd.update({"to_bits.weight": torch.zeros(8, 32)}), r"to_bits.weight: checkpoint \(8, 32\)"),
])
def test_bad_checkpoints_name_the_keys(edit, match):
    ref_mpp = RefMPP(vit_pytorch.ViT(**SMALL), patch_size=8, dim=32)
    state_dict = dict(ref_mpp.state_dict())
    edit(state_dict)
    fast_mpp = MPP(ViT(**SMALL), patch_size=8, dim=32)
    with pytest.raises(ValueError, match=match):
        fast_mpp.load_vit_pytorch_state_dict(state_dict)


def test_corruption_follows_the_bert_proportions():
    mpp = MPP(ViT(**SMALL), patch_size=8, dim=32, mask_prob=0.25, replace_prob=0.5, random_patch_prob=0.3)
    batch, seq_len, patch_dim = 4000, 16, 3 * 8 * 8
    with torch.no_grad():
        mpp.mask_token.fill_(-1.0)
    # patch i of image b is filled with b * seq_len + i, so a copied patch says where it came from
    ids = torch.arange(batch * seq_len, dtype=torch.float32).view(batch, seq_len)
    patches = ids.unsqueeze(-1).expand(-1, -1, patch_dim).contiguous()
    torch.manual_seed(0)
    corrupted, masked_indices = mpp.corrupt(patches)
    corrupted = corrupted.detach()
    assert masked_indices.shape == (batch, math.ceil(0.25 * seq_len))
    mask = torch.zeros(batch, seq_len, dtype=torch.bool).scatter_(1, masked_indices, True)
    assert (mask.sum(1) == 4).all()  # k distinct patches per image
    assert (corrupted == corrupted[..., :1]).all()  # whole patches are replaced
    value = corrupted[..., 0]
    assert torch.equal(value[~mask], ids[~mask])  # unmasked patches untouched
    masked_values, masked_ids = value[mask], ids[mask]
    token = masked_values == -1
    copied = (masked_values != -1) & (masked_values != masked_ids)
    same_image = torch.div(masked_values[copied], seq_len, rounding_mode="floor") == torch.div(
        masked_ids[copied], seq_len, rounding_mode="floor")
    assert same_image.all()  # random patches come from the same image
    # P(token) = 0.5; P(random) = 0.3, of which 1/16 draw the patch itself (then counted as kept)
    assert abs(token.float().mean().item() - 0.5) < 0.03
    assert abs(copied.float().mean().item() - 0.3 * (1 - 1 / seq_len)) < 0.03


def test_targets_are_vit_pytorchs_colour_bins():
    images = torch.empty(1, 3, 16, 16)
    images[:, 0], images[:, 1], images[:, 2] = 0.3, 0.6, 0.9
    loss = MPPLoss(8, 3, 3, 1.0, None, None)
    # bins of 1/8: 0.3 -> 2, 0.6 -> 4, 0.9 -> 7; label = 2 + 8 * 4 + 64 * 7
    assert torch.equal(loss.target_labels(images), torch.full((1, 4), 2 + 8 * 4 + 64 * 7))
    for bits, stats in [(3, (None, None)), (2, (MEAN, STD)), (4, (0.5, 0.25))]:
        torch.manual_seed(bits)
        images, mask = torch.randn(3, 3, 32, 32), torch.rand(3, 16) < 0.5
        logits = torch.randn(3, 16, 2 ** (3 * bits))
        expected = RefMPPLoss(8, 3, bits, 1.0, *stats)(logits, images, mask)
        assert_close(MPPLoss(8, 3, bits, 1.0, *stats)(logits, images, mask), expected, atol=1e-6, rtol=1e-6,
                     what=f"MPPLoss bits={bits} stats={stats}")


def test_mean_pooled_vit_without_cls_token():
    """vit-pytorch's MPP cannot run a pool='mean' ViT (no CLS token); fastvit's predicts every patch from its
    own token. The loss is recomputed by hand from the same corruption."""
    torch.manual_seed(0)
    model = ViT(**SMALL, pool="mean")
    mpp = MPP(model, patch_size=8, dim=32, mask_prob=0.5)
    images = torch.rand(3, 3, 32, 32)
    torch.manual_seed(4)
    loss = mpp(images)
    torch.manual_seed(4)
    corrupted, masked_indices = mpp.corrupt(rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=8, p2=8))
    tokens = model.transformer(mpp.patch_to_emb(corrupted) + model.pos_embedding)  # no CLS slot
    tokens = tokens.gather(1, masked_indices.unsqueeze(-1).expand(-1, -1, 32))
    labels = mpp.loss.target_labels(images).gather(1, masked_indices)
    expected = F.cross_entropy(mpp.to_bits(tokens).flatten(0, 1), labels.flatten())
    assert_close(loss, expected, atol=1e-6, rtol=1e-6, what="pool=mean")
    loss.backward()
    assert model.pos_embedding.grad.abs().sum(-1).gt(0).all()  # every patch position is used


def test_seed_readme_example_small():
    """The README loop, shrunk: two Adam steps train the encoder and the wrapper, and the weights save."""
    model = ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.1,
                emb_dropout=0.1)
    mpp_trainer = MPP(transformer=model, patch_size=8, dim=32, mask_prob=0.15, random_patch_prob=0.30,
                      replace_prob=0.50)
    opt = torch.optim.Adam(mpp_trainer.parameters(), lr=3e-4)
    before = {name: p.detach().clone() for name, p in mpp_trainer.named_parameters()}
    for _ in range(2):
        images = torch.FloatTensor(20, 3, 32, 32).uniform_(0.0, 1.0)
        loss = mpp_trainer(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    unchanged = [name for name, p in mpp_trainer.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == ["transformer.mlp_head.weight", "transformer.mlp_head.bias"]
    reloaded = ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64)
    reloaded.load_state_dict(model.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_prob=1.5), r"mask_prob must be in \(0, 1\], got 1.5"),
    (dict(mask_prob=0.0), r"mask_prob must be in \(0, 1\], got 0.0"),
    (dict(replace_prob=-0.1), r"replace_prob must be in \[0, 1\], got -0.1"),
    (dict(random_patch_prob=2), r"random_patch_prob must be in \[0, 1\], got 2"),
    (dict(random_patch_prob=0.6, replace_prob=0.5), r"at most 1.*0.6 \+ 0.5"),
    (dict(random_patch_prob=0.1, replace_prob=1.0), r"at most 1.*0.1 \+ 1.0"),
    (dict(patch_size=16), r"patch_size=\(16, 16\) does not match the model's patch size \(8, 8\)"),
    (dict(dim=64), r"dim=64 does not match the model's width 32"),
    (dict(channels=1), r"channels=1 does not match the model's 3 channels"),
    (dict(mean=MEAN), r"mean and std must be given together"),
    (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), r"mean must have 1 or 3 \(channels\) values, got 2"),
    (dict(output_channel_bits=0), r"output_channel_bits must be a positive int, got 0"),
])
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPP(ViT(**SMALL), **{"patch_size": 8, "dim": 32, **kwargs})


def test_models_without_the_vit_surface_are_refused():
    with pytest.raises(ValueError, match=r"has no to_patch_embedding, cls_token, pos_embedding, transformer"):
        MPP(nn.Linear(3, 3), patch_size=8, dim=32)


@pytest.mark.parametrize("shape,match", [
    ((2, 1, 32, 32), r"expected 3 channels, got 1"),
    ((2, 3, 30, 32), r"not divisible by the patch size"),
    ((2, 3, 64, 32), r"does not fit the model"),
])
def test_bad_images_are_value_errors(shape, match):
    mpp = MPP(ViT(**SMALL), patch_size=8, dim=32)
    with pytest.raises(ValueError, match=match):
        mpp(torch.rand(*shape))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_vit_pytorch_and_moves_the_statistics():
    fast_mpp, ref_mpp = pair_of_mpps(SMALL, dict(patch_size=8, dim=32, mask_prob=0.3))
    fast_mpp, ref_mpp = fast_mpp.cuda(), ref_mpp.cuda()
    images = torch.rand(4, 3, 32, 32, device="cuda")
    assert_same_loss_and_grads(fast_mpp, ref_mpp, images, seed=1, what="cuda")
    normalised = MPP(ViT(**SMALL), patch_size=8, dim=32, mean=MEAN, std=STD).cuda()
    assert normalised.loss.mean.device.type == "cuda"
    assert torch.isfinite(normalised(images))
