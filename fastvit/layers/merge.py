"""Token merging: bipartite soft matching, size-weighted merging, proportional attention.

"Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv 2210.09461), as the authors'
code (``tome.merge``) computes it. In each block, after the attention residual and before the MLP:

1. the metric is the block's keys averaged over heads, ``(b, n, d_head)``, L2-normalised;
2. tokens alternate into A (even positions) and B (odd positions); each A token's match is the B
   token of highest cosine similarity. The class token (A's first) is never a source and the
   distillation token (B's first) never a destination: their similarities are ``-inf``;
3. the ``r`` A tokens with the most similar matches are merged into them: a merged token is the
   size-weighted mean of its parts and its size their sum (a patch has size 1). The result is
   ``[unmerged A, all of B]``; the unmerged A tokens keep their order when there is a class token
   (which stays first) and are otherwise in descending order of similarity, as in the authors' code
   (the next block's A/B split depends on this layout). With a distillation token:
   ``[CLS, DIST, the rest]``;
4. later attentions add ``log(size)`` of each key to the logits (proportional attention), so a
   merged token weighs as the patches it stands for (``proportional_attention_bias``).

``r`` is clamped to half the mergeable tokens. Matching is a few batched tensor ops (no loop over
tokens or images) on detached keys, so no gradient flows through the choice; merging is a gather and
a ``scatter_reduce`` and is differentiable.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastvit.attention import KeyBias

__all__ = ["Matching", "clamp_r", "bipartite_soft_matching", "merge", "merge_wavg", "proportional_attention_bias"]


class Matching(NamedTuple):
    """Which tokens one block merges (indices ``(b, k, 1)``, ready to expand over channels).

    Attributes:
        unmerged: positions in A of the tokens that stay, in their output order.
        src: positions in A of the ``r`` merged tokens.
        dst: positions in B of their matches.
        distill_token: the output is ``[CLS, DIST, ...]`` (the distillation token is B's first).
    """

    unmerged: Tensor
    src: Tensor
    dst: Tensor
    distill_token: bool


def clamp_r(r: int, num_tokens: int, num_protected: int) -> int:
    """The tokens a block with ``num_tokens`` tokens really removes: at most half the mergeable ones."""
    return max(0, min(int(r), (num_tokens - num_protected) // 2))


def bipartite_soft_matching(metric: Tensor, r: int, *, class_token: bool = False,
                            distill_token: bool = False) -> Optional[Matching]:
    """Match the A tokens (even positions) to the B tokens (odd positions); pick the ``r`` best.

    Args:
        metric: ``(b, n, c)`` the keys averaged over heads (normalised here; no gradient flows).
        r: tokens to remove (clamped by ``clamp_r``).
        class_token: token 0 is a class token, never merged; it stays first.
        distill_token: token 1 is a distillation token, never merged into (needs ``class_token``).

    Returns:
        the ``Matching``, or ``None`` when the clamped ``r`` is 0 (nothing to merge).
    """
    if distill_token and not class_token:
        raise ValueError("a distillation token is protected at position 1, after the class token: "
                         "pass class_token=True with it")
    r = clamp_r(r, metric.shape[1], int(class_token) + int(distill_token))
    if r == 0:
        return None
    metric = metric.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]  # (b, na, c), (b, nb, c)
    scores = a @ b.transpose(-1, -2)  # (b, na, nb) cosine similarities
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    best, best_idx = scores.max(dim=-1)  # (b, na): each A token's match in B
    # A stable sort: ties (rare with real keys) go to the earlier token, so the result is deterministic.
    order = best.sort(dim=-1, descending=True, stable=True).indices  # (b, na)
    unmerged, src = order[:, r:], order[:, :r]
    dst = best_idx.gather(-1, src)  # (b, r)
    if class_token:  # original order, so the class token (similarity -inf, never merged) comes first
        unmerged = unmerged.sort(dim=-1).values
    return Matching(unmerged[..., None], src[..., None], dst[..., None], distill_token)


def merge(matching: Matching, x: Tensor) -> Tensor:
    """Sum the merged A tokens of ``x (b, n, c)`` into their B matches: ``(b, n - r, c)``."""
    src, dst = x[:, ::2], x[:, 1::2]  # (b, na, c), (b, nb, c)
    b, na, c = src.shape
    r = matching.src.shape[1]
    unmerged = src.gather(1, matching.unmerged.expand(b, na - r, c))  # (b, na - r, c)
    src = src.gather(1, matching.src.expand(b, r, c))  # (b, r, c)
    dst = dst.scatter_reduce(1, matching.dst.expand(b, r, c), src, reduce="sum")  # (b, nb, c)
    if matching.distill_token:
        return torch.cat((unmerged[:, :1], dst[:, :1], unmerged[:, 1:], dst[:, 1:]), dim=1)
    return torch.cat((unmerged, dst), dim=1)


def merge_wavg(matching: Matching, x: Tensor, size: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Size-weighted merge: ``x (b, n, c)`` and ``size (b, n, 1)`` (None: every token a patch, size 1)
    -> the merged tokens ``(b, n - r, c)`` (weighted means) and their sizes ``(b, n - r, 1)`` (sums)."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    x = merge(matching, x * size)
    size = merge(matching, size)
    return x / size, size


def proportional_attention_bias(size: Tensor, pre_softmax_head_mix: Optional[Tensor] = None) -> KeyBias:
    """``log(size)`` of each key, added to every query's logits: ``KeyBias (b, nk)``.

    Args:
        size: ``(b, nk, 1)`` the keys' sizes.
        pre_softmax_head_mix: ``(h, h)`` talking heads that mix the logits across heads after the bias
            is added (CaiT's ``mix_heads_pre_attn``, ``einsum('bhij,hg->bgij')``). The bias is then per
            head, ``c_h * log(size)`` with ``W^T c = 1``, so that after the mixing every head's logits
            carry exactly ``+ log(size)``: proportional attention right before the softmax.
    """
    log_size = size[..., 0].log()  # (b, nk)
    if pre_softmax_head_mix is None:
        return KeyBias(log_size)  # (b, nk): broadcast over heads and queries
    w = pre_softmax_head_mix.to(log_size.dtype)
    c = torch.linalg.solve(w.transpose(0, 1), torch.ones_like(w[:, 0]))  # (h,)
    return KeyBias(c[None, :, None] * log_size[:, None, :])  # (b, h, nk)
