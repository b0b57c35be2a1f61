"""Head mixing in the reference path: the batched-GEMM mixing equals the einsum, and the folded
LayerNorm over heads (DeepViT) equals a LayerNorm applied to the permuted map, forward and backward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from fastvit.attention import HeadMix, KeyPaddingMask, attend


def _inputs(b=2, h=4, nq=9, nk=11, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    q, k, v = leaf(b, h, nq, d), leaf(b, h, nk, d), leaf(b, h, nk, d)
    pre, post = leaf(h, h), leaf(h, h)
    norm = torch.nn.LayerNorm(h).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h, generator=g))
        norm.bias.copy_(torch.randn(h, generator=g))
    return q, k, v, pre, post, norm


def _textbook(q, k, v, scale, pre, post, norm, valid=None):
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if pre is not None:
        logits = torch.einsum("bhij,hg->bgij", logits, pre)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    attn = logits.float().softmax(dim=-1).to(q.dtype)
    if post is not None:
        attn = torch.einsum("bhij,hg->bgij", attn, post)
    if norm is not None:
        attn = norm(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return attn @ v


@pytest.mark.parametrize("variant", ["pre+post", "post+norm", "norm_only", "pre+post+norm+padding"])
def test_reference_head_mixing_matches_the_einsum_formulation(variant):
    q, k, v, pre, post, norm = _inputs()
    use_pre = pre if "pre" in variant else None
    use_post = post if "post" in variant else None
    use_norm = norm if "norm" in variant else None
    valid = None
    bias = None
    if "padding" in variant:
        valid = torch.ones(2, 11, dtype=torch.bool)
        valid[1, 6:] = False
        bias = KeyPaddingMask(valid)
    out = attend(q, k, v, scale=0.3, bias=bias, head_mix=HeadMix(pre=use_pre, post=use_post, post_norm=use_norm),
                 backend="reference")
    leaves = [t for t in (q, k, v, use_pre, use_post, norm.weight, norm.bias) if t is not None]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    expected = _textbook(q, k, v, 0.3, use_pre, use_post, use_norm, valid)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out, allow_unused=True)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"{variant} forward")
    for i, (a, e) in enumerate(zip(grads, expected_grads)):
        if e is None:
            assert a is None or not a.abs().any(), f"{variant}: leaf {i} got a gradient it should not"
            continue
        assert_close(a, e, atol=1e-4, rtol=1e-4, what=f"{variant} grad of leaf {i}")


def test_a_norm_that_is_not_a_layer_norm_gets_the_permuted_map():
    q, k, v, _, post, norm = _inputs()
    seen = []

    def custom(t):
        seen.append(tuple(t.shape))
        return norm(t)

    out = attend(q, k, v, head_mix=HeadMix(post=post, post_norm=custom), backend="reference")
    assert seen == [(2, 9, 11, 4)]  # (b, i, j, h), as HeadMix declares
    folded = attend(q, k, v, head_mix=HeadMix(post=post, post_norm=norm), backend="reference")
    assert_close(out, folded, atol=1e-5, rtol=1e-5, what="custom callable vs folded LayerNorm")


def test_folded_layer_norm_in_bf16_stays_close_to_fp32():
    q, k, v, _, post, norm = _inputs()
    ref = attend(q, k, v, head_mix=HeadMix(post=post, post_norm=norm), backend="reference")
    qb, kb, vb, _, postb, normb = _inputs(dtype=torch.bfloat16)
    out = attend(qb, kb, vb, head_mix=HeadMix(post=postb, post_norm=normb), backend="reference")
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, atol=6e-2, rtol=6e-2, what="bf16 folded LayerNorm")


@pytest.mark.parametrize("with_norm", [False, True])
def test_post_bias_is_added_to_every_mixed_probability(with_norm):
    # CaiT's talking heads: Linear(H, H) with a bias after the softmax (the post-softmax bias reaches
    # the output as post_bias[h] * sum_j v[j]).
    q, k, v, pre, post, norm = _inputs()
    post_bias = torch.randn(4, requires_grad=True)
    use_norm = norm if with_norm else None
    out = attend(q, k, v, head_mix=HeadMix(pre=pre, post=post, post_bias=post_bias, post_norm=use_norm),
                 backend="reference")
    logits = torch.einsum("bhij,hg->bgij", torch.einsum("bhid,bhjd->bhij", q, k) * 8 ** -0.5, pre)
    attn = torch.einsum("bhij,hg->bgij", logits.softmax(dim=-1), post) + post_bias.view(1, 4, 1, 1)
    if use_norm is not None:
        attn = norm(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    expected = attn @ v
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad, expected_grad = (torch.autograd.grad(t.sum(), post_bias)[0] for t in (out, expected))
    assert_close(grad, expected_grad, atol=1e-4, rtol=1e-5)


def test_post_bias_must_be_a_vector_over_heads():
    with pytest.raises(ValueError, match=r"post_bias must be an \[H\] vector"):
        HeadMix(post_bias=torch.zeros(4, 4))
    q, k, v, *_ = _inputs()
    with pytest.raises(ValueError, match=r"HeadMix.post_bias is \(3,\) but q has 4 heads"):
        attend(q, k, v, head_mix=HeadMix(post_bias=torch.zeros(3)), backend="reference")
