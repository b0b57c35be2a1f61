"""T2T-ViT: vit-pytorch parity (default soft splits, pluggable transformer), the big single-head stage
attention, non-square and smaller images, bad input, the distillable T2T / pluggable ViT."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
from fastvit.distill import DistillableEfficientViT, DistillableT2TViT
from fastvit.t2t import T2TViT
from helpers import assert_close, assert_matches_vit_pytorch, assert_pair_matches
from torch import nn

import fastvit
from fastvit.attention import explain_call
from fastvit.layers import Transformer
from fastvit.models.efficient import ViT as EfficientViT
from fastvit.ssl.distill import DistillWrapper

vit_pytorch = pytest.importorskip("vit_pytorch", reason="needs vit-pytorch (pip install fastvit[dev])")
from vit_pytorch.t2t import T2TViT as RefT2TViT  # noqa: E402

# The seed README config, shrunk to 64 px (default soft splits: 16 x 16 tokens of 147, 8 x 8 of 1323,
# 4 x 4 of 11907 projected to dim).
SEED_SMALL = dict(dim=64, image_size=64, depth=2, heads=4, dim_head=16, mlp_dim=64, num_classes=10,
                  t2t_layers=((7, 4), (3, 2), (3, 2)))
TINY = dict(image_size=32, num_classes=10, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64,
            t2t_layers=((3, 2), (3, 2)))


pair_of_models = partial(helpers.pair_of_models, T2TViT, RefT2TViT)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_matches_vit_pytorch_with_the_default_soft_splits(pool):
    assert_matches_vit_pytorch(pair_of_models, (2, 3, 64, 64), what=f"t2t pool={pool}", **SEED_SMALL, pool=pool)


def test_stage_attention_is_single_head_with_a_big_head_dim_and_runs_on_every_cpu_backend():
    model = T2TViT(**SEED_SMALL).eval()
    stage1, stage2 = model.to_patch_embedding[3], model.to_patch_embedding[7]
    assert stage1.layers[0][0].to_qkv.out_features == 3 * 147
    assert stage2.layers[0][0].to_qkv.out_features == 3 * 1323
    assert isinstance(stage2.layers[0][0].to_out, nn.Identity)  # heads == 1 and dim_head == dim
    # Backends with a head-dim limit refuse with a reason (dispatch then falls back); nothing in the model.
    q = torch.randn(1, 1, 64, 1323)
    for name, reasons in explain_call(q, q, q).items():
        limit = fastvit.attention.get_backend(name).max_head_dim
        if limit is not None and limit < 1323 and fastvit.attention.get_backend(name).availability()[0]:
            assert any("head_dim=1323" in r for r in reasons), (name, reasons)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with fastvit.use_backend("reference"):
            expected = model(x)
        with fastvit.use_backend("sdpa"):
            assert_close(model(x), expected, atol=1e-4, rtol=1e-4, what="sdpa")


def test_pluggable_transformer_matches_vit_pytorch():
    kwargs = {k: v for k, v in TINY.items() if k not in ("depth", "heads", "dim_head", "mlp_dim")}
    torch.manual_seed(0)
    ref = RefT2TViT(**kwargs, transformer=vit_pytorch.vit.Transformer(32, 2, 2, 16, 64)).eval()
    fast = T2TViT(**kwargs, transformer=Transformer(32, 2, 2, 16, 64)).eval()
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what="pluggable")
    assert T2TViT(**kwargs, transformer=nn.Identity())(x).shape == (2, 10)


def test_non_square_images_track_the_token_grid():
    model = T2TViT(**{**TINY, "image_size": (32, 48)}).eval()
    assert model.grid == (8, 12)
    assert model.pos_embedding.shape == (1, 8 * 12 + 1, 32)
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 10)


def test_smaller_inputs_use_the_2d_grid_crop_and_legacy_flag_restores_vit_pytorch():
    fast, ref = pair_of_models(**TINY)
    x = torch.randn(1, 3, 16, 16)  # a 4 x 4 grid out of the 8 x 8 table
    with torch.no_grad():
        pos = fast.position_embedding(4, 4)
        assert torch.equal(pos[0, 1:], fast.pos_embedding[0, 1:].view(8, 8, -1)[:4, :4].reshape(16, -1))
        assert not torch.allclose(fast(x), ref(x), atol=1e-3)
        fast.legacy_pos_slicing = True
        assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5, what="legacy slicing")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 40, 32), r"image size \(40, 32\) does not fit the model: expected at most \(32, 32\)"),
        ((1, 1, 32, 32), r"expected 3 channels, got 1"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        T2TViT(**TINY)(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match="depth, mlp_dim must be given when no transformer= is passed"):
        T2TViT(image_size=32, num_classes=10, dim=32, heads=2)
    with pytest.raises(ValueError, match="transformer must be an nn.Module"):
        T2TViT(image_size=32, num_classes=10, dim=32, transformer=lambda x: x)
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        T2TViT(**TINY, pool="max")
    with pytest.raises(ValueError, match=r"image size \(2, 2\) is too small for t2t_layers"):
        T2TViT(**{**SEED_SMALL, "image_size": 2})
    with pytest.raises(ValueError, match=r"image size \(2, 2\) is too small for t2t_layers"):
        T2TViT(**SEED_SMALL)(torch.randn(1, 3, 2, 2))


def test_channels():
    model = T2TViT(**TINY, channels=1)
    assert model.to_patch_embedding[-1].in_features == 1 * 9 * 9
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# --- distillable T2T and pluggable ViT (broken in vit-pytorch 1.26.11 with an EinopsError) ---

def _teacher():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def _students():
    yield DistillableT2TViT(**TINY, emb_dropout=0.1)
    yield DistillableEfficientViT(image_size=32, patch_size=8, num_classes=10, dim=32,
                                  transformer=Transformer(32, 1, 2, 16, 64))


@pytest.mark.parametrize("student", list(_students()), ids=["t2t", "efficient"])
def test_distillable_variants_train_with_the_wrapper_and_convert_back(student):
    torch.manual_seed(0)
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for hard in (False, True):
        distiller = DistillWrapper(student=student, teacher=_teacher(), temperature=3, alpha=0.5, hard=hard)
        loss = distiller(x, labels)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert distiller.distillation_token.grad is not None
    student.eval()
    logits, distill_out = student(x, distill_token=torch.randn(1, 32))
    assert logits.shape == (2, 10) and distill_out.shape == (2, 32)
    plain = student.to_vit().eval()
    assert type(plain) is (T2TViT if isinstance(student, T2TViT) else EfficientViT)
    with torch.no_grad():
        assert torch.equal(plain(x), student(x))
    if isinstance(student, EfficientViT):
        assert plain.transformer is not student.transformer  # an independent copy


@pytest.mark.parametrize("kind", ["t2t", "efficient"])
def test_distill_token_path_matches_vit_pytorch_mixin_semantics(kind):
    """vit-pytorch's mixin fails on these models' 3-D cls_token; given a 2-D one it runs, which gives
    the reference for the distillation path (token appended after the positions, pooling ignores it)."""
    from vit_pytorch.distill import DistillableEfficientViT as RefEff
    from vit_pytorch.distill import DistillableT2TViT as RefT2T

    torch.manual_seed(0)
    if kind == "t2t":
        ref = RefT2T(**TINY).eval()
        fast = DistillableT2TViT(**TINY).eval()
    else:
        ref = RefEff(image_size=32, patch_size=8, num_classes=10, dim=32,
                     transformer=vit_pytorch.vit.Transformer(32, 1, 2, 16, 64)).eval()
        fast = DistillableEfficientViT(image_size=32, patch_size=8, num_classes=10, dim=32,
                                       transformer=Transformer(32, 1, 2, 16, 64)).eval()
    fast.load_vit_pytorch_state_dict(ref.state_dict())
    ref.cls_token = nn.Parameter(ref.cls_token.data[0])  # (1, dim): what the 1.26.11 mixin expects
    x, token = torch.randn(2, 3, 32, 32), torch.randn(1, 32)
    with torch.no_grad():
        expected, expected_distill = ref(x, distill_token=token)
        actual, actual_distill = fast(x, distill_token=token)
        assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=f"{kind} logits")
        assert_close(actual_distill, expected_distill, atol=1e-5, rtol=1e-5, what=f"{kind} distill token")


def test_compiles_fullgraph_in_eval():
    torch.manual_seed(0)
    model = T2TViT(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))
