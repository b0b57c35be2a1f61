"""CaiT: vit-pytorch parity, the two bug fixes and their restoring flags (layer dropout in eval,
LayerScale init), talking heads / class attention dispatch, channels, sizes, bad input."""

from __future__ import annotations

import random
from functools import partial

import helpers
import pytest
import torch
from fastvit.cait import CaiT
from helpers import assert_close, assert_pair_matches

import fastvit
from fastvit import Recorder

vit_pytorch = pytest.importorskip("vit_pytorch", reason="needs vit-pytorch (pip install fastvit[dev])")
from vit_pytorch.cait import CaiT as RefCaiT  # noqa: E402

# The seed README config, shrunk (it keeps layer_dropout = 0.05).
SEED_SMALL = dict(image_size=64, patch_size=16, num_classes=10, dim=64, depth=3, cls_depth=2, heads=4,
                  dim_head=16, mlp_dim=128, dropout=0.1, emb_dropout=0.1, layer_dropout=0.05)
NO_DROP = {**SEED_SMALL, "layer_dropout": 0.0}


pair_of_models = partial(helpers.pair_of_models, CaiT, RefCaiT)


def test_matches_vit_pytorch_in_eval():
    fast, ref = pair_of_models(**NO_DROP)
    x = torch.randn(2, 3, 64, 64)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what="cait")


def test_layer_dropout_is_off_in_eval_and_the_flag_restores_vit_pytorch():
    fast, ref = pair_of_models(**{**SEED_SMALL, "layer_dropout": 0.5})
    _, ref_no_drop = pair_of_models(**NO_DROP)  # same seed: the same weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # fastvit: deterministic eval, every block runs.
        assert_close(fast(x), ref_no_drop(x), atol=1e-5, rtol=1e-5, what="eval runs every block")
        assert torch.equal(fast(x), fast(x))
        # vit-pytorch drops blocks in eval; with the flag fastvit makes the same random draws.
        fast.patch_transformer.layer_dropout_in_eval = fast.cls_transformer.layer_dropout_in_eval = True
        outs = []
        for seed in range(4):
            torch.manual_seed(seed), random.seed(seed)
            expected = ref(x)
            torch.manual_seed(seed), random.seed(seed)
            actual = fast(x)
            assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=f"eval layer dropout, seed {seed}")
            outs.append(actual)
        assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # it really is random
    built = CaiT(**{**SEED_SMALL, "layer_dropout": 0.5}, layer_dropout_in_eval=True)
    assert built.patch_transformer.layer_dropout_in_eval and built.cls_transformer.layer_dropout_in_eval


def test_matches_vit_pytorch_in_training_with_the_same_seed():
    fast, ref = pair_of_models(**{**SEED_SMALL, "layer_dropout": 0.3, "dropout": 0.2})
    fast.train(), ref.train()
    x = torch.randn(2, 3, 64, 64)
    with fastvit.use_backend("reference"):
        for seed in range(3):
            torch.manual_seed(seed), random.seed(seed)
            expected = ref(x)
            torch.manual_seed(seed), random.seed(seed)
            assert_close(fast(x), expected, atol=1e-5, rtol=1e-5, what=f"train, seed {seed}")


def test_layerscale_init_follows_the_total_depth_and_the_flag_restores_vit_pytorch():
    kwargs = dict(image_size=16, patch_size=8, num_classes=2, dim=8, depth=24, cls_depth=2, heads=2,
                  dim_head=4, mlp_dim=8)
    model = CaiT(**kwargs)
    for stage in (model.patch_transformer, model.cls_transformer):
        for block in stage.layers:
            for layer_scale in block:
                assert torch.all(layer_scale.scale == 1e-5)  # the paper: depth 24 -> 1e-5
    assert torch.all(CaiT(**{**kwargs, "depth": 12}).patch_transformer.layers[0][0].scale == 0.1)
    assert torch.all(CaiT(**{**kwargs, "depth": 36}).cls_transformer.layers[1][1].scale == 1e-6)

    torch.manual_seed(0)
    ref = RefCaiT(**kwargs)
    torch.manual_seed(0)
    legacy = CaiT(**kwargs, layerscale_init_by_index=True)
    assert list(ref.state_dict()) == list(legacy.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), legacy.state_dict().values()):
        assert torch.equal(a, b), name  # same seed, same init, vit-pytorch's eps per block index
    assert legacy.patch_transformer.layers[0][0].scale[0, 0, 0] == 0.1
    assert legacy.patch_transformer.layers[23][0].scale[0, 0, 0] == 1e-5


def test_talking_heads_are_declared_as_head_mixing_and_class_attention_has_one_query():
    model = CaiT(**NO_DROP).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), fastvit.use_backend("sdpa"), pytest.raises(ValueError, match="head mixing"):
        model(x)
    with torch.no_grad():
        _, maps = Recorder(model)(x)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 16, 16)] * 3 + [(2, 4, 1, 17)] * 2


def test_channels_and_non_square_sizes():
    model = CaiT(**{**NO_DROP, "image_size": (32, 64), "patch_size": (16, 8)}, channels=1).eval()
    assert model.pos_embedding.shape == (1, 2 * 8, 64)
    assert model(torch.randn(2, 1, 32, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="expected 1 channels, got 3"):
        model(torch.randn(2, 3, 32, 64))


def test_smaller_inputs_use_the_2d_grid_crop_and_legacy_flag_restores_vit_pytorch():
    fast, ref = pair_of_models(**NO_DROP)
    x = torch.randn(1, 3, 32, 48)  # a 2 x 3 grid out of the 4 x 4 table
    with torch.no_grad():
        pos = fast.position_embedding(2, 3)
        assert torch.equal(pos[0], fast.pos_embedding[0].view(4, 4, -1)[:2, :3].reshape(6, -1))
        fast.legacy_pos_slicing = True
        y = torch.randn(1, 3, 32, 32)  # vit-pytorch only takes square images
        assert_close(fast(y), ref(y), atol=1e-5, rtol=1e-5, what="legacy slicing")
        fast.legacy_pos_slicing = False
        assert not torch.allclose(fast(y), ref(y), atol=1e-3)
        assert fast(x).shape == (1, 10)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 64, 60), r"image size \(64, 60\) is not divisible by the patch size \(16, 16\)"),
        ((1, 3, 64, 80), r"image size \(64, 80\) does not fit the model: expected at most \(64, 64\)"),
        ((1, 1, 64, 64), r"expected 3 channels, got 1"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        CaiT(**NO_DROP)(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match="layer_dropout must be in"):
        CaiT(**{**NO_DROP, "layer_dropout": 1.0})
    with pytest.raises(ValueError, match="must be divisible by the patch size"):
        CaiT(**{**NO_DROP, "image_size": 60})


def test_compiles_fullgraph_in_eval():
    torch.manual_seed(0)
    model = CaiT(**{**NO_DROP, "depth": 1, "cls_depth": 1}).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))
