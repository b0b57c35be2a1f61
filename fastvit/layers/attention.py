"""Attention modules shared by the models. They build q, k, v and call ``attend()``; they never
branch on the backend.

``AttentionBase`` carries what every attention module needs: probability dropout that is off in
eval, and the hook ``Recorder`` uses (``record_attention`` / ``recorded_attention``). Models whose
projections have their own layout (CaiT, CrossViT, LeViT, CvT, ...) subclass it, so their
checkpoint keys stay vit-pytorch's while the attention call stays shared.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastvit.attention import attend

from .linear import Linear

__all__ = ["AttentionBase", "Attention", "split_heads", "merge_heads"]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(b, n, h*d) -> (b, h, n, d)`` as a view."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


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
    ``dim_head == dim``, as in vit-pytorch).

    Args:
        dim: token width.
        heads: number of heads.
        dim_head: width of each head (``heads * dim_head`` may differ from ``dim``).
        dropout: dropout on the probabilities and on the output projection.
        norm: whether the block owns its pre-norm (vit-pytorch >= 1.4 layout).
        out_bias: bias on the output projection (SimpleViT has none, and no output dropout).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, norm: bool = True,
                 out_bias: bool = True):
        super().__init__(attn_dropout=dropout)
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.to_qkv = Linear(dim, inner_dim * 3, bias=False)
        if not project_out:
            self.to_out = nn.Identity()
        elif out_bias:
            self.to_out = nn.Sequential(Linear(inner_dim, dim), nn.Dropout(dropout))
        else:
            self.to_out = Linear(inner_dim, dim, bias=False)

    def forward(self, x: Tensor, bias=None) -> Tensor:
        """``x (b, n, dim)``; ``bias``: attention bias descriptors for ``attend`` (RegionViT's relative positions)."""
        x = self.norm(x)
        b, n, _ = x.shape
        # (b, n, 3*h*d) -> three (b, h, n, d) views; heads are the outer factor as in vit-pytorch.
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.attend(q, k, v, scale=self.scale, bias=bias)
        return self.to_out(merge_heads(out))
