"""The reference attention: materialise the logits, softmax, multiply. The oracle of every test.

It is also the fastest path on a CPU at short sequences (the score matrix of a ViT layer stays in
cache), so auto dispatch uses it there. It serves every declared input: all biases, head mixing,
full probabilities, CLS probabilities, dropout, windows (gathered into a batch by ``partitioned``),
packed sequences (one call per sequence, ``packed.per_sequence``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bias import ADDITIVE, KeyPaddingMask, RelPosBias
from .inputs import AttnInputs, AttnOutput
from .packed import per_sequence
from .partition import partitioned

__all__ = ["reference_attention"]


def reference_attention(inp: AttnInputs) -> AttnOutput:
    if inp.window is not None:  # windows gathered into a batch, attended, scattered back
        return partitioned(inp, reference_attention, fold_scale=True)
    if inp.packed is not None:  # one call per sequence, outputs concatenated
        return per_sequence(inp, reference_attention)
    q, k, v = inp.q, inp.k, inp.v
    # (b, h, nq, nk). Scaling q (n*d elements) instead of the logits (n*n) saves a pass over the
    # score matrix; the results differ from vit-pytorch's order by rounding only (~1e-7 in fp32).
    # k is usually a strided view of a fused qkv projection: a row-wise copy of it, multiplied
    # transposed, is cheaper than the column-wise copy matmul makes of k^T. A scale of 1 (windowed calls
    # fold the scale into their copy of q) skips the pass over q.
    logits = torch.matmul(q if inp.scale == 1.0 else q * inp.scale, k.contiguous().transpose(-1, -2))

    valid = None  # (b, 1, 1, nk) bool
    for b in inp.bias:
        if isinstance(b, RelPosBias):
            logits = logits + b.materialize().to(logits.dtype)
        elif isinstance(b, ADDITIVE):  # DenseBias, KeyBias
            logits = logits + b.materialize().to(logits.dtype)
        elif isinstance(b, KeyPaddingMask):
            m = b.materialize()
            valid = m if valid is None else valid & m

    mix = inp.head_mix
    if mix is not None and mix.pre is not None:
        logits = _mix_heads(logits, mix.pre)

    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))

    # Low-precision logits are normalised in fp32, then cast back. The CPU's bf16 softmax kernel does
    # exactly that internally (fp32 max, exp and sum, one rounding at the end) without materialising
    # an fp32 copy of the map (1.6x faster at ViT-S's shape, equal but for rounding ties), so it runs as is.
    native = logits.dtype == torch.bfloat16 and logits.device.type == "cpu"
    if logits.dtype in (torch.float16, torch.bfloat16) and not native:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
    else:
        probs = torch.softmax(logits, dim=-1)
    if valid is not None:
        # A row with no valid key softmaxes -inf everywhere to NaN; its output is defined as zero.
        probs = probs.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)

    recorded = probs if inp.return_probs else None
    cls_probs = probs[:, :, 0, :] if inp.return_cls_probs else None

    attn = F.dropout(probs, p=inp.dropout_p, training=True) if inp.dropout_p > 0 else probs
    affine = None
    if mix is not None:
        norm = mix.post_norm
        if norm is not None and mix.post_bias is None and _is_head_layer_norm(norm, attn.shape[1]):
            # LayerNorm over heads (DeepViT), without a LayerNorm over a last dim of ~12 on a
            # permuted map (plus two permuting copies: a third of DeepViT's CPU time):
            # - centring is linear, so it folds into the mixing matrix (its columns minus their mean);
            # - the affine folds through "@ v" to the (b, h, nq, dv) output:
            #   (y * w + b) @ v = w * (y @ v) + b * sum_j v_j.
            post = mix.post
            if post is not None:
                attn = _mix_heads(attn, post - post.mean(dim=1, keepdim=True))
            else:
                attn = attn - attn.mean(dim=1, keepdim=True)
            # (vector_norm / var_mean over a non-innermost axis take a ~100x slower path on the CPU.)
            var = attn.float().square().mean(dim=1, keepdim=True)
            attn = attn * torch.rsqrt(var + norm.eps).to(attn.dtype)
            affine = (norm.weight, norm.bias)
        else:
            if mix.post is not None:
                attn = _mix_heads(attn, mix.post)
            if mix.post_bias is not None:
                attn = attn + mix.post_bias.to(attn.dtype).view(1, -1, 1, 1)
            if norm is not None:
                attn = norm(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (b, i, j, h) as declared

    out = torch.matmul(attn.to(v.dtype), v)
    if affine is not None:
        weight, shift = affine
        h = out.shape[1]
        if weight is not None:
            out = out * weight.to(out.dtype).view(1, h, 1, 1)
        if shift is not None:
            out = out + shift.to(out.dtype).view(1, h, 1, 1) * v.sum(dim=-2, keepdim=True)
    return AttnOutput(out, recorded, cls_probs)


def _is_head_layer_norm(norm, heads: int) -> bool:
    return isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (heads,)




def _mix_heads(x: Tensor, weight: Tensor) -> Tensor:
    """``einsum('bhij,hg->bgij')`` as one batched GEMM on the contiguous ``(b, h, i*j)`` view.

    The einsum's permuted output forces copies in the softmax and the ``@ v`` that follow; this
    form keeps every map contiguous (2-3x faster at CaiT's shapes on a CPU). It is an explicit
    ``bmm``: ``matmul`` of a 2-D weight that requires grad with a 3-D map folds into one
    ``(b*i*j, h)`` GEMM with two transposing copies of the map, ~11x slower, even under no_grad.
    """
    b, h, i, j = x.shape
    w = weight.t().to(x.dtype).unsqueeze(0).expand(b, h, h)
    return torch.bmm(w, x.reshape(b, h, i * j)).view(b, h, i, j)

