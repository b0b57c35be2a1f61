"""ATS-ViT (adaptive token sampling): parity with vit-pytorch under the same seed, the sampled ids,
batch consistency, padding widths, gradients, bad input; packed kept sets (``packed=True``) against
the padded ones."""

from __future__ import annotations

import helpers
import pytest
import torch
from fastvit.ats_vit import ViT
from helpers import assert_close

import fastvit
import fastvit.layers.attention as attention_layer
from fastvit.attention import KeyPaddingMask
from fastvit.models.ats_vit import UniformStream

vit_pytorch_ats = pytest.importorskip("vit_pytorch.ats_vit",
                                      reason="vit-pytorch is not installed (pip install fastvit[dev])")

# The seed README example, narrow: 256 patches, the README's token budgets (the first layer keeps all).
SEED = dict(image_size=256, patch_size=16, num_classes=1000, dim=32, depth=6,
            max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=2, dim_head=16, mlp_dim=64)
# Budgets that some images fall under after the first layer while others do not (64 patches).
UNEVEN = dict(image_size=64, patch_size=8, num_classes=10, dim=32, depth=4,
              max_tokens_per_depth=(40, 30, 25, 5), heads=2, dim_head=16, mlp_dim=64)
MODES = {"fixed": False, "trimmed": True}


def pair_of_models(trim_padding=None, batch_wide_sampling=False, **kwargs):
    """vit-pytorch's ATS ViT and fastvit's, which alone takes the sampling flags."""
    fast_kwargs = dict(trim_padding=trim_padding, batch_wide_sampling=batch_wide_sampling)
    return helpers.pair_of_models(ViT, vit_pytorch_ats.ViT, fast_kwargs=fast_kwargs, **kwargs)


def run(model, x, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x, return_sampled_token_ids=True)


def assert_same_ids(ids, expected, what):
    """Equal on the common width; the wider one is padded with -1 beyond it."""
    w = min(ids.shape[1], expected.shape[1])
    assert torch.equal(ids[:, :w], expected[:, :w]), f"{what}: ids differ\n{ids}\n{expected}"
    assert (ids[:, w:] == -1).all() and (expected[:, w:] == -1).all(), f"{what}: padding beyond width {w}"


def image(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=g)


@pytest.mark.parametrize("batch_wide_sampling", [False, True], ids=["per_image", "batch_wide"])
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_samples_the_same_tokens_as_vit_pytorch(mode, batch_wide_sampling):
    fast, ref = pair_of_models(**SEED, trim_padding=MODES[mode], batch_wide_sampling=batch_wide_sampling)
    x = image(SEED, 4)
    for seed in range(3):
        logits, ids = run(fast, x, seed)
        ref_logits, ref_ids = run(ref, x, seed)
        assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, what=f"{mode} logits, seed {seed}")
        assert_same_ids(ids, ref_ids, f"{mode}, seed {seed}")
        if mode == "fixed":
            assert ids.shape == (4, 8)  # max_tokens_per_depth[-1]
        else:
            assert ids.shape == ref_ids.shape  # the batch's widest set, as vit-pytorch


@pytest.mark.parametrize("mode", MODES)
def test_batch_wide_sampling_restores_vit_pytorch_where_the_per_image_decision_differs(mode):
    fast, ref = pair_of_models(**UNEVEN, trim_padding=MODES[mode])
    x = image(UNEVEN, 6)
    logits, _ = run(fast, x, 0)
    ref_logits, ref_ids = run(ref, x, 0)
    # After the first layer some images keep <= 30 tokens: fastvit leaves them whole, vit-pytorch
    # resamples them because others keep more.
    assert not torch.allclose(logits, ref_logits, atol=1e-3)
    for layer in fast.transformer.layers:
        layer[0].ats.batch_wide_sampling = True
    logits, ids = run(fast, x, 0)
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, what="batch-wide logits")
    assert_same_ids(ids, ref_ids, "batch-wide")


def test_no_sampling_when_budgets_cover_every_token():
    cfg = dict(SEED, image_size=64, max_tokens_per_depth=(16,) * 6)
    fast, ref = pair_of_models(**cfg)
    x = image(cfg, 3)
    logits, ids = run(fast, x, 0)
    ref_logits, ref_ids = run(ref, x, 0)
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, what="no sampling")
    assert torch.equal(ids, torch.arange(16).expand(3, 16)) and torch.equal(ids, ref_ids)


@pytest.mark.parametrize("mode", MODES)
def test_ids_are_distinct_in_range_ascending_and_padded_with_minus_one(mode):
    cfg = dict(UNEVEN, max_tokens_per_depth=(48, 32, 16, 12))
    torch.manual_seed(0)
    model = ViT(**cfg, trim_padding=MODES[mode]).eval()
    x = image(cfg, 5)
    for seed in range(4):
        _, ids = run(model, x, seed)
        assert ids.dtype == torch.long and ids.shape[0] == 5 and ids.shape[1] <= 12
        valid = ids >= 0
        assert (ids[~valid] == -1).all()
        assert (valid[:, :-1] >= valid[:, 1:]).all(), f"padding must come last:\n{ids}"
        assert valid.sum(1).min() >= 1
        assert ids.max() < 64
        big = torch.where(valid, ids, 10**6)
        ascending = (big[:, 1:] > big[:, :-1])[valid[:, 1:]]
        assert ascending.all(), f"kept ids must be distinct and ascending:\n{ids}"


def test_trimmed_and_fixed_widths_give_the_same_results():
    torch.manual_seed(0)
    fixed = ViT(**UNEVEN, trim_padding=False).eval()
    trimmed = ViT(**UNEVEN, trim_padding=True).eval()
    trimmed.load_state_dict(fixed.state_dict())
    x = image(UNEVEN, 6)
    for seed in range(3):
        logits, ids = run(fixed, x, seed)
        t_logits, t_ids = run(trimmed, x, seed)
        assert_close(t_logits, logits, atol=1e-5, rtol=1e-5, what="trimmed vs fixed")
        assert_same_ids(t_ids, ids, "trimmed vs fixed")
        assert ids.shape[1] == 5 and t_ids.shape[1] <= 5


@pytest.fixture
def batch_independent_noise(monkeypatch):
    """Gumbel noise that depends on (sample, token slot) only, never on the batch: ``take`` returns
    the same ``(k, width)`` numbers for every image."""
    table = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01

    def take(self, b, k, width, widest, draws, like):
        return table[:k, :width].to(like.dtype).expand(b, k, width)

    monkeypatch.setattr(UniformStream, "take", take)


@pytest.mark.parametrize("mode", MODES)
def test_an_image_gets_the_same_tokens_and_logits_alone_or_in_a_batch(mode, batch_independent_noise):
    torch.manual_seed(0)
    model = ViT(**UNEVEN, trim_padding=MODES[mode]).eval()
    x = image(UNEVEN, 6)
    with torch.no_grad():
        logits, ids = model(x, return_sampled_token_ids=True)
        for i in range(6):
            one_logits, one_ids = model(x[i: i + 1], return_sampled_token_ids=True)
            assert_close(one_logits, logits[i: i + 1], atol=1e-5, rtol=1e-5, what=f"image {i} alone")
            assert_same_ids(one_ids, ids[i: i + 1], f"image {i} alone")
        # vit-pytorch's batch-wide decision makes some image depend on its batch-mates.
        for layer in model.transformer.layers:
            layer[0].ats.batch_wide_sampling = True
        logits = model(x)
        alone = torch.cat([model(x[i: i + 1]) for i in range(6)])
    assert not torch.allclose(alone, logits, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_attention_uses_cls_probs_from_attend_and_masks_padding(mode, monkeypatch):
    calls = []
    real = attention_layer.attend

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention_layer, "attend", spy)
    torch.manual_seed(0)
    model = ViT(**UNEVEN, trim_padding=MODES[mode]).eval()
    with torch.no_grad():
        model.forward_features(image(UNEVEN, 3))
    assert not any(kw.get("return_probs") for _, _, kw in calls), "the model must never ask for full maps"
    cls_calls = [(nq, nk) for nq, nk, kw in calls if kw.get("return_cls_probs")]
    assert cls_calls and all(nq == 1 for nq, _ in cls_calls), "CLS probs must come from one-query calls"
    masked = [kw["bias"] for _, _, kw in calls if isinstance(kw.get("bias"), KeyPaddingMask)]
    assert len(masked) == len(calls) - 2  # every call after the first sampling layer masks padding


def test_logits_path_matches_forward_features_and_head():
    torch.manual_seed(0)
    model = ViT(**SEED).eval()
    x = image(SEED, 2)
    logits, ids = run(model, x, 3)
    torch.manual_seed(3)
    with torch.no_grad():
        tokens, token_ids = model.forward_tokens(x)
    assert tokens.shape[:2] == (2, token_ids.shape[1] + 1)
    assert torch.equal(token_ids, ids)
    assert_close(model.forward_head(tokens), logits, atol=1e-5, rtol=1e-5, what="head(features)")


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_vit_pytorch(mode):
    fast, ref = pair_of_models(**UNEVEN, trim_padding=MODES[mode], batch_wide_sampling=True)
    x = image(UNEVEN, 3)
    for model, seed in ((fast, 0), (ref, 0)):
        torch.manual_seed(seed)
        model(x).pow(2).mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, what=f"grad {name}")


def test_training_with_dropout_runs_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = ViT(**UNEVEN, dropout=0.1, emb_dropout=0.1).train()
    logits, ids = model(image(UNEVEN, 4), return_sampled_token_ids=True)
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing and torch.isfinite(logits).all() and (ids < 64).all()


def test_smaller_images_use_the_2d_grid_crop_and_legacy_flag_restores_vit_pytorch():
    cfg = dict(SEED, image_size=64, patch_size=16, max_tokens_per_depth=(16, 16, 8, 8, 4, 4))
    fast, ref = pair_of_models(**cfg)
    x = image(cfg, 2)[..., :32]  # a 4 x 2 grid out of the 4 x 4 table
    logits, _ = run(fast, x, 0)
    assert not torch.allclose(logits, run(ref, x, 0)[0], atol=1e-3)
    fast.legacy_pos_slicing = True
    logits, ids = run(fast, x, 0)
    ref_logits, ref_ids = run(ref, x, 0)
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, what="legacy slicing")
    assert_same_ids(ids, ref_ids, "legacy slicing")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_tokens_per_depth=(40, 30, 25)), r"one entry per layer \(depth=4\), got 3"),
        (dict(max_tokens_per_depth=(40, 30, 35, 5)), r"non-increasing, got \(40, 30, 35, 5\)"),
        (dict(max_tokens_per_depth=(40, 30, 25, 0)), r"at least 1 token at every layer"),
        (dict(image_size=60), r"image size \(60, 60\) must be divisible by the patch size \(8, 8\)"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViT(**{**UNEVEN, **kwargs})


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 60, 64), r"image size \(60, 64\) is not divisible by the patch size \(8, 8\)"),
        ((1, 3, 72, 64), r"image size \(72, 64\) does not fit the model: expected at most \(64, 64\)"),
        ((1, 1, 64, 64), r"expected 3 channels, got 1"),
        ((3, 64, 64), r"expected an image batch \(b, c, h, w\)"),
    ],
)
def test_bad_images_are_value_errors(shape, match):
    model = ViT(**UNEVEN)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_fixed_widths_compile_fullgraph():
    """Fixed widths have no data-dependent shape and no host read (auto mode picks them under compile)."""
    torch.manual_seed(0)
    model = ViT(**UNEVEN).eval()
    eager = ViT(**UNEVEN, trim_padding=False).eval()
    eager.load_state_dict(model.state_dict())
    x = image(UNEVEN, 3)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    logits, ids = run(compiled, x, 0)
    eager_logits, eager_ids = run(eager, x, 0)
    assert ids.shape == (3, 5)
    assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5, what="compiled")
    assert torch.equal(ids, eager_ids)


def test_seed_readme_example_shrunk():
    v = ViT(image_size=256, patch_size=16, num_classes=1000, dim=64, depth=6,
            max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=4, mlp_dim=128,
            dropout=0.1, emb_dropout=0.1)
    img = torch.randn(4, 3, 256, 256)
    preds = v(img)
    assert preds.shape == (4, 1000)
    preds, token_ids = v(img, return_sampled_token_ids=True)
    assert preds.shape == (4, 1000) and token_ids.shape[0] == 4 and token_ids.shape[1] <= 8
    assert token_ids.min() >= -1 and token_ids.max() < 256


# -- packed kept sets (packed=True) ---------------------------------------------------------------------

def padded_and_packed(cfg, **kwargs):
    """The same weights twice: kept sets padded and masked (the default) and packed, both in eval."""
    torch.manual_seed(0)
    padded = ViT(**cfg, **kwargs).eval()
    packed = ViT(**cfg, **kwargs, packed=True).eval()
    packed.load_state_dict(padded.state_dict())
    return padded, packed


def run_tokens(model, x, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.forward_tokens(x)


@pytest.mark.parametrize("batch_wide_sampling", [False, True], ids=["per_image", "batch_wide"])
@pytest.mark.parametrize("cfg, batch", [(UNEVEN, 1), (UNEVEN, 3), (UNEVEN, 6), (SEED, 4)],
                         ids=["uneven-B1", "uneven-B3", "uneven-B6", "seed-B4"])
def test_packed_kept_sets_give_the_padded_logits_ids_and_tokens(cfg, batch, batch_wide_sampling):
    padded, packed = padded_and_packed(cfg, batch_wide_sampling=batch_wide_sampling)
    x = image(cfg, batch)
    counts = set()
    for seed in range(3):
        logits, ids = run(padded, x, seed)
        p_logits, p_ids = run(packed, x, seed)
        assert_close(p_logits, logits, atol=1e-5, rtol=1e-5, what=f"packed vs padded logits, seed {seed}")
        assert torch.equal(p_ids, ids), f"seed {seed}: packed ids\n{p_ids}\npadded ids\n{ids}"
        counts |= set((ids >= 0).sum(dim=1).tolist())
        (tokens, token_ids), (p_tokens, p_token_ids) = (run_tokens(m, x, seed) for m in (padded, packed))
        assert torch.equal(p_token_ids, token_ids)
        real = torch.cat([torch.ones_like(token_ids[:, :1], dtype=torch.bool), token_ids >= 0], dim=1)
        assert_close(p_tokens[real], tokens[real], atol=1e-5, rtol=1e-5, what=f"kept tokens, seed {seed}")
        assert (p_tokens[~real] == 0).all(), "padding slots of the packed path's tokens are zeros"
    if batch > 1 and cfg is UNEVEN:
        assert len(counts) > 1, f"the batch should keep different counts per image, kept {counts}"


def test_packed_backward_runs_with_finite_gradients_equal_to_the_padded_ones():
    padded, packed = padded_and_packed(UNEVEN)
    x = image(UNEVEN, 5)
    for model in (padded, packed):
        torch.manual_seed(0)
        model(x).pow(2).mean().backward()
    for (name, p), q in zip(padded.named_parameters(), packed.parameters()):
        assert q.grad is not None and torch.isfinite(q.grad).all(), f"{name}: no finite gradient"
        assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, what=f"packed grad of {name}")
    checkpointed = ViT(**UNEVEN, packed=True).eval()
    checkpointed.load_state_dict(packed.state_dict())
    checkpointed.set_grad_checkpointing(True)
    torch.manual_seed(0)
    checkpointed(x).pow(2).mean().backward()
    for (name, p), q in zip(packed.named_parameters(), checkpointed.parameters()):
        assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, what=f"checkpointed packed grad of {name}")


def test_packed_gives_the_same_result_under_reference_and_default_dispatch():
    _, packed = padded_and_packed(UNEVEN)
    x = image(UNEVEN, 4)
    with fastvit.use_backend("reference"):
        ref_logits, ref_ids = run(packed, x, 0)
    logits, ids = run(packed, x, 0)
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, what="packed under auto vs reference")
    assert torch.equal(ids, ref_ids)


def test_packed_calls_attend_packed_and_never_masks(monkeypatch):
    calls = []
    real = attention_layer.attend

    def spy(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention_layer, "attend", spy)
    _, packed = padded_and_packed(UNEVEN)
    with torch.no_grad():
        packed.forward_features(image(UNEVEN, 3))
    assert not any(kw.get("bias") is not None or kw.get("return_probs") for _, _, kw in calls)
    # The first layer samples from the (3, 65) batch: its CLS call is the first packed one.
    layouts = [kw.get("packed") for _, _, kw in calls]
    assert layouts[0] is not None and all(p is not None for p in layouts)
    for q_shape, k_shape, kw in calls:
        assert q_shape[0] == 1 and q_shape[2] == kw["packed"].total and k_shape[2] == kw["packed"].kv_total
        if kw.get("return_cls_probs"):  # one query per image, over its own keys
            assert kw["packed"].lengths == (1, 1, 1)
    assert len({kw["packed"].kv_lengths for _, _, kw in calls}) > 2, "later layers see the kept counts"


def test_packed_refuses_fixed_widths():
    with pytest.raises(ValueError, match="trim_padding=False"):
        ViT(**UNEVEN, packed=True, trim_padding=False)
