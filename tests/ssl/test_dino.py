"""Dino: vit-pytorch parity (same seeds: construction, loss, gradients, teacher EMA and centres, with the
default torchvision augmentation and with deterministic ones), the projection-head fix and its flag,
vit-pytorch checkpoints, the seed README example, bad arguments."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import SMALL_VIT as SMALL
from helpers import assert_close

from fastvit import ViT
from fastvit.ssl.dino import Dino

vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed (pip install fastvit[dev])")
T = pytest.importorskip("torchvision.transforms")
from vit_pytorch.dino import Dino as RefDino  # noqa: E402

DINO = dict(image_size=32, hidden_layer="to_latent", projection_hidden_size=16, projection_layers=4, num_classes_K=64)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)  # RandomApply (colour jitter, blur) flips Python's coin, as in vit-pytorch


def flip_views(x):
    return x.flip(-1)


def pair_of_dinos(model_kwargs: dict, dino_kwargs: dict, legacy_projector_gelu: bool = True):
    torch.manual_seed(0)
    ref_net = vit_pytorch.ViT(**model_kwargs)
    net = ViT(**model_kwargs)
    net.load_vit_pytorch_state_dict(ref_net.state_dict())
    seed_all(1)
    ref = RefDino(ref_net, **dino_kwargs)
    seed_all(1)
    fast = Dino(net, **dino_kwargs, legacy_projector_gelu=legacy_projector_gelu)
    return fast, ref


# Buffers a forward pass writes (the build pass's teacher outputs): fastvit's attention may run another
# kernel than vit-pytorch's matmul-softmax-matmul (SDPA on the CPU), so these agree to rounding, not bits.
FORWARD_BUFFERS = ("last_teacher_centers",)


def assert_same_state(fast, ref, what, atol=0.0):
    fast_sd, ref_sd = fast.state_dict(), ref.state_dict()
    assert list(fast_sd) == list(ref_sd), what
    for name, value in ref_sd.items():
        tol = max(atol, 1e-6) if name in FORWARD_BUFFERS else atol
        assert_close(fast_sd[name], value, atol=tol, rtol=tol, what=f"{what}: {name}")


def train_step_both(fast, ref, images, seed, what, **forward_kwargs):
    """One step on both: same loss, same student gradients, then SGD and the EMA give the same teacher."""
    seed_all(seed)
    ref_loss = ref(images, **forward_kwargs)
    seed_all(seed)
    fast_loss = fast(images, **forward_kwargs)
    assert_close(fast_loss, ref_loss, atol=1e-5, rtol=1e-5, what=f"{what}: loss")
    ref_loss.backward()
    fast_loss.backward()
    ref_params = dict(ref.student_encoder.named_parameters())
    for name, param in fast.student_encoder.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:  # the classifier when the embedding is taken before it
            assert param.grad is None, f"{what}: {name}"
            continue
        assert_close(param.grad, ref_grad, atol=1e-5, rtol=1e-4, what=f"{what}: grad of {name}")
    assert all(p.grad is None for p in fast.teacher_encoder.parameters())
    for model in (fast, ref):
        with torch.no_grad():
            for p in model.student_encoder.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
                    p.grad = None
        model.update_moving_average()
    assert_same_state(fast, ref, f"{what}: after the EMA", atol=1e-6)
    return fast_loss


CASES = {
    # (ViT overrides, Dino overrides, forward kwargs)
    "readme-small-default-aug": ({}, {}, {}),
    "child-index-dropout-temps": (dict(dropout=0.1, emb_dropout=0.1),
                                  dict(hidden_layer=-2, projection_layers=2, student_temp=0.5, teacher_temp=0.1,
                                       augment_fn=flip_views, augment_fn2=torch.nn.Identity()),
                                  dict(teacher_temp=0.07)),
    "net-output": ({}, dict(hidden_layer=-1, projection_layers=3, moving_average_decay=0.5,
                            center_moving_average_decay=0.7), {}),
    "token-sequence-mean-pool": (dict(pool="mean"), dict(hidden_layer="transformer", projection_layers=2,
                                                         local_upper_crop_scale=0.2, global_lower_crop_scale=0.8), {}),
    "hidden-size-equals-dim": ({}, dict(projection_layers=1, projection_hidden_size=32), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_matches_vit_pytorch(case):
    model_overrides, dino_overrides, forward_kwargs = CASES[case]
    fast, ref = pair_of_dinos({**SMALL, **model_overrides}, {**DINO, **dino_overrides})
    assert_same_state(fast, ref, f"{case}: after construction")  # projector init bit for bit, build pass alike
    torch.manual_seed(3)
    images = torch.rand(4, 3, 32, 32)
    losses = [train_step_both(fast, ref, images, seed, f"{case} step {seed}", **forward_kwargs) for seed in (5, 6)]
    assert all(0 < loss.item() < 2 * torch.log(torch.tensor(64.0)).item() for loss in losses)
    assert not torch.equal(fast.teacher_centers, torch.zeros_like(fast.teacher_centers))


def test_default_augmentation_matches_vit_pytorch_on_every_branch(monkeypatch):
    """torchvision's transforms draw from torch's generator (and RandomApply from Python's); over these seeds
    the colour jitter and the blur both fire, so every draw of the default path is compared."""
    calls = {"jitter": 0, "blur": 0}
    for name, cls in (("jitter", T.ColorJitter), ("blur", T.GaussianBlur)):
        def counting(self, img, _forward=cls.forward, _name=name):
            calls[_name] += 1
            return _forward(self, img)
        monkeypatch.setattr(cls, "forward", counting)
    fast, ref = pair_of_dinos(SMALL, DINO)
    images = torch.rand(4, 3, 32, 32)
    for seed in range(6):
        seed_all(seed)
        ref_loss = ref(images)
        seed_all(seed)
        assert_close(fast(images), ref_loss, atol=1e-5, rtol=1e-5, what=f"default augmentation, seed {seed}")
    assert calls["jitter"] >= 2 and calls["blur"] >= 2, calls


def test_projection_head_fix_and_its_flag():
    """vit-pytorch's head has a GELU after its last hidden Linear (its is_last check is dead code); fastvit's
    has none, as DINO's head. Same parameters, so the checkpoint loads; different outputs."""
    fixed, ref = pair_of_dinos(SMALL, DINO, legacy_projector_gelu=False)
    legacy, _ = pair_of_dinos(SMALL, DINO, legacy_projector_gelu=True)
    heads = [type(m).__name__ for m in fixed.student_encoder.projector.net]
    assert heads == ["Linear", "GELU", "Linear", "GELU", "Linear", "Identity", "L2Norm", "Linear"]
    assert [type(m).__name__ for m in legacy.student_encoder.projector.net][5] == "GELU"
    fixed.load_vit_pytorch_state_dict(ref.state_dict())
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref_proj, ref_embed = ref(images, return_embedding=True)
        fixed_proj, fixed_embed = fixed(images, return_embedding=True)
        legacy_proj, _ = legacy(images, return_embedding=True)
    assert_close(fixed_embed, ref_embed, atol=1e-5, rtol=1e-5, what="embedding")
    assert_close(legacy_proj, ref_proj, atol=1e-5, rtol=1e-5, what="legacy head")
    assert (fixed_proj - ref_proj).abs().max() > 1e-3


def test_single_layer_head_works():
    """vit-pytorch sizes the last Linear for projection_hidden_size and crashes unless it equals the width."""
    with pytest.raises(RuntimeError):
        RefDino(vit_pytorch.ViT(**SMALL), **{**DINO, "projection_layers": 1})
    fast = Dino(ViT(**SMALL), **{**DINO, "projection_layers": 1})
    assert [type(m).__name__ for m in fast.student_encoder.projector.net] == ["L2Norm", "Linear"]
    proj, embed = fast(torch.rand(3, 3, 32, 32), return_embedding=True)
    assert proj.shape == (3, 64) and embed.shape == (3, 32)
    assert_close(proj.norm(dim=-1), torch.ones(3), atol=0, rtol=10, what="finite")  # shape and no NaN
    expected = fast.student_encoder.projector.net[1](embed / embed.norm(dim=1, keepdim=True))
    assert_close(proj, expected, atol=1e-6, rtol=1e-6, what="L2Norm then Linear")


def test_return_embedding_matches_vit_pytorch():
    fast, ref = pair_of_dinos(SMALL, {**DINO, "hidden_layer": "transformer"})
    images = torch.rand(2, 3, 32, 32)
    proj, embed = fast(images, return_embedding=True)
    ref_proj, ref_embed = ref(images, return_embedding=True)
    assert embed.shape == (2, 17 * 32)  # the 1 + 16 tokens, flattened
    assert_close(embed, ref_embed, atol=1e-5, rtol=1e-5, what="embedding")
    assert_close(proj, ref_proj, atol=1e-5, rtol=1e-5, what="projection")
    assert_close(fast(images, return_embedding=True, return_projection=False), ref_embed, atol=1e-5, rtol=1e-5,
                 what="embedding only")


def test_loads_a_vit_pytorch_dino_checkpoint():
    torch.manual_seed(0)
    ref = RefDino(vit_pytorch.ViT(**SMALL), **DINO)
    torch.manual_seed(9)
    fast = Dino(ViT(**SMALL), **DINO, legacy_projector_gelu=True)
    with torch.no_grad():
        ref.teacher_centers.normal_()  # make the centres matter
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    assert_same_state(fast, ref, "loaded")
    train_step_both(fast, ref, torch.rand(4, 3, 32, 32), 4, "loaded checkpoint")


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("teacher_centers"), r"missing keys \(1\): teacher_centers"),
    (lambda sd: sd.pop("teacher_encoder.net.pos_embedding"), r"missing keys \(1\): teacher_encoder.net.pos_embedding"),
    (lambda sd: sd.update({"student_encoder.projector.net.7.weight": torch.zeros(64, 8)}),
     r"student_encoder.projector.net.7.weight: checkpoint \(64, 8\)"),
])
def test_bad_checkpoints_name_the_keys(edit, match):
    state_dict = dict(RefDino(vit_pytorch.ViT(**SMALL), **DINO).state_dict())
    edit(state_dict)
    fast = Dino(ViT(**SMALL), **DINO)
    with pytest.raises(ValueError, match=match):
        fast.load_vit_pytorch_state_dict(state_dict)


def test_teacher_is_a_frozen_copy_and_the_ema_formula():
    fast = Dino(ViT(**SMALL), **{**DINO, "moving_average_decay": 0.75, "center_moving_average_decay": 0.6},
                augment_fn=flip_views, augment_fn2=flip_views)
    student, teacher = fast.student_encoder, fast.teacher_encoder
    assert student.net is fast.net and teacher.net is not fast.net
    assert not any(p.requires_grad for p in teacher.parameters())
    loss = fast(torch.rand(4, 3, 32, 32))
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    old_teacher = [p.clone() for p in teacher.parameters()]
    old_centers, last_centers = fast.teacher_centers.clone(), fast.last_teacher_centers.clone()
    fast.update_moving_average()
    for new, old, current in zip(teacher.parameters(), old_teacher, student.parameters()):
        assert_close(new, 0.75 * old + 0.25 * current, atol=1e-6, rtol=1e-6, what="teacher EMA")
    assert_close(fast.teacher_centers, 0.6 * old_centers + 0.4 * last_centers, atol=1e-7, rtol=1e-6, what="centres")
    fast.reset_moving_average()
    with pytest.raises(RuntimeError, match="teacher encoder has not been created"):
        fast.update_moving_average()
    fast(torch.rand(2, 3, 32, 32))  # a forward copies the student again
    assert all(torch.equal(t, s) for t, s in zip(fast.teacher_encoder.parameters(), student.parameters()))


def test_seed_readme_example_small():
    model = ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64)
    learner = Dino(model, image_size=32, hidden_layer="to_latent", projection_hidden_size=16, projection_layers=4,
                   num_classes_K=64, student_temp=0.9, teacher_temp=0.04, local_upper_crop_scale=0.4,
                   global_lower_crop_scale=0.5, moving_average_decay=0.9, center_moving_average_decay=0.9)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        images = torch.randn(20, 3, 32, 32)
        loss = learner(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
        assert torch.isfinite(loss)
    moved = [not torch.equal(p, s) for p, s in zip(model.parameters(), start)]
    assert sum(moved) == len(moved) - 2  # everything but the unused classifier (mlp_head)
    ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64).load_state_dict(
        model.state_dict())


def test_other_channel_counts_need_their_own_augmentation():
    net = ViT(**SMALL, channels=1)
    with pytest.raises(ValueError, match=r"3-channel images and the net has channels=1"):
        Dino(net, **DINO)
    fast = Dino(net, **DINO, augment_fn=flip_views, augment_fn2=flip_views)
    assert torch.isfinite(fast(torch.rand(2, 1, 32, 32)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_layer="nope"), r"hidden_layer 'nope' is not a module of ViT \(its children: to_patch_embedding"),
    (dict(hidden_layer=7), r"hidden_layer index 7 is out of range: ViT has 5 children"),
    (dict(hidden_layer=1.5), r"hidden_layer must be a module name or a child index, got 1.5"),
    (dict(student_temp=0), r"student_temp must be positive, got 0"),
    (dict(teacher_temp=-0.04), r"teacher_temp must be positive, got -0.04"),
    (dict(moving_average_decay=1.5), r"moving_average_decay must be in \[0, 1\], got 1.5"),
    (dict(center_moving_average_decay=-0.1), r"center_moving_average_decay must be in \[0, 1\], got -0.1"),
    (dict(local_upper_crop_scale=0.01), r"local_upper_crop_scale must be in \[0.05, 1\].*got 0.01"),
    (dict(global_lower_crop_scale=0), r"global_lower_crop_scale must be in \(0, 1\], got 0"),
    (dict(projection_layers=0), r"projection_layers must be a positive int, got 0"),
    (dict(num_classes_K=0), r"num_classes_K must be a positive int, got 0"),
])
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Dino(ViT(**SMALL), **{**DINO, **kwargs})


def test_bad_temperatures_at_call_time_are_value_errors():
    fast = Dino(ViT(**SMALL), **DINO)
    with pytest.raises(ValueError, match=r"teacher_temp must be positive, got 0"):
        fast(torch.rand(2, 3, 32, 32), teacher_temp=0)
