"""ViT, SimpleViT, the pluggable ViT, distillation and Recorder: behaviour beyond the generic tests."""

from __future__ import annotations

import pytest
import torch
from fastvit.distill import DistillableViT, DistillWrapper
from fastvit.efficient import ViT as EfficientViT
from helpers import assert_close, assert_pair_matches, pair_of_models
from torch import nn

import fastvit
from fastvit import Recorder, ViT
from fastvit.layers import Transformer

vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed (pip install fastvit[dev])")

SMALL = dict(num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)


@pytest.mark.parametrize("image_size,patch_size", [((32, 48), (8, 16)), (48, (16, 8)), ((64, 32), 16)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_non_square_images_and_patches_match_vit_pytorch(image_size, patch_size, pool):
    fast, ref = pair_of_models(ViT, vit_pytorch.ViT, image_size=image_size, patch_size=patch_size, pool=pool, **SMALL)
    h, w = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    x = torch.randn(2, 3, h, w)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what="vit non-square")


def test_legacy_num_classes_zero_returns_normed_tokens_like_vit_pytorch():
    """By default num_classes=0 gives the pooled features (tests/test_timm_surface.py); the flag keeps
    vit-pytorch's headless ViT, which returns the tokens."""
    fast, ref = pair_of_models(ViT, vit_pytorch.ViT, image_size=32, patch_size=8,
                               fast_kwargs={"legacy_num_classes_zero": True}, **{**SMALL, "num_classes": 0})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fast(x)
        assert out.shape == (2, 17, 32)
        assert_close(out, ref(x), atol=1e-5, rtol=1e-5, what="tokens")


def test_smaller_inputs_use_the_2d_grid_crop_and_legacy_flag_restores_vit_pytorch():
    kwargs = dict(image_size=64, patch_size=16, **SMALL)
    fast, ref = pair_of_models(ViT, vit_pytorch.ViT, **kwargs)
    x = torch.randn(1, 3, 64, 32)  # a 4 x 2 grid out of the 4 x 4 table
    with torch.no_grad():
        pos = fast.position_embedding(4, 2)
        table = fast.pos_embedding[1:].view(4, 4, -1)
        assert torch.equal(pos[1:], table[:, :2].reshape(8, -1))  # token (r, c) gets grid cell (r, c)
        assert torch.equal(pos[0], fast.pos_embedding[0])
        out = fast(x)
        assert not torch.allclose(out, ref(x), atol=1e-3)  # vit-pytorch slices the flat table instead
        fast.legacy_pos_slicing = True
        assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5, what="legacy slicing")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 30, 32), r"image size \(30, 32\) is not divisible by the patch size \(8, 8\)"),
        ((1, 3, 40, 32), r"image size \(40, 32\) does not fit the model: expected at most \(32, 32\)"),
        ((1, 1, 32, 32), r"expected 3 channels, got 1"),
        ((3, 32, 32), r"expected an image batch \(b, c, h, w\)"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    model = ViT(image_size=32, patch_size=8, **SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"image size \(30, 30\) must be divisible by the patch size \(8, 8\)"):
        ViT(image_size=30, patch_size=8, **SMALL)
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean', got 'max'"):
        ViT(image_size=32, patch_size=8, pool="max", **SMALL)


def test_checkpoint_mismatch_names_the_keys():
    model = ViT(image_size=32, patch_size=8, **SMALL)
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["mlp_head.bias"]
    sd["transformer.norm.weight"] = torch.zeros(7)
    with pytest.raises(ValueError) as e:
        model.load_vit_pytorch_state_dict(sd)
    msg = str(e.value)
    assert "missing keys (1): mlp_head.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "transformer.norm.weight: checkpoint (7,) vs model (32,)" in msg


def test_pre_1_16_three_dimensional_cls_and_pos_layout_loads():
    fast, ref = pair_of_models(ViT, vit_pytorch.ViT, image_size=32, patch_size=8, **SMALL)
    sd = ref.state_dict()
    sd["cls_token"] = sd["cls_token"][None]  # (1, 1, dim) as vit-pytorch < 1.16 saved it
    sd["pos_embedding"] = sd["pos_embedding"][None]
    model = ViT(image_size=32, patch_size=8, **SMALL).eval()
    model.load_vit_pytorch_state_dict({"state_dict": sd})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5, what="3-D layout")


def test_recorder_matches_vit_pytorch_and_ejects():
    kwargs = dict(image_size=32, patch_size=8, **SMALL)
    fast, ref = pair_of_models(ViT, vit_pytorch.ViT, **kwargs)
    from vit_pytorch.recorder import Recorder as RefRecorder

    x = torch.randn(2, 3, 32, 32)
    rec, rec_ref = Recorder(fast), RefRecorder(ref)
    with torch.no_grad():
        preds, attns = rec(x)
        preds_ref, attns_ref = rec_ref(x)
    assert attns.shape == (2, 2, 2, 17, 17)
    assert_close(attns, attns_ref, atol=1e-5, rtol=1e-5, what="recorded attention")
    assert_close(preds, preds_ref, atol=1e-5, rtol=1e-5, what="preds")
    model = rec.eject()
    assert model is fast
    assert all(not m.record_attention for m in model.modules() if hasattr(m, "record_attention"))
    with pytest.raises(RuntimeError, match="ejected"):
        rec(x)


def test_recorder_works_under_a_backend_that_cannot_record():
    model = ViT(image_size=32, patch_size=8, **SMALL).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fastvit.use_backend("sdpa", strict=False):
        _, attns = Recorder(model)(x)
    assert attns.shape == (1, 2, 2, 17, 17)
    assert torch.allclose(attns.sum(-1), torch.ones(1, 2, 2, 17), atol=1e-5)


def test_distillation_wrapper_and_to_vit():
    torch.manual_seed(0)
    student = DistillableViT(image_size=32, patch_size=8, **SMALL)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for hard in (False, True):
        distiller = DistillWrapper(student=student, teacher=teacher, temperature=3, alpha=0.5, hard=hard)
        loss = distiller(x, labels)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert distiller.distillation_token.grad is not None
    v = student.eval().to_vit()
    assert type(v) is ViT
    with torch.no_grad():
        assert torch.equal(v(x), student(x))


def test_distillation_matches_vit_pytorch_loss():
    from vit_pytorch.distill import DistillableViT as RefDistillable
    from vit_pytorch.distill import DistillWrapper as RefWrapper

    kwargs = dict(image_size=32, patch_size=8, **SMALL)
    torch.manual_seed(0)
    ref_student = RefDistillable(**kwargs).eval()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    ref = RefWrapper(student=ref_student, teacher=teacher, temperature=2.0, alpha=0.3)
    student = DistillableViT(**kwargs).eval()
    student.load_vit_pytorch_state_dict(ref_student.state_dict())
    fast = DistillWrapper(student=student, teacher=teacher, temperature=2.0, alpha=0.3)
    fast.load_state_dict(ref.state_dict())
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    assert_close(fast(x, labels), ref(x, labels), atol=1e-5, rtol=1e-5, what="distill loss")


def test_distill_wrapper_rejects_plain_models():
    with pytest.raises(ValueError, match="student must be a Distillable model"):
        DistillWrapper(student=ViT(image_size=32, patch_size=8, **SMALL), teacher=nn.Identity())


def test_pluggable_transformer_matches_vit_pytorch_efficient():
    from vit_pytorch.efficient import ViT as RefEfficient

    torch.manual_seed(0)
    ref = RefEfficient(image_size=32, patch_size=8, num_classes=10, dim=32,
                       transformer=vit_pytorch.vit.Transformer(32, 2, 2, 16, 64)).eval()
    fast = EfficientViT(image_size=32, patch_size=8, num_classes=10, dim=32,
                        transformer=Transformer(32, 2, 2, 16, 64)).eval()
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what="efficient")


def test_pluggable_transformer_accepts_any_module_and_rejects_non_modules():
    v = EfficientViT(image_size=(32, 48), patch_size=(8, 16), num_classes=5, dim=16, transformer=nn.Identity())
    assert v(torch.randn(2, 3, 32, 48)).shape == (2, 5)
    with pytest.raises(ValueError, match="transformer must be an nn.Module"):
        EfficientViT(image_size=32, patch_size=8, num_classes=5, dim=16, transformer=None)


def test_simple_vit_matches_vit_pytorch():
    from vit_pytorch.simple_vit import SimpleViT as RefSimple

    kwargs = dict(image_size=(32, 48), patch_size=(8, 16), num_classes=10, dim=32, depth=2, heads=2, dim_head=16,
                  mlp_dim=64)
    fast, ref = pair_of_models(fastvit.SimpleViT, RefSimple, **kwargs)
    x = torch.randn(2, 3, 32, 48)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what="simple vit")
