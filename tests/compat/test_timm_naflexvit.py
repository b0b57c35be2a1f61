"""``patch_timm`` on timm's NaFlexVit: NaFlex batches run packed, against the unpatched model.

The batches are built as timm's NaFlex pipeline builds them (``Patchify`` per image, ``NaFlexCollator``
padding to a common length), from images of different sizes and aspect ratios. Layer scales (1e-5 in
timm's presets) are moved to unit scale, so the attention matters in the outputs.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from helpers import assert_close

timm = pytest.importorskip("timm")

from timm.data.naflex_dataset import NaFlexCollator  # noqa: E402
from timm.data.naflex_transforms import Patchify  # noqa: E402

import fastvit  # noqa: E402
import fastvit.compat.timm.naflexvit as naflexvit  # noqa: E402
from fastvit.attention import DenseBias, KeyPaddingMask, Packed  # noqa: E402
from fastvit.compat.timm import patch_summary, patch_timm, unpatch_timm  # noqa: E402
from fastvit.compat.timm._patch import Patched  # noqa: E402

SIZES = [(32, 32), (16, 40), (24, 8), (8, 8)]  # (h, w) in pixels; patches of 8: 16, 10, 3 and 1 valid


@dataclass(frozen=True)
class Case:
    id: str
    name: str
    kwargs: dict = field(default_factory=dict)
    attention: str = "timm.layers.attention.Attention"


_SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)

CASES = [
    Case("gap-reg4", "naflexvit_base_patch16_gap"),  # 4 register tokens, masked average pooling
    Case("map-reg1", "naflexvit_base_patch16_map"),  # attention pooling with timm's key mask
    Case("siglip-no-prefix", "naflexvit_base_patch16_siglip"),  # no prefix token, attention pooling
    Case("parfac-max", "naflexvit_base_patch16_parfac_gap", dict(global_pool="max")),  # factorized pos embed
    Case("eva-axial-rope-cls", "naflexvit_base_patch16_gap",
         dict(rope_type="axial", attn_type="eva", class_token=True, global_pool="token", qk_norm=True),
         "timm.models.eva.EvaAttention"),
    Case("eva-mixed-rope-gated", "naflexvit_base_patch16_gap",
         dict(rope_type="mixed", attn_type="eva", attn_gated=True, swiglu_mlp=True), "timm.models.eva.EvaAttention"),
]


def build(case: Case, **extra) -> torch.nn.Module:
    """The case's model, random weights, layer scales at unit scale, in eval."""
    torch.manual_seed(0)
    model = timm.create_model(case.name, pretrained=False, **dict(_SMALL, **case.kwargs, **extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ".gamma_" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def naflex_batch(sizes=SIZES, patch_size: int = 8, extra: int = 2, seed: int = 2) -> dict:
    """timm's NaFlex collation of ``sizes`` images: ``patches``, ``patch_coord``, ``patch_valid``."""
    patchify, g = Patchify(patch_size), torch.Generator().manual_seed(seed)
    items = [(patchify(torch.randn(3, h, w, generator=g)), 0) for h, w in sizes]
    longest = max(item["patches"].shape[0] for item, _ in items)
    batch, _ = NaFlexCollator(max_seq_len=longest + extra)(items)  # padded past the longest image too
    batch.pop("seq_len")
    return batch


def valid_tokens(model, batch: dict) -> torch.Tensor:
    valid = batch["patch_valid"]
    return torch.cat([valid.new_ones(valid.shape[0], model.num_prefix_tokens), valid], dim=1)


@pytest.fixture
def attend_calls(monkeypatch):
    """The ``packed`` and ``bias`` arguments of every ``attend`` call the NaFlex-aware attentions make."""
    calls, real = [], naflexvit.attend

    def recording(*args, **kwargs):
        calls.append((kwargs.get("packed"), kwargs.get("bias")))
        return real(*args, **kwargs)

    monkeypatch.setattr(naflexvit, "attend", recording)
    return calls


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_naflex_batch_is_packed_and_matches_timm(case, attend_calls):
    ref = build(case)
    batch = naflex_batch()
    with torch.no_grad():
        expected, expected_features = ref(batch), ref.forward_features(**batch)
    model = patch_timm(copy.deepcopy(ref))
    assert patch_summary(model).patched == {"timm.models.naflexvit.NaFlexVit": 1, case.attention: 2}
    assert list(model.state_dict()) == list(ref.state_dict())

    with torch.no_grad():
        out = model(batch)  # the collator's dict
        features = model.forward_features(**batch)
        assert_close(model(batch["patches"], patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"]),
                     expected, atol=1e-5, rtol=1e-5, what=f"{case.id} keyword call")
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"{case.id} logits")
    assert set(features) == set(expected_features) and torch.equal(features["patch_valid"], batch["patch_valid"])
    valid = valid_tokens(model, batch)
    assert_close(features["patches"][valid], expected_features["patches"][valid], atol=1e-5, rtol=1e-5,
                 what=f"{case.id} features at the valid tokens")

    # every block's attention ran packed: one sequence per image, its valid patches and prefix tokens
    lengths = tuple(valid.sum(dim=1).tolist())
    assert len(attend_calls) == 3 * 2
    assert all(packed == Packed(lengths) and bias is None for packed, bias in attend_calls)
    assert not patch_summary(model).fallbacks

    unpatch_timm(model)
    assert not any(isinstance(m, Patched) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(batch), ref(batch))


def test_plain_image_tensor_is_unchanged(attend_calls):
    case = CASES[0]
    ref = build(case)
    model = patch_timm(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5, what="plain image")
        assert_close(model.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5, what="features")
    assert not attend_calls  # the ViT patch's own call, no layout
    assert not patch_summary(model).fallbacks


def _train_outputs_and_grads(model, batch, seed: int = 4):
    torch.manual_seed(seed)  # the same patch dropout / stochastic depth draws on both sides
    out = model(batch)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
@pytest.mark.parametrize("case", CASES[4:6], ids=[c.id for c in CASES[4:6]])
def test_training_with_patch_dropout_is_packed(case, checkpointing, attend_calls):
    """timm drops the rope rows with the patches (axial: once, mixed: per block); fastvit packs what is kept."""
    ref = build(case, patch_drop_rate=0.5).train()
    model = patch_timm(copy.deepcopy(ref)).train()
    model.set_grad_checkpointing(checkpointing)
    batch = naflex_batch()
    (ref_out, ref_grads), (out, grads) = _train_outputs_and_grads(ref, batch), _train_outputs_and_grads(model, batch)
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, what="train output")
    for name, g in ref_grads.items():
        assert (g is None) == (grads[name] is None), name
        if g is not None:  # fp32 sums of large terms: the tolerance scales with the gradient's magnitude
            scale = max(1.0, g.abs().max().item())
            assert_close(grads[name], g, atol=2e-5 * scale, rtol=1e-4, what=f"grad of {name}")
    assert attend_calls and all(isinstance(packed, Packed) for packed, _ in attend_calls)
    assert attend_calls[0][0].total < valid_tokens(model, batch).sum()  # the dropped patches are not packed
    assert not patch_summary(model).fallbacks


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_packed_backends(backend):
    case = CASES[4]
    ref = build(case)
    model = patch_timm(copy.deepcopy(ref))
    batch = naflex_batch()
    with torch.no_grad(), fastvit.use_backend(backend):
        assert_close(model(batch), ref(batch), atol=1e-5, rtol=1e-5, what=f"packed under {backend}")


def test_stochastic_depth_stays_padded_with_a_key_padding_mask(attend_calls):
    case = CASES[0]
    ref = build(case, drop_path_rate=0.5).train()
    model = patch_timm(copy.deepcopy(ref)).train()
    batch = naflex_batch()
    (ref_out, ref_grads), (out, grads) = _train_outputs_and_grads(ref, batch), _train_outputs_and_grads(model, batch)
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, what="train output with drop path")
    assert_close(grads["embeds.proj.weight"], ref_grads["embeds.proj.weight"], atol=2e-5, rtol=1e-4,
                 what="grad of embeds.proj.weight")
    valid = valid_tokens(model, batch)
    assert len(attend_calls) == 2
    for packed, bias in attend_calls:
        assert packed is None and isinstance(bias, KeyPaddingMask) and torch.equal(bias.mask, valid)
    (reason, calls), = patch_summary(model).fallbacks["timm.models.naflexvit.NaFlexVit"].items()
    assert "stochastic depth" in reason and "key padding mask" in reason and calls == 1


def _key_padding_float_mask(valid: torch.Tensor, masked: float) -> torch.Tensor:
    """``[B, 1, N, N]``, every row the same: 0 at the valid keys, ``masked`` elsewhere."""
    b, n = valid.shape
    row = torch.zeros(b, n).masked_fill(~valid, masked)
    return row[:, None, None, :].expand(b, 1, n, n).contiguous()


@pytest.mark.parametrize("masked", [float("-inf"), torch.finfo(torch.float32).min], ids=["-inf", "finfo-min"])
def test_callers_key_padding_mask_becomes_a_key_padding_mask(masked, attend_calls):
    case = CASES[1]
    ref = build(case)
    model = patch_timm(copy.deepcopy(ref))
    batch = naflex_batch()
    batch["attn_mask"] = _key_padding_float_mask(valid_tokens(model, batch), masked)
    with torch.no_grad():
        assert_close(model(batch), ref(batch), atol=1e-5, rtol=1e-5, what="caller's key padding mask")
    assert len(attend_calls) == 2
    assert all(packed is None and isinstance(bias, KeyPaddingMask) for packed, bias in attend_calls)
    assert any("attn_mask passed by the caller" in r for r in patch_summary(model).fallbacks[
        "timm.models.naflexvit.NaFlexVit"])

    # any other float mask is a dense bias, as today
    attend_calls.clear()
    batch["attn_mask"] = torch.randn(batch["attn_mask"].shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close(model(batch), ref(batch), atol=1e-5, rtol=1e-5, what="caller's dense mask")
    assert all(packed is None and isinstance(bias, DenseBias) for packed, bias in attend_calls)


def test_attention_maps_a_row_identical_mask_to_key_padding(attend_calls):
    """Outside forward_features (forward_intermediates, direct calls) the attention recognises the mask."""
    for case in (CASES[0], CASES[4]):
        model = patch_timm(build(case))
        attn, n = model.blocks[0].attn, model.num_prefix_tokens + 10  # prefix tokens + a 2 x 5 grid
        valid = torch.rand(3, n, generator=torch.Generator().manual_seed(7)) > 0.4
        valid[:, 0] = True
        x = torch.randn(3, n, 32, generator=torch.Generator().manual_seed(8))
        mask = _key_padding_float_mask(valid, float("-inf"))
        args = (x,)
        if case.kwargs.get("rope_type"):
            args = (x, model.rope.get_embed(shape=(2, 5))[None, None])  # (1, 1, 10, 2d)
        attend_calls.clear()
        with torch.no_grad():
            out = attn(*args, attn_mask=mask)
            expected = attn.timm_class.forward(attn, *args, attn_mask=mask)
        assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"{case.id} attention with a key padding mask")
        (packed, bias), = attend_calls
        assert packed is None and isinstance(bias, KeyPaddingMask) and torch.equal(bias.mask, valid)

        # timm's symmetric NaFlex mask (padded query rows masked too) is not a key padding mask: dense bias
        symmetric = mask.clone()
        symmetric[~valid[:, None, :, None].expand_as(mask)] = float("-inf")
        symmetric[..., 0] = 0.0  # each padded query still has one key: finite rows on both sides
        attend_calls.clear()
        with torch.no_grad():
            out = attn(*args, attn_mask=symmetric)
            expected = attn.timm_class.forward(attn, *args, attn_mask=symmetric)
        assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"{case.id} attention with a symmetric mask")
        assert not attend_calls  # the ViT / EVA patch served it (DenseBias)


def test_forward_intermediates_matches_timm():
    case = CASES[0]
    ref = build(case)
    model = patch_timm(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ref_final, ref_inter = ref.forward_intermediates(x)
    assert_close(final, ref_final, atol=1e-5, rtol=1e-5, what="forward_intermediates final")
    for a, b in zip(inter, ref_inter, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what="forward_intermediates")


def test_unmapped_attention_runs_timms_forward_features_with_a_reason():
    case = Case("rope-attention", "naflexvit_base_patch16_gap", dict(rope_type="axial"))  # AttentionRope
    ref = build(case)
    model = patch_timm(copy.deepcopy(ref))
    batch = naflex_batch()
    with torch.no_grad():
        assert torch.equal(model(batch), ref(batch))
    summary = patch_summary(model)
    (reason, calls), = summary.fallbacks["timm.models.naflexvit.NaFlexVit"].items()
    assert "AttentionRope is not served by fastvit" in reason and calls == 1
    assert "timm.layers.attention.AttentionRope" in summary.left_alone


def test_pickle_deepcopy_and_repatching():
    case = CASES[4]
    model = patch_timm(build(case))
    batch = naflex_batch()
    with torch.no_grad():
        expected = model(batch)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(clone.blocks[0].attn) is naflexvit.NaFlexEvaAttention
            assert torch.equal(clone(batch), expected)
    patch_timm(model)  # harmless a second time
    assert patch_summary(model).patched == {"timm.models.naflexvit.NaFlexVit": 1, case.attention: 2}


def test_blocks_patched_before_the_model_are_adopted():
    case = CASES[0]
    model = build(case)
    patch_timm(model.blocks)  # ViT patch first: the NaFlexVit patch then takes its attentions over
    patch_timm(model)
    assert all(type(blk.attn) is naflexvit.NaFlexAttention for blk in model.blocks)
