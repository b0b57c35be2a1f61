"""timm's model surface on every registered model (built with its small test_overrides, like
tests/test_models.py): forward_head / pre_logits, get_classifier, reset_classifier, num_classes=0
(and legacy_num_classes_zero against vit-pytorch), gradient checkpointing, forward_intermediates,
features_only, pretrained_cfg through timm's resolve_data_config, and the input dtype rule. A model
whose blocks cannot give timm's intermediates (NaViT: packed images of several sizes) declares why in
``intermediates_unsupported``, and ``forward_intermediates`` must refuse with that reason.

The surface is code per architecture, not per preset: presets of one model file with the same
test_overrides (``vit_tiny`` and ``vit_base``, the ``cct_N`` factories) are tested once, under the first
registered name."""

from __future__ import annotations

import copy
import importlib.util
import math
import re

import pytest
import torch
from helpers import assert_close
from torch import nn

import fastvit
from fastvit.models import get_model_entry
from fastvit.models.registry import model_entries

HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_VIT_PYTORCH = importlib.util.find_spec("vit_pytorch") is not None
HIERARCHICAL = ("cvt", "pit", "levit", "twins_svt", "nest", "crossformer", "regionvit", "mobilevit")


def _distinct_models() -> list:
    seen, names = set(), []
    for entry in model_entries():
        key = (entry.constructor.__module__, repr(sorted(entry.test_overrides.items())))
        if key not in seen:
            seen.add(key)
            names.append(entry.name)
    return names


MODELS = _distinct_models()
HIERARCHICAL_MODELS = [n for n in MODELS if n.startswith(HIERARCHICAL)]


def build(name: str, seed: int = 0, **extra):
    entry = get_model_entry(name)
    torch.manual_seed(seed)
    return entry, fastvit.create_model(name, **{**entry.test_overrides, **extra}).eval()


def example(entry, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, *entry.test_input(), generator=torch.Generator().manual_seed(0))


def first(out):
    """Logits of a model with extra outputs (LeViT's distillation head) come first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def heads(model) -> tuple:
    cls = model.get_classifier()
    return cls if isinstance(cls, tuple) else (cls,)


def check_maps(maps, info, image_hw, what):
    """Each map has its entry's channels and a side within one token of ``image side / reduction``."""
    assert len(maps) == len(info), f"{what}: {len(maps)} maps for {len(info)} feature_info entries"
    for i, (m, entry) in enumerate(zip(maps, info)):
        assert m.dim() == 4 and m.shape[1] == entry["num_chs"], f"{what}[{i}]: {tuple(m.shape)} vs {entry}"
        for side, size in zip(m.shape[-2:], image_hw):
            r = entry["reduction"]
            assert size // r - 1 <= side <= math.ceil(size / r), f"{what}[{i}]: {tuple(m.shape)} vs {entry}"


@pytest.mark.parametrize("name", MODELS)
def test_forward_head_classifier_and_reset(name):
    entry, model = build(name)
    x = example(entry)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (1, model.num_features), f"{name}: pre_logits {tuple(pooled.shape)}"
        # ATS's forward updates the CLS token alone in its last block: the same logits up to rounding.
        assert_close(first(model.forward_head(feats)), first(model(x)), atol=1e-5, rtol=1e-5, what=name)
        num_classes = model.num_classes
        assert all(isinstance(h, nn.Linear) and h.out_features == num_classes for h in heads(model)), name

        model.reset_classifier(5)
        assert model.num_classes == 5 and all(h.out_features == 5 for h in heads(model))
        assert first(model(x)).shape == (1, 5)
        model.reset_classifier(0)
        assert all(isinstance(h, nn.Identity) for h in heads(model))
        assert_close(model(x), pooled, atol=1e-6, rtol=1e-6, what=f"{name} after reset_classifier(0)")
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # vit-pytorch's Linear(dim, 0)
@pytest.mark.parametrize("name", MODELS)
def test_num_classes_zero_returns_pooled_features_and_the_legacy_flag_vit_pytorchs_output(name):
    entry, model = build(name, num_classes=0)
    x = example(entry)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, model.num_features), f"{name}: num_classes=0 gave {tuple(out.shape)}"
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert_close(out, pooled, atol=1e-5, rtol=1e-5, what=f"{name} num_classes=0")
    paths = model._paths()
    assert not [k for k in model.state_dict() if k.startswith(tuple(f"{p}." for p in paths))], \
        f"{name}: classifier keys left in the state_dict"

    _, legacy = build(name, num_classes=0, legacy_num_classes_zero=True, **entry.vit_pytorch_compat)
    with torch.no_grad():
        legacy_out = first(legacy(x))
    if not (HAS_VIT_PYTORCH and entry.vit_pytorch):
        assert legacy_out.shape == (1, 0)
        return
    torch.manual_seed(0)
    reference = entry.build_vit_pytorch(**{**entry.test_overrides, "num_classes": 0}).eval()
    legacy.load_vit_pytorch_state_dict(reference.state_dict())
    with torch.no_grad():
        expected = first(reference(x))
    assert_close(first(legacy(x)), expected, atol=1e-5, rtol=1e-5, what=f"{name} legacy num_classes=0 vs vit-pytorch")


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients_and_really_checkpoints(name, monkeypatch):
    entry, plain = build(name)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    x = example(entry)
    outs = []
    for model in (plain, ckpt):
        out = first(model(x))
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        if model is plain:
            assert not calls, f"{name}: checkpointed without set_grad_checkpointing"
    assert calls, f"{name}: set_grad_checkpointing(True) never called torch.utils.checkpoint"
    assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6, what=f"{name} checkpointed output")
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, what=f"{name} grad of {n}")
    ckpt.set_grad_checkpointing(False)
    count = len(calls)
    first(ckpt(x))  # blocks are checkpointed (or not) in the forward pass
    assert len(calls) == count


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    entry, model = build(name)
    x = example(entry)
    reason = getattr(type(model), "intermediates_unsupported", None)
    if reason is not None:  # a model that declares it cannot serve them refuses, saying why
        assert not model.feature_info, f"{name}: declares no intermediates but lists feature_info"
        with pytest.raises(ValueError, match=re.escape(reason)):
            model.forward_intermediates(x)
        return
    hw = x.shape[-2:]
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
        for a, b in zip(*(f if isinstance(f, tuple) else (f,) for f in (final, features))):
            assert torch.equal(a, b), f"{name}: forward_intermediates' final output is not forward_features'"
        check_maps(maps, info, hw, name)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], maps[-1])
        tokens = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        assert [t.shape for t in tokens] == [(1, m.shape[2] * m.shape[3], m.shape[1]) for m in (maps[0], maps[-1])]
        assert torch.equal(tokens[0], maps[0].flatten(2).transpose(1, 2))
        assert torch.equal(tokens[1], maps[-1].flatten(2).transpose(1, 2))
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        assert [n.shape for n in normed] == [m.shape for m in maps]
        with pytest.raises(ValueError, match="out of range"):
            model.forward_intermediates(x, indices=len(info) + 1)
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", HIERARCHICAL_MODELS)
def test_features_only_backbone(name):
    entry = get_model_entry(name)
    torch.manual_seed(0)
    backbone = fastvit.create_model(name, features_only=True, **entry.test_overrides).eval()
    x = example(entry)
    with torch.no_grad():
        maps = backbone(x)
    info = backbone.feature_info
    assert len(info.channels()) >= 2, f"{name}: a hierarchical model has a map per stage"
    assert [m.shape[1] for m in maps] == info.channels()
    check_maps(maps, [info[i] for i in backbone.out_indices], x.shape[-2:], name)
    assert info.reduction() == sorted(info.reduction())
    assert not any(k.startswith("model." + model_path) for k in backbone.state_dict()
                   for model_path in backbone.model._paths()), f"{name}: the classifier's weights are kept"
    if HAS_TIMM:
        from timm.models._features import FeatureInfo

        assert isinstance(info, FeatureInfo)
    two = fastvit.create_model(name, features_only=True, out_indices=(1, -1), **entry.test_overrides).eval()
    two.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        picked = two(x)
    assert two.feature_info.channels() == [info.channels()[1], info.channels()[-1]]
    assert torch.equal(picked[0], maps[1]) and torch.equal(picked[1], maps[-1])


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install fastvit[dev])")
@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_is_what_timms_resolve_data_config_reads(name):
    from timm.data import resolve_data_config

    entry, model = build(name)
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == entry.input_size_for(entry.test_overrides)
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == fastvit.models.base.IMAGENET_DEFAULT_MEAN
    assert model.pretrained_cfg["architecture"] == name and model.pretrained_cfg["num_classes"] == model.num_classes


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install fastvit[dev])")
def test_a_384_preset_resolves_384_pixels():
    """The issue's case: timm's data config silently resolved 224 px for vit_base_patch32_384."""
    from timm.data import resolve_data_config

    entry = get_model_entry("vit_base_patch32_384")
    assert entry.pretrained_cfg_for({})["input_size"] == (3, 384, 384)
    small = {**entry.test_overrides, "image_size": 384, "patch_size": 32}  # the preset's input, small widths
    cfg = resolve_data_config({}, model=fastvit.create_model("vit_base_patch32_384", **small))
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0
    plain = fastvit.ViT(**small)  # built without the registry: from its image_size
    assert resolve_data_config({}, model=plain)["input_size"] == (3, 384, 384)


@pytest.mark.parametrize("name", MODELS)
def test_an_input_in_another_dtype_is_a_value_error_naming_both(name):
    entry, model = build(name)
    x = example(entry)
    with pytest.raises(ValueError, match=r"torch\.float64.*torch\.float32"):
        model(x.double())
    with pytest.raises(ValueError, match=r"torch\.bfloat16.*torch\.float32"):
        model.forward_intermediates(x.bfloat16())
    with pytest.raises(ValueError, match="floating-point"):
        model(x.to(torch.uint8))


def test_autocast_and_a_model_in_the_inputs_dtype_are_accepted_and_twins_stays_bf16():
    """TwinsSVT used to upcast a bf16 input to fp32 silently (its channel norms' fp32 parameters)."""
    entry, model = build("vit_tiny_patch16_224")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(example(entry)).shape == (1, 10)  # autocast decides the compute dtype
    entry, model = build("twins_svt_seed_224")
    x = example(entry)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"torch\.float32.*torch\.bfloat16"):
        model(x)
