"""``fastvit.patch_timm``: timm's models, patched in place, against themselves unpatched.

One test runs over a table of tiny random-init timm configs, one or more per family: fp32 eval
outputs, the input gradient and every parameter gradient in training, state_dict, and ``unpatch_timm``
restoring bit-identical outputs. Learned biases (relative tables, talking-heads mixes, BatchNorms) are
moved to unit scale first, so they matter.
"""

from __future__ import annotations

import copy
import pickle
import re
from dataclasses import dataclass, field

import pytest
import torch
from helpers import assert_close, randomize_batchnorms
from torch import nn

timm = pytest.importorskip("timm")

import fastvit  # noqa: E402
import fastvit.compat.timm.swin  # noqa: E402
from fastvit.compat.timm import patch_summary, patch_timm, unpatch_timm  # noqa: E402
from fastvit.compat.timm._patch import Patched  # noqa: E402
from fastvit.layers import Linear  # noqa: E402


@dataclass(frozen=True)
class Case:
    id: str
    name: str  # timm model name (or "module:Class" for a class built directly)
    kwargs: dict = field(default_factory=dict)
    size: int = 32
    patched: tuple = ()  # timm class names that must be patched
    batch: int = 2


_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
_SWIN = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
_LEVIT = dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(1, 1, 1))
_MAXVIT = dict(img_size=64, embed_dim=(16, 32), depths=(1, 1), stem_width=16, transformer_window_size=(4, 4),
               transformer_grid_size=(4, 4), transformer_dim_head=8)

CASES = [
    Case("vit", "vit_tiny_patch16_224", _VIT, patched=("Attention",)),
    Case("deit3", "deit3_small_patch16_224", _VIT, patched=("Attention",)),
    Case("vit-registers", "vit_base_patch16_reg4_gap_256", _VIT, patched=("Attention",)),
    Case("deit-distilled", "deit_tiny_distilled_patch16_224", _VIT, patched=("Attention",)),
    Case("cait", "cait_xxs24_224", dict(_VIT, num_heads=4, depth_token_only=1),
         patched=("TalkingHeadAttn", "ClassAttn")),
    Case("swin", "swin_tiny_patch4_window7_224", _SWIN, 64, ("WindowAttention", "SwinTransformerBlock")),
    Case("swin-padded", "swin_tiny_patch4_window7_224", dict(_SWIN, window_size=5, strict_img_size=False), 64,
         ("WindowAttention", "SwinTransformerBlock")),
    Case("swinv2", "swinv2_tiny_window8_256", _SWIN, 64, ("WindowAttention", "SwinTransformerV2Block")),
    Case("levit", "levit_128s", _LEVIT, 64, ("Attention", "AttentionDownsample")),
    Case("levit-conv", "levit_conv_128s", _LEVIT, 64, ("Attention", "AttentionDownsample")),
    Case("pit", "pit_ti_224", dict(img_size=64, depth=(1, 1, 1)), 64, ("Attention",)),
    Case("crossvit", "crossvit_tiny_240", dict(img_size=(32, 48), patch_size=(8, 16), embed_dim=(16, 32),
                                               depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1)),
         48, ("Attention", "CrossAttention")),
    Case("twins-svt", "twins_svt_small", dict(img_size=64, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2),
                                              depths=(2, 2), sr_ratios=(2, 1), wss=(4, 4)),
         64, ("LocallyGroupedAttn", "GlobalSubSampleAttn")),
    Case("twins-svt-padded", "twins_svt_small", dict(img_size=48, embed_dims=(16, 32), num_heads=(1, 2),
                                                     mlp_ratios=(2, 2), depths=(2, 2), sr_ratios=(2, 1), wss=(5, 5)),
         48, ("LocallyGroupedAttn", "GlobalSubSampleAttn")),
    Case("nest", "timm.models.nest:Nest", dict(img_size=32, patch_size=4, embed_dims=(16, 32, 64), num_heads=(1, 2, 4),
                                               depths=(1, 1, 1)), 32, ("Attention",)),
    Case("mobilevit", "mobilevit_xxs", {}, 64, ("Attention",), batch=4),
    Case("maxvit-bias-tf", "maxvit_tiny_tf_224", _MAXVIT, 64, ("AttentionCl", "PartitionAttentionCl")),
    Case("maxvit-bias", "maxvit_pico_rw_256", _MAXVIT, 64, ("AttentionCl", "PartitionAttentionCl")),
    Case("maxvit-mlp", "maxvit_rmlp_pico_rw_256", _MAXVIT, 64, ("AttentionCl", "PartitionAttentionCl")),
    Case("beit", "beit_base_patch16_224", _VIT, patched=("Attention",)),
    Case("eva-rope", "eva02_tiny_patch14_224", dict(_VIT, img_size=28, patch_size=7), 28, ("EvaAttention",)),
    Case("efficientformer", "efficientformer_l1", dict(depths=(1, 1, 1, 2), embed_dims=(8, 16, 24, 32), num_vit=1),
         224, ("Attention",)),
]

# Parameters that start at zero (or a constant) in timm: moved to unit scale so the tests see them.
_UNIT_SCALE = re.compile(r"relative_position_bias_table|attention_biases|rel_pos\.|q_bias|v_bias|proj_l\.|proj_w\.")


def build(case: Case, **extra) -> nn.Module:
    """The case's timm model, random weights with learned biases at unit scale, in eval."""
    torch.manual_seed(0)
    kwargs = dict(case.kwargs, num_classes=5, **extra)
    if ":" in case.name:
        import importlib

        module, attr = case.name.split(":")
        model = getattr(importlib.import_module(module), attr)(**kwargs)
    else:
        model = timm.create_model(case.name, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cpb_mlp" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("logit_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 2.3)
            elif _UNIT_SCALE.search(name):
                p.copy_(torch.randn(p.shape, generator=g))
    randomize_batchnorms(model)
    for m in model.modules():  # training is compared with dropout and stochastic depth off
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, timm.layers.DropPath):
            m.drop_prob = 0.0
    return model.eval()


def image(case: Case, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.batch, 3, case.size, case.size, generator=g)


def patched_names(model: nn.Module) -> set:
    return {type(m).timm_class.__name__ for m in model.modules() if isinstance(m, Patched)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_patched_model_matches_timm(case):
    ref = build(case)
    x = image(case)
    with torch.no_grad():
        expected = ref(x)
    model = patch_timm(copy.deepcopy(ref))
    assert patched_names(model) >= set(case.patched), f"{case.id}: patched {patched_names(model)}"

    # state_dict: same keys, same values, same order; isinstance holds.
    ref_state, state = ref.state_dict(), model.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    assert all(isinstance(m, type(m).timm_class) for m in model.modules() if isinstance(m, Patched))

    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5, what=f"{case.id} eval output")

    # training (dropout and drop-path off): the input and every parameter get the same gradient.
    # BatchNorms keep their running statistics: batch statistics of 2 images at 1x1 maps (LeViT's last
    # stage) turn fp32 rounding into percent-level gradient differences (both sides agree to 1e-13 in fp64).
    ref.train(), model.train()
    for m in (*ref.modules(), *model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    grads = []
    for m in (ref, model):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (ref_out, ref_dx, ref_dp), (out, dx, dp) = grads
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, what=f"{case.id} train output")
    assert_close(dx, ref_dx, atol=1e-5, rtol=1e-4, what=f"{case.id} input grad")
    for name, g in ref_dp.items():
        if g is None:
            assert dp[name] is None, f"{case.id}: {name} has a gradient only when patched"
            continue
        assert dp[name] is not None, f"{case.id}: {name} has no gradient when patched"
        assert_close(dp[name], g, atol=2e-5, rtol=1e-4, what=f"{case.id} grad of {name}")

    # unpatch: timm's classes and bit-identical outputs
    ref.eval(), model.eval()
    unpatch_timm(model)
    assert not any(isinstance(m, Patched) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_summary_fallbacks_and_verbose(capsys):
    case = CASES[0]
    model = patch_timm(build(case), verbose=True)
    printed = capsys.readouterr().out
    assert "patched" in printed and "timm.layers.attention.Attention" in printed
    summary = patch_summary(model)
    assert summary.patched == {"timm.layers.attention.Attention": 2}
    assert not summary.refused and not summary.fallbacks

    # is_causal and bool masks have no mapping: timm's forward runs, and the summary counts it
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 32)
    expected = attn.timm_class.forward(attn, x, is_causal=True)
    torch.testing.assert_close(attn(x, is_causal=True), expected)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, attn_mask=mask), attn.timm_class.forward(attn, x, attn_mask=mask))
    # a float mask is served (DenseBias)
    float_mask = torch.randn(17, 17)
    torch.testing.assert_close(attn(x, attn_mask=float_mask), attn.timm_class.forward(attn, x, attn_mask=float_mask))
    fallbacks = patch_summary(model).fallbacks["timm.layers.attention.Attention"]
    assert sorted(fallbacks.values()) == [1, 1] and any("is_causal" in r for r in fallbacks)
    assert "fallback" in str(patch_summary(model))


def test_mobilevit_v2_is_refused_with_its_reason():
    model = build(Case("mobilevitv2", "mobilevitv2_050", size=64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        patch_timm(model)
        out = model(x)
    assert torch.equal(out, expected)
    summary = patch_summary(model)
    assert not summary.patched
    (count, reason), = summary.refused.values()
    assert count == 9 and "no softmax attention map" in reason
    assert "refused" in str(summary)


def test_patch_is_idempotent_and_leaves_unknown_modules_alone():
    model = patch_timm(patch_timm(build(CASES[0])))
    assert patch_summary(model).patched == {"timm.layers.attention.Attention": 2}
    # a module fastvit does not know stays as it is (and is listed when it looks like attention)
    pool = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="map", **_VIT)
    patch_timm(pool)
    assert type(pool.attn_pool).__name__ == "AttentionPoolLatent"
    assert "timm.layers.attention_pool.AttentionPoolLatent" in patch_summary(pool).left_alone


def test_linear_swaps_and_fuses_gelu():
    ref = build(CASES[0])
    x = image(CASES[0])
    model = patch_timm(copy.deepcopy(ref), linear=True)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, Linear) for m in linears)
    assert patch_summary(model).patched["timm.layers.mlp.Mlp"] == 2
    assert list(model.state_dict()) == list(ref.state_dict())
    with torch.inference_mode():
        assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5, what="linear=True inference")
    unpatch_timm(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and "_packed" not in m.__dict__ for m in linears)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=["vit", "swin"])
def test_pickle_deepcopy_and_backends(case):
    model = patch_timm(build(case), linear=True)
    x = image(case)
    with torch.no_grad():
        expected = model(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert patched_names(clone) == patched_names(model)
            assert torch.equal(clone(x), expected)
        outs = {}
        for backend in ("reference", "sdpa"):
            with fastvit.use_backend(backend):
                outs[backend] = model(x)
    assert_close(outs["sdpa"], outs["reference"], atol=1e-5, rtol=1e-5, what=f"{case.id} sdpa vs reference")


def test_swin_block_needs_no_roll_partition_or_mask(monkeypatch):
    case = CASES[5]
    model = build(case)
    x = image(case)
    with torch.no_grad():
        expected = model(x)
    patch_timm(model)
    swin = timm.models.swin_transformer

    def forbidden(*args, **kwargs):
        raise AssertionError("the patched Swin block rolled, partitioned or masked the map itself")

    class TorchWithoutRoll:  # timm's swin module sees this as `torch`: the block's roll raises
        def __getattr__(self, name):
            return forbidden if name == "roll" else getattr(torch, name)

    monkeypatch.setattr(swin, "torch", TorchWithoutRoll())
    for name in ("window_partition", "window_reverse"):
        monkeypatch.setattr(swin, name, forbidden)
    monkeypatch.setattr(fastvit.compat.timm.swin._WindowAttention, "forward", forbidden)  # per-window calls
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5, what="swin without roll / partition")
    assert not patch_summary(model).fallbacks


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=["vit", "swin"])
def test_compile_fullgraph(case):
    model = patch_timm(build(case))
    x = image(case)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5, what=f"{case.id} compiled")


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=["vit", "swin"])
def test_grad_checkpointing_and_forward_intermediates(case):
    ref = build(case)
    model = patch_timm(copy.deepcopy(ref))
    x = image(case)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ref_final, ref_inter = ref.forward_intermediates(x)
    assert_close(final, ref_final, atol=1e-5, rtol=1e-5, what="forward_intermediates final")
    for a, b in zip(inter, ref_inter):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what="forward_intermediates")

    model.train().set_grad_checkpointing(True)
    model(x).sum().backward()
    checkpointed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(False)
    model(x).sum().backward()
    for n, g in checkpointed.items():
        assert_close(g, model.get_parameter(n).grad, atol=1e-6, rtol=1e-5, what=f"checkpointed grad of {n}")


def test_swin_features_only():
    case = CASES[5]
    ref = build(case, features_only=True, out_indices=(0, 1))
    model = patch_timm(copy.deepcopy(ref))
    assert patch_summary(model).patched
    x = image(case)
    with torch.no_grad():
        for a, b in zip(model(x), ref(x), strict=True):
            assert_close(a, b, atol=1e-5, rtol=1e-5, what="swin features_only")


def test_fx_feature_extraction_on_patched_vit():
    from timm.models import create_feature_extractor

    ref = build(CASES[0])
    model = patch_timm(copy.deepcopy(ref), linear=True)
    nodes = {"blocks.0": "b0", "blocks.1": "b1"}
    ext, ref_ext = create_feature_extractor(model, nodes), create_feature_extractor(ref, nodes)
    x = image(CASES[0])
    with torch.no_grad():
        out, expected = ext(x), ref_ext(x)
    for key in nodes.values():
        assert_close(out[key], expected[key], atol=1e-5, rtol=1e-5, what=f"fx feature {key}")


def test_create_model_timm_prefix(monkeypatch):
    model = fastvit.create_model("timm/vit_tiny_patch16_224", pretrained=False, **_VIT)
    assert patch_summary(model).patched == {"timm.layers.attention.Attention": 2}
    linear = fastvit.create_model("timm/vit_tiny_patch16_224", linear=True, **_VIT)
    assert isinstance(linear.head, Linear)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded.*pretrained_cfg_overlay"):
        fastvit.create_model("timm/vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(OSError):  # without pretrained weights the error is timm's own
        fastvit.create_model("timm/vit_tiny_patch16_224", pretrained=False)


def test_create_model_without_timm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="needs timm"):
        fastvit.create_model("timm/vit_tiny_patch16_224")
