"""``fastvit.merge_tokens``: Token Merging (Bolya et al., ICLR 2023) against a plain reference.

The reference below is written from the paper and the authors' code, one image and one token at a
time (Python loops, float64 similarities), and shares nothing with ``fastvit.layers.merge``: it reads
the models' weights and runs the attention by hand with ``log(size)`` added to the logits. Small models
(depth 3, width 32-48) keep every case to seconds on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import fastvit
from fastvit.merge import is_merging
from fastvit.models.cait import CaiT
from fastvit.models.deepvit import DeepViT
from fastvit.models.efficient import ViT as EfficientViT
from fastvit.models.vit import DistillableViT
from fastvit.ssl.simmim import SimMIM

FASTVIT = dict(image_size=32, patch_size=4, num_classes=10, dim=32, depth=3, heads=2, dim_head=16, mlp_dim=64)
TIMM = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)
N_PATCHES = 64  # 32 / 4 squared


# -- the reference --------------------------------------------------------------------------------


def ref_merge(x, size, metric, r, class_token, distill_token):
    """One block's bipartite soft matching and size-weighted merge, image by image.

    x ``(b, n, c)``, size ``(b, n)``, metric ``(b, n, d)`` (the keys averaged over heads)."""
    b, n, _ = x.shape
    r = min(r, (n - class_token - distill_token) // 2)
    if r <= 0:
        return x, size
    xs, sizes = [], []
    for i in range(b):
        m = metric[i].double()
        m = m / m.norm(dim=-1, keepdim=True)
        a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
        best = []
        for ai, a in enumerate(a_pos):
            if class_token and ai == 0:
                best.append((-math.inf, 0))
                continue
            candidates = [(float(m[a] @ m[bp]), bj) for bj, bp in enumerate(b_pos) if not (distill_token and bj == 0)]
            top = max(c[0] for c in candidates)
            best.append(next(c for c in candidates if c[0] == top))
        order = sorted(range(len(a_pos)), key=lambda ai: (-best[ai][0], ai))
        merged, kept = order[:r], order[r:]
        if class_token:
            kept = sorted(kept)
        total = [x[i, bp] * size[i, bp] for bp in b_pos]
        weight = [size[i, bp].clone() for bp in b_pos]
        for ai in merged:
            bj = best[ai][1]
            total[bj] = total[bj] + x[i, a_pos[ai]] * size[i, a_pos[ai]]
            weight[bj] = weight[bj] + size[i, a_pos[ai]]
        b_tokens = [(t / w, w) for t, w in zip(total, weight)]
        a_tokens = [(x[i, a_pos[ai]], size[i, a_pos[ai]]) for ai in kept]
        if distill_token:
            layout = a_tokens[:1] + b_tokens[:1] + a_tokens[1:] + b_tokens[1:]
        else:
            layout = a_tokens + b_tokens
        xs.append(torch.stack([t for t, _ in layout]))
        sizes.append(torch.stack([s for _, s in layout]))
    return torch.stack(xs), torch.stack(sizes)


def ref_softmax_attention(q, k, v, scale, key_size, pre_mix=None, post_mix=None):
    """``q, k, v (b, h, n, d)``; proportional attention: ``+ log(size)`` of each key right before the softmax."""
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if pre_mix is not None:
        logits = torch.einsum("bhij,hg->bgij", logits, pre_mix)
    logits = logits + key_size.log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    if post_mix is not None:
        probs = torch.einsum("bhij,hg->bgij", probs, post_mix)
    return torch.einsum("bhij,bhjd->bhid", probs, v)


def heads_of(t, heads):
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).permute(0, 2, 1, 3)  # (b, h, n, d)


def tokens_of(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def ref_fastvit_attention(attn, x, size):
    """fastvit's ``Attention``: pre-norm, ``to_qkv`` = [q | k | v] with heads outer."""
    q, k, v = (heads_of(t, attn.heads) for t in F.linear(attn.norm(x), attn.to_qkv.weight).chunk(3, dim=-1))
    out = ref_softmax_attention(q, k, v, attn.scale, size)
    return attn.to_out(tokens_of(out)), k.mean(dim=1)


def ref_timm_attention(attn, x, size):
    q, k, v = (heads_of(t, attn.num_heads) for t in attn.qkv(x).chunk(3, dim=-1))
    out = ref_softmax_attention(q, k, v, attn.scale, size)
    return attn.proj(tokens_of(out)), k.mean(dim=1)


def ref_talking_heads(attn, x, size, context=None):
    """CaiT's attention: the log-size goes in after the logits' head mixing, right before the softmax."""
    x = attn.norm(x)
    kv = x if context is None else torch.cat((x, context), dim=1)
    q = heads_of(F.linear(x, attn.to_q.weight), attn.heads)
    k, v = (heads_of(t, attn.heads) for t in F.linear(kv, attn.to_kv.weight).chunk(2, dim=-1))
    out = ref_softmax_attention(q, k, v, attn.scale, size, attn.mix_heads_pre_attn, attn.mix_heads_post_attn)
    return attn.to_out(tokens_of(out)), k.mean(dim=1)


def ref_fastvit_blocks(model, x, r, class_token, distill_token=False):
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    for (attn, ff), r_i in zip(model.transformer.layers, r):
        out, metric = ref_fastvit_attention(attn, x, size)
        x, size = ref_merge(out + x, size, metric, r_i, class_token, distill_token)
        x = ff(x) + x
    return model.transformer.norm(x)


def ref_fastvit_vit(model, img, r):
    x = ref_fastvit_blocks(model, model.embed(img), r, model.pool == "cls")
    return model.mlp_head(x[:, 0] if model.pool == "cls" else x.mean(dim=1))


def ref_distillable(model, img, r, token):
    x = model.embed(img)
    x = torch.cat((x[:, :1], token.reshape(1, 1, -1).expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
    x = ref_fastvit_blocks(model, x, r, True, True)
    return model.mlp_head(x[:, 0]), x[:, 1]


def ref_timm_vit(model, img, r):
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    for block, r_i in zip(model.blocks, r):
        out, metric = ref_timm_attention(block.attn, block.norm1(x), size)
        x, size = ref_merge(x + block.ls1(out), size, metric, r_i, class_token, distill_token)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    if distill_token:
        return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
    pooled = x[:, 0] if model.global_pool == "token" else x[:, model.num_prefix_tokens:].mean(dim=1)
    return model.head(model.fc_norm(pooled))


def ref_cait(model, img, r):
    x = model.embed(img)
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    for (attn, ff), r_i in zip(model.patch_transformer.layers, r):
        out, metric = ref_talking_heads(attn.fn, x, size)
        x, size = ref_merge(out * attn.scale + x, size, metric, r_i, False, False)
        x = ff(x) + x
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    key_size = torch.cat((torch.ones(x.shape[0], 1), size), dim=1)
    for attn, ff in model.cls_transformer.layers:
        out, _ = ref_talking_heads(attn.fn, cls, key_size, context=x)
        cls = out * attn.scale + cls
        cls = ff(cls) + cls
    return model.mlp_head(cls[:, 0])


def tokens_left(n, r, protected):
    """Tokens after the blocks: each removes ``min(r_i, (n - protected) // 2)``."""
    for r_i in r:
        n -= min(r_i, (n - protected) // 2)
    return n


# -- models ---------------------------------------------------------------------------------------


def fastvit_vit(pool="cls"):
    torch.manual_seed(0)
    return fastvit.ViT(**FASTVIT, pool=pool).eval()


def timm_model(name="vit_tiny_patch16_224", patched=False, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, **{**TIMM, **kwargs}).eval()
    with torch.no_grad():  # timm's init leaves biases at zero and LayerScale near it: make them matter
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
    return fastvit.patch_timm(model) if patched else model


def image(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


R_CASES = [4, [2, 8, 5], 100]  # an int, one per block, and one the half-clamp cuts down
R_IDS = ["r4", "r-list", "r-clamped"]


def per_block(r, depth=3):
    return r if isinstance(r, list) else [r] * depth


# -- merged logits == the reference ---------------------------------------------------------------


@pytest.mark.parametrize("r", R_CASES, ids=R_IDS)
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_fastvit_vit_matches_reference(pool, r):
    model = fastvit_vit(pool)
    x = image()
    with torch.no_grad():
        expected = ref_fastvit_vit(model, x, per_block(r))
        fastvit.merge_tokens(model, r)
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5, what=f"ViT pool={pool} r={r}")


@pytest.mark.parametrize("r", R_CASES, ids=R_IDS)
def test_distillable_vit_matches_reference(r):
    torch.manual_seed(0)
    model = DistillableViT(**FASTVIT).eval()
    token = torch.randn(1, FASTVIT["dim"])
    x = image()
    with torch.no_grad():
        logits, distill = ref_distillable(model, x, per_block(r), token)
        plain = ref_fastvit_vit(model, x, per_block(r))
        fastvit.merge_tokens(model, r)
        got_logits, got_distill = model(x, distill_token=token)
        assert_close(got_logits, logits, atol=1e-5, rtol=1e-5, what=f"DistillableViT logits r={r}")
        assert_close(got_distill, distill, atol=1e-5, rtol=1e-5, what=f"DistillableViT distill token r={r}")
        assert_close(model(x), plain, atol=1e-5, rtol=1e-5, what=f"DistillableViT without a token r={r}")


TIMM_CASES = {
    "vit": dict(),
    "vit-avg": dict(class_token=False, global_pool="avg"),
    "deit3": dict(name="deit3_small_patch16_224"),  # LayerScale, positions without the class token
    "deit-distilled": dict(name="deit_tiny_distilled_patch16_224"),
}


@pytest.mark.parametrize("r", R_CASES, ids=R_IDS)
@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("case", list(TIMM_CASES), ids=list(TIMM_CASES))
def test_timm_vit_matches_reference(case, patched, r):
    model = timm_model(patched=patched, **TIMM_CASES[case])
    x = image()
    with torch.no_grad():
        expected = ref_timm_vit(model, x, per_block(r))
        fastvit.merge_tokens(model, r)
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5, what=f"timm {case} patched={patched} r={r}")


def test_cait_matches_reference():
    """Patch blocks merge (no class token there); the talking heads mix the logits before the softmax, and
    the class-attention blocks weigh the merged patches by their sizes."""
    torch.manual_seed(0)
    model = CaiT(image_size=32, patch_size=4, num_classes=10, dim=32, depth=3, cls_depth=2, heads=4, dim_head=8,
                 mlp_dim=64).eval()
    x = image()
    with torch.no_grad():
        expected = ref_cait(model, x, [6, 6, 6])
        fastvit.merge_tokens(model, 6)
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5, what="CaiT r=6")


# -- r = 0 / None: the original computation, bit for bit ------------------------------------------


def _models():
    torch.manual_seed(0)
    return {
        "vit": fastvit_vit(),
        "vit-mean": fastvit_vit("mean"),
        "deepvit": DeepViT(**FASTVIT).eval(),
        "simple-vit": fastvit.SimpleViT(**{k: v for k, v in FASTVIT.items()}).eval(),
        "cait": CaiT(image_size=32, patch_size=4, num_classes=10, dim=32, depth=3, cls_depth=1, heads=2,
                     dim_head=16, mlp_dim=64).eval(),
        "efficient": EfficientViT(image_size=32, patch_size=4, num_classes=10, dim=32,
                                  transformer=fastvit.layers.Transformer(32, 3, 2, 16, 64)).eval(),
    }


RESTORE_CASES = ["vit", "vit-mean", "deepvit", "simple-vit", "cait", "efficient", "timm", "timm-patched"]


@pytest.mark.parametrize("case", RESTORE_CASES)
def test_r_zero_and_none_restore_exactly(case):
    if case.startswith("timm"):
        model = timm_model(patched=case == "timm-patched")
    else:
        model = _models()[case]
    x = image()
    classes = {name: type(m) for name, m in model.named_modules()}
    with torch.no_grad():
        expected = model(x)
        for r in (0, None, [0, 0, 0]):
            assert fastvit.merge_tokens(model, r) is model
            assert torch.equal(model(x), expected), f"{case}: r={r} on a never-merged model changed the output"
        assert fastvit.merge_tokens(model, 4) is model and is_merging(model)
        merged = model(x)
        assert not torch.equal(merged, expected), f"{case}: r=4 merged nothing"
        fastvit.merge_tokens(model, 8)  # a new r replaces the old one
        assert not torch.equal(model(x), merged)
        for r in (None, 0):
            fastvit.merge_tokens(model, r)
            assert torch.equal(model(x), expected), f"{case}: r={r} after merging did not restore the output"
            assert not is_merging(model)
            assert {name: type(m) for name, m in model.named_modules()} == classes
            assert not any("_token_merge" in vars(m) for m in model.modules())
            fastvit.merge_tokens(model, 4)


def test_distillation_token_without_a_class_token_goes_first_and_stays():
    torch.manual_seed(0)
    model = DistillableViT(**FASTVIT, pool="mean").eval()
    token = torch.randn(1, FASTVIT["dim"])
    fastvit.merge_tokens(model, 100)
    with torch.no_grad():
        logits, distill = model(img := image(), distill_token=token)
        x = model.embed(img)
        expected = ref_fastvit_blocks(model, torch.cat((token.expand(2, 1, -1), x), dim=1), [100] * 3, True)
    assert_close(distill, expected[:, 0], atol=1e-5, rtol=1e-5, what="distillation token (mean pool)")
    assert_close(logits, model.mlp_head(expected[:, 1:].mean(dim=1)), atol=1e-5, rtol=1e-5, what="logits")


def test_a_merging_model_pickles_and_copies():
    import copy
    import io

    model = fastvit_vit()
    fastvit.merge_tokens(model, 6)
    x = image()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert is_merging(twin) and torch.equal(twin(x), model(x))
        fastvit.merge_tokens(twin, None)
        assert type(twin.transformer) is fastvit.layers.Transformer


# -- token counts and the half clamp ------------------------------------------------------------


@pytest.mark.parametrize("r", [4, [0, 30, 3], 1000], ids=["r4", "r-list", "r-huge"])
@pytest.mark.parametrize("case", ["vit", "vit-mean", "timm-distilled"])
def test_token_count_at_the_last_block(case, r):
    if case == "timm-distilled":
        model, n, protected = timm_model("deit_tiny_distilled_patch16_224"), N_PATCHES + 2, 2
    else:
        model = fastvit_vit("cls" if case == "vit" else "mean")
        n, protected = N_PATCHES + (case == "vit"), int(case == "vit")
    fastvit.merge_tokens(model, r)
    with torch.no_grad():
        out = model.forward_features(image())
    want = tokens_left(n, per_block(r), protected)
    assert out.shape[1] == want, f"{case} r={r}: {out.shape[1]} tokens after the blocks, expected {want}"


def test_half_clamp_per_block():
    """r larger than half the mergeable tokens removes exactly half (rounded down) in every block."""
    model = fastvit_vit()
    counts = []
    fastvit.merge_tokens(model, 1000)
    model.transformer.layers[2][1].register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    model.transformer.layers[0][1].register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    with torch.no_grad():
        model(image())
    # 65 tokens (CLS + 64): 65 - 32 = 33, 33 - 16 = 17, 17 - 8 = 9
    assert counts == [33, 9]


# -- refusals, with reasons ----------------------------------------------------------------------


def test_unsupported_models_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="merge_tokens does not support Linear"):
        fastvit.merge_tokens(nn.Linear(4, 4), 2)
    from fastvit.models.registry import get_model_entry

    torch.manual_seed(0)
    cvt = fastvit.create_model("cvt_13", **get_model_entry("cvt_13").test_overrides)
    with pytest.raises(ValueError, match="CvT is not one of the supported models.*token grid"):
        fastvit.merge_tokens(cvt, 2)
    with pytest.raises(ValueError, match="merge_tokens does not support Recorder: supported are"):
        fastvit.merge_tokens(fastvit.Recorder(fastvit_vit()), 2)
    external = EfficientViT(image_size=32, patch_size=4, num_classes=10, dim=32,
                            transformer=nn.Sequential(nn.Linear(32, 32)))
    with pytest.raises(ValueError, match="not fastvit's Transformer"):
        fastvit.merge_tokens(external, 2)
    features = fastvit.create_model("vit_small_patch16_224", features_only=True, image_size=32, patch_size=8,
                                    dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)
    with pytest.raises(ValueError, match="features_only"):
        fastvit.merge_tokens(features, 2)


def test_bad_r_is_refused():
    model = fastvit_vit()
    for bad in (-1, True, 1.5, [1, -2, 3], "4"):
        with pytest.raises(ValueError, match="non-negative int"):
            fastvit.merge_tokens(model, bad)
    with pytest.raises(ValueError, match="2 values for the 3 blocks"):
        fastvit.merge_tokens(model, [1, 2])
    assert not is_merging(model)


def test_forward_intermediates_is_refused_while_merging():
    model = fastvit_vit()
    x = image()
    fastvit.merge_tokens(model, 4)
    with pytest.raises(ValueError, match="forward_intermediates.*fewer tokens than patches"):
        model.forward_intermediates(x)
    fastvit.merge_tokens(model, None)
    assert len(model.forward_intermediates(x, intermediates_only=True)) == 3

    vit = timm_model()
    fastvit.merge_tokens(vit, 4)
    with pytest.raises(ValueError, match="forward_intermediates"):
        vit.forward_intermediates(x)
    with pytest.raises(ValueError, match="attn_mask"):
        vit(x, attn_mask=torch.zeros(65, 65))
    fastvit.merge_tokens(vit, None)
    vit.forward_intermediates(x)


def test_timm_refusals_name_the_reason():
    timm = pytest.importorskip("timm")
    small = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="relative position bias"):
        fastvit.merge_tokens(timm.create_model("beit_base_patch16_224", **small), 2)
    with pytest.raises(ValueError, match="rotary position embeddings"):
        fastvit.merge_tokens(timm.create_model("eva02_tiny_patch14_224", **dict(small, img_size=28, patch_size=7)),
                             2)
    with pytest.raises(ValueError, match="register tokens"):
        fastvit.merge_tokens(timm.create_model("vit_small_patch16_224", reg_tokens=4, **small), 2)
    with pytest.raises(ValueError, match="global_pool='map'"):
        fastvit.merge_tokens(timm.create_model("vit_small_patch16_224", global_pool="map", **small), 2)
    with pytest.raises(ValueError, match="features_only"):
        fastvit.merge_tokens(timm.create_model("vit_small_patch16_224", features_only=True, **dict(small, depth=3)), 2)
    with pytest.raises(ValueError, match="not in the VisionTransformer family"):
        fastvit.merge_tokens(timm.create_model("resnet18", pretrained=False), 2)


def test_mae_and_simmim_merge_their_encoder_for_inference_only():
    torch.manual_seed(0)
    for wrapper in (lambda enc: fastvit.MAE(encoder=enc, decoder_dim=32, masking_ratio=0.5),
                    lambda enc: SimMIM(encoder=enc, masking_ratio=0.5)):
        pretrain = wrapper(fastvit.ViT(**FASTVIT))
        x = image()
        pretrain(x).backward()
        fastvit.merge_tokens(pretrain, 8)
        with torch.no_grad():
            assert pretrain.encoder.forward_features(x).shape[1] == tokens_left(N_PATCHES + 1, [8] * 3, 1)
        with pytest.raises(ValueError, match="pre-training loss needs one encoded token per patch"):
            pretrain(x)
        fastvit.merge_tokens(pretrain, None)
        assert torch.isfinite(pretrain(x))


# -- training: gradients, checkpointing, compile --------------------------------------------------


@pytest.mark.parametrize("case", ["vit", "deepvit", "cait", "timm-patched"])
def test_gradients_flow_through_merging(case):
    model = timm_model(patched=True) if case == "timm-patched" else _models()[case]
    model.train()
    fastvit.merge_tokens(model, 6)
    x = image().requires_grad_()
    model(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.numel() and p.grad is None]
    assert not missing, f"{case}: no gradient for {missing[:5]}"


def test_grad_checkpointing_gives_the_same_gradients():
    model = fastvit_vit()
    fastvit.merge_tokens(model, 6)
    x = image()
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(plain, model.parameters()):
        assert_close(p.grad, g, atol=1e-6, rtol=1e-5, what="checkpointed gradient")


def test_compile_fullgraph_of_a_merged_vit():
    """A graph break raises under fullgraph=True; forward and backward trace through the matching."""
    model = fastvit_vit()
    fastvit.merge_tokens(model, [4, 8, 4])
    x = image()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        assert_close(out, model(x), atol=1e-5, rtol=1e-5, what="compiled merged ViT")
        out.sum().backward()
    finally:
        torch._dynamo.reset()
    assert all(p.grad is not None for p in model.parameters() if p.numel())
