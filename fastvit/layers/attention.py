"""Attention modules shared by the models. They build q, k, v and call ``attend()``; they never
branch on the backend.

``AttentionBase`` carries what every attention module needs: probability dropout that is off in
eval, the hook ``Recorder`` uses (``record_attention`` / ``recorded_attention``) and the head-mixing
hooks. The kinds, by what they attend to:

- ``Attention``: self-attention with one fused ``to_qkv`` (ViT, ATS-ViT, RegionViT, MobileViT, T2T);
  ``ReAttention`` adds DeepViT's head mixing after the softmax.
- ``ContextAttention``: ``to_q`` and ``to_kv`` apart, so keys and values may come from a context
  (CrossViT's cross attention); ``TalkingHeadsAttention`` adds CaiT's talking heads (its class
  attention).

Models whose projections have their own layout (LeViT, CvT, NesT, Twins-SVT, ...) subclass
``AttentionBase``, so their checkpoint keys stay vit-pytorch's while the attention call stays shared.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from fastvit.attention import HeadMix, attend

from .linear import Linear

__all__ = ["AttentionBase", "Attention", "ReAttention", "ContextAttention", "TalkingHeadsAttention",
           "split_heads", "split_qkv", "merge_heads"]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(b, n, h*d) -> (b, h, n, d)`` as a view."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def split_qkv(x: Tensor, heads: int, parts: int = 3) -> tuple:
    """A fused projection ``(b, n, parts*h*d)`` -> ``parts`` views ``(b, h, n, d)`` (q | k | v, or k | v
    with ``parts=2``); heads are the outer factor of each part, as in vit-pytorch's chunk + rearrange."""
    b, n, _ = x.shape
    return x.view(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """``(b, h, n, d) -> (b, n, h*d)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class AttentionBase(nn.Module):
    """Base of every fastvit attention module.

    Args:
        attn_dropout: dropout on the attention probabilities, applied only in training.
    """

    def __init__(self, attn_dropout: float = 0.0):
        super().__init__()
        self.attn_dropout = attn_dropout
        # Set by Recorder: the next forward keeps the post-softmax probabilities (b, h, nq, nk).
        self.record_attention = False
        self.recorded_attention: Optional[Tensor] = None

    def build_head_mix(self, heads: int) -> None:
        """Parameters that mix heads (``ReAttention``, ``TalkingHeadsAttention``), created where
        vit-pytorch creates them: after the q/k/v projections, before ``to_out``."""

    def head_mix(self) -> Optional[HeadMix]:
        """The head mixing ``attend()`` applies (None: plain attention)."""
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kwargs):
        """``attend()`` with this module's dropout and recording; returns what ``attend`` returns."""
        record = self.record_attention
        wants_extra = kwargs.get("return_cls_probs", False)
        result = attend(
            q, k, v,
            dropout_p=self.attn_dropout if self.training else 0.0,
            return_probs=record,
            **kwargs,
        )
        if record:
            self.recorded_attention = result.probs
            if not wants_extra:
                return result.out
        return result


class Attention(AttentionBase):
    """vit-pytorch's multi-head self-attention (pre-norm inside), with its key layout.

    Keys: ``norm``, ``to_qkv`` (no bias), ``to_out.0`` (omitted when ``heads == 1`` and
    ``dim_head == dim``, as in vit-pytorch's ViT). Subclasses that mix heads (``ReAttention``) add
    their parameters in ``build_head_mix`` and declare them in ``head_mix``.

    Args:
        dim: token width.
        heads: number of heads.
        dim_head: width of each head (``heads * dim_head`` may differ from ``dim``).
        dropout: dropout on the probabilities and on the output projection.
        norm: whether the block owns its pre-norm (vit-pytorch >= 1.4 layout).
        out_bias: bias on the output projection (SimpleViT has none, and no output dropout).
        project_out: force the output projection on or off (None: ViT's rule above).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, norm: bool = True,
                 out_bias: bool = True, project_out: Optional[bool] = None):
        super().__init__(attn_dropout=dropout)
        inner_dim = dim_head * heads
        if project_out is None:
            project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.to_qkv = Linear(dim, inner_dim * 3, bias=False)
        self.build_head_mix(heads)
        self.to_out = output_projection(inner_dim, dim, dropout, project_out, out_bias)

    def forward(self, x: Tensor, bias=None) -> Tensor:
        """``x (b, n, dim)``; ``bias``: attention bias descriptors for ``attend`` (RegionViT's relative positions)."""
        q, k, v = split_qkv(self.to_qkv(self.norm(x)), self.heads)  # (b, h, n, d) each
        out = self.attend(q, k, v, scale=self.scale, bias=bias, head_mix=self.head_mix())
        return self.to_out(merge_heads(out))


class ReAttention(Attention):
    """DeepViT's re-attention (vit-pytorch's ``deepvit.Attention``): the post-softmax maps are mixed
    across heads by ``reattn_weights (h, h)`` and normalised by a LayerNorm over the head axis.

    Keys as ``Attention`` plus ``reattn_weights``, ``reattn_norm.1``; ``to_out.0`` always.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, out_bias: bool = True):
        super().__init__(dim, heads, dim_head, dropout, out_bias=out_bias, project_out=True)

    def build_head_mix(self, heads: int) -> None:
        self.reattn_weights = nn.Parameter(torch.randn(heads, heads))
        # Kept as vit-pytorch's Sequential (keys reattn_norm.1.*, and it still works standalone on
        # (b, h, i, j) maps); attend() applies its LayerNorm to the (b, i, j, h) view itself.
        self.reattn_norm = nn.Sequential(
            Rearrange("b h i j -> b i j h"),
            nn.LayerNorm(heads),
            Rearrange("b i j h -> b h i j"),
        )

    def head_mix(self) -> HeadMix:
        return HeadMix(post=self.reattn_weights, post_norm=self.reattn_norm[1])


class ContextAttention(AttentionBase):
    """Attention with ``to_q`` and ``to_kv`` apart, so keys and values may come from a context:
    self-attention without one, cross / class attention with one (CrossViT's ``Attention``).

    The queries ``x`` are normed; a given context is not (it leaves a normed encoder already, or is
    CaiT's patch stream). Keys: ``norm``, ``to_q``, ``to_kv`` (no bias), ``to_out.0``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, out_bias: bool = True):
        super().__init__(attn_dropout=dropout)
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = Linear(dim, inner_dim, bias=False)
        self.to_kv = Linear(dim, inner_dim * 2, bias=False)
        self.build_head_mix(heads)
        self.to_out = output_projection(inner_dim, dim, dropout, True, out_bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, kv_include_self: bool = False) -> Tensor:
        """``x (b, n, dim)`` queries; ``context (b, m, dim)`` keys/values (None: ``x``); with
        ``kv_include_self`` the keys/values are ``[norm(x); context]`` (a CLS token attends to itself too)."""
        x = self.norm(x)
        if context is None:
            context = x
        elif kv_include_self:
            context = torch.cat((x, context), dim=1)  # (b, n + m, dim)
        q = split_heads(self.to_q(x), self.heads)  # (b, h, n, d)
        k, v = split_qkv(self.to_kv(context), self.heads, parts=2)  # (b, h, m, d) each
        out = self.attend(q, k, v, scale=self.scale, head_mix=self.head_mix())  # (b, h, n, d)
        return self.to_out(merge_heads(out))


class TalkingHeadsAttention(ContextAttention):
    """CaiT's attention (vit-pytorch's ``cait.Attention``): talking heads, ``mix_heads_pre_attn`` and
    ``mix_heads_post_attn`` ``(h, h)`` mixing the logits and the probabilities across heads. Class
    attention is ``forward(cls, context=patches, kv_include_self=True)``."""

    def build_head_mix(self, heads: int) -> None:
        self.mix_heads_pre_attn = nn.Parameter(torch.randn(heads, heads))
        self.mix_heads_post_attn = nn.Parameter(torch.randn(heads, heads))

    def head_mix(self) -> HeadMix:
        return HeadMix(pre=self.mix_heads_pre_attn, post=self.mix_heads_post_attn)


def output_projection(inner_dim: int, dim: int, dropout: float, project_out: bool, bias: bool) -> nn.Module:
    """vit-pytorch's ``to_out``: ``Sequential(Linear, Dropout)`` (key ``to_out.0``), a bias-free Linear
    without dropout (SimpleViT), or nothing when the heads already have the model's width."""
    if not project_out:
        return nn.Identity()
    if bias:
        return nn.Sequential(Linear(inner_dim, dim), nn.Dropout(dropout))
    return Linear(inner_dim, dim, bias=False)
