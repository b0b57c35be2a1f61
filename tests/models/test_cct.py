"""CCT: vit-pytorch parity (every positional embedding, eval and seeded training, the factories), the
``mlp_radio`` typo and unknown kwargs, smaller / larger inputs and bad input."""

from __future__ import annotations

import warnings

import helpers
import pytest
import torch
from fastvit.cct import CCT, cct_2
from helpers import assert_close, assert_pair_matches

import fastvit

vit_pytorch = pytest.importorskip("vit_pytorch", reason="needs vit-pytorch (pip install fastvit[dev])")
import vit_pytorch.cct as ref_cct  # noqa: E402

# The seed README CCT config, shrunk (typo included): 64 px through two 7x7/2 convs and pools -> 4 x 4 tokens.
SEED_SMALL = dict(img_size=64, embedding_dim=64, n_conv_layers=2, kernel_size=7, stride=2, padding=3,
                  pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=2, num_heads=4,
                  mlp_radio=3.0, num_classes=10, positional_embedding="learnable")
# A 3x3 tokenizer: 32 px -> 8 x 8 tokens.
SMALL = dict(img_size=32, embedding_dim=32, n_conv_layers=2, kernel_size=3, stride=1, padding=1, num_layers=2,
             num_heads=2, mlp_ratio=2, num_classes=10)


def pair_of_models(ref_factory=ref_cct.CCT, fast_factory=CCT, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mlp_radio
        return helpers.pair_of_models(fast_factory, ref_factory, **kwargs)


def test_seed_config_matches_vit_pytorch_and_mlp_radio_is_ignored_like_there():
    with pytest.warns(UserWarning, match=r"'mlp_radio=3.0' is a typo .* mlp_ratio=4.0") as record:
        CCT(**SEED_SMALL)
    assert record[0].filename == __file__  # points at the caller
    fast, ref = pair_of_models(**SEED_SMALL)
    assert fast.classifier.blocks[0].linear1.out_features == 4 * 64  # mlp_ratio stays 4, as in vit-pytorch
    x = torch.randn(2, 3, 64, 64)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what="cct seed config")


@pytest.mark.parametrize("positional_embedding", ["sine", "learnable", "none"])
def test_matches_vit_pytorch_and_same_seed_init(positional_embedding):
    kwargs = {**SMALL, "positional_embedding": positional_embedding}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, 3, 32, 32)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what=f"cct {positional_embedding}")
    torch.manual_seed(5)
    ref = ref_cct.CCT(**kwargs)
    torch.manual_seed(5)
    fast = CCT(**kwargs)
    assert list(ref.state_dict()) == list(fast.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name  # the sine table too, computed without Python loops
    if positional_embedding == "sine":
        assert not fast.classifier.positional_emb.requires_grad


def test_matches_vit_pytorch_in_training_with_the_same_seed():
    """Attention dropout, projection/MLP dropout and per-sample drop path draw the same random numbers."""
    kwargs = {**SMALL, "num_layers": 3, "dropout_rate": 0.2, "attention_dropout": 0.2,
              "stochastic_depth_rate": 0.5}
    fast, ref = pair_of_models(**kwargs)
    fast.train(), ref.train()
    x = torch.randn(4, 3, 32, 32)
    with fastvit.use_backend("reference"):
        torch.manual_seed(1)
        expected = ref(x)
        torch.manual_seed(1)
        assert_close(fast(x), expected, atol=1e-5, rtol=1e-5, what="cct train")


@pytest.mark.parametrize("factory", ["cct_2", "cct_6"])
def test_factories_match_vit_pytorch(factory):
    fast, ref = pair_of_models(getattr(ref_cct, factory), getattr(fastvit.cct, factory), img_size=32,
                               num_classes=10)
    conv = fast.tokenizer.conv_layers[0][0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    assert_pair_matches(fast, ref, x, atol=1e-5, rtol=1e-5, what=factory)


def test_unknown_kwargs_are_type_errors():
    with pytest.raises(TypeError, match=r"CCT got unexpected keyword argument\(s\): 'mlp_rato', 'num_head'"):
        CCT(**SMALL, mlp_rato=2, num_head=4)
    with pytest.raises(TypeError, match="seq_pool"):
        CCT(**SMALL, seq_pool=False)  # fixed by CCT (a "multiple values" TypeError in vit-pytorch)
    with pytest.raises(TypeError, match="keyword arguments only"):
        cct_2(32)
    with pytest.raises(TypeError, match="multiple values"):
        cct_2(num_layers=3)  # the factories fix their sizes, as in vit-pytorch


def test_no_positions_work_for_any_image_size():
    """vit-pytorch raises AttributeError n_channels on a smaller image; fastvit uses the tokens as is."""
    fast, ref = pair_of_models(**{**SMALL, "positional_embedding": "none"})
    small, large = torch.randn(2, 3, 16, 24), torch.randn(2, 3, 48, 48)
    with pytest.raises(AttributeError, match="n_channels"):
        ref(small)
    with torch.no_grad():
        ref.classifier.sequence_length = 0  # skips vit-pytorch's (broken) zero-padding branch
        expected = ref(small)
        assert_close(fast(small), expected, atol=1e-5, rtol=1e-5, what="smaller, no positions")
        assert_close(fast(large), ref(large), atol=1e-5, rtol=1e-5, what="larger, no positions")


@pytest.mark.parametrize("positional_embedding", ["sine", "learnable"])
def test_smaller_images_take_the_top_left_crop_of_the_position_grid(positional_embedding):
    kwargs = {**SMALL, "positional_embedding": positional_embedding}
    fast, ref = pair_of_models(**kwargs)
    x = torch.randn(2, 3, 16, 24)  # a 4 x 6 token grid out of 8 x 8
    with pytest.raises(RuntimeError):
        ref(x)  # vit-pytorch: a shape error
    # The same model built for the smaller size, given the cropped table, is the expected result.
    cropped = CCT(**{**kwargs, "img_size": (16, 24)}).eval()
    state = fast.state_dict()
    table = state["classifier.positional_emb"].view(1, 8, 8, -1)  # (1, h, w, dim)
    state["classifier.positional_emb"] = table[:, :4, :6].reshape(1, 24, -1)
    cropped.load_state_dict(state)
    with torch.no_grad():
        assert_close(fast(x), cropped(x), atol=1e-6, rtol=1e-6, what="cropped positions")
    with pytest.raises(ValueError, match=r"image size \(40, 32\) does not fit the model: expected at most"):
        fast(torch.randn(1, 3, 40, 32))


def test_tokenizer_sequence_length_matches_vit_pytorch():
    fast, ref = pair_of_models(**{**SEED_SMALL, "img_size": (64, 96)})
    for size in ((64, 96), (33, 47), (224, 224)):
        assert fast.tokenizer.sequence_length(3, *size) == ref.tokenizer.sequence_length(3, *size)
    assert fast.classifier.positional_emb.shape == ref.classifier.positional_emb.shape == (1, 4 * 6, 64)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 1, 32, 32), r"expected 3 channels, got 1"),
        ((1, 3, 8, 8), r"image size \(8, 8\) is too small for the tokenizer \(token grid \(-2, -2\)\)"),
        ((3, 32, 32), r"expected an image batch"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    # Unpadded 7x7 convs: 32 px -> 13 -> 7 -> 1 -> 1 tokens; 8 px cannot go through the second conv.
    with pytest.raises(ValueError, match=match):
        CCT(**{**SMALL, "kernel_size": 7, "padding": 0}, positional_embedding="none")(torch.randn(*shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match="embedding_dim 30 must be divisible by num_heads 4"):
        CCT(**{**SMALL, "embedding_dim": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="positional_embedding must be one of"):
        CCT(**SMALL, positional_embedding="rope")


def test_channels():
    model = CCT(**SMALL, n_input_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_compiles_fullgraph_in_eval():
    torch.manual_seed(0)
    model = CCT(**SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))
