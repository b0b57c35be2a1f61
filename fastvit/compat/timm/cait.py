"""CaiT: class attention (one query, the class token, over all tokens) and talking-heads attention.

Talking heads mix the logits across heads before the softmax (``proj_l``) and the probabilities
after it (``proj_w``): ``HeadMix(pre=proj_l.weight.T, post=proj_w.weight.T, post_bias=proj_w.bias)``.
``proj_l``'s bias is constant along the keys, so it cancels in the softmax. timm drops the
probabilities after ``proj_w`` where ``HeadMix`` drops them before ``post``: training with
attention dropout runs timm's forward.
"""

from __future__ import annotations

import torch
from timm.models.cait import ClassAttn as TimmClassAttn
from timm.models.cait import TalkingHeadAttn as TimmTalkingHeadAttn
from torch import Tensor

from fastvit.attention import HeadMix, attend
from fastvit.layers import merge_heads, split_heads, split_qkv

from ._patch import Patched, patches


def class_attention(m, x: Tensor, to_q, to_k, to_v) -> Tensor:
    """Attention of the class token (query 0) over all tokens: ``(b, n, c) -> (b, 1, c)``."""
    q = split_heads(to_q(x[:, :1]), m.num_heads)  # (b, h, 1, d)
    k, v = split_heads(to_k(x), m.num_heads), split_heads(to_v(x), m.num_heads)  # (b, h, n, d)
    out = attend(q, k, v, scale=m.scale, dropout_p=m.attn_dropout())
    return m.proj_drop(m.proj(merge_heads(out)))


@patches(TimmClassAttn)
class ClassAttn(Patched, TimmClassAttn):
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x)
        return class_attention(self, x, self.q, self.k, self.v)


@patches(TimmTalkingHeadAttn)
class TalkingHeadAttn(Patched, TimmTalkingHeadAttn):
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x)
        if self.training and self.attn_drop.p > 0:
            return self.fallback("attention dropout after the post-softmax head mix (HeadMix drops before it)", x)
        q, k, v = split_qkv(self.qkv(x), self.num_heads)  # (b, h, n, d)
        mix = HeadMix(pre=self.proj_l.weight.t(), post=self.proj_w.weight.t(), post_bias=self.proj_w.bias)
        x = merge_heads(attend(q, k, v, scale=self.scale, head_mix=mix))
        bias_l = self.proj_l.bias
        if bias_l is not None and bias_l.requires_grad and torch.is_grad_enabled():
            # proj_l's bias cancels in the softmax: timm's gradient for it is zero (to rounding). It
            # stays in the graph with an exact zero gradient, so DDP and weight decay see it as timm does.
            x = x + 0.0 * bias_l.sum()
        return self.proj_drop(self.proj(x))
