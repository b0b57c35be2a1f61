"""MobileViT: v1's transformer blocks are ``timm.layers.Attention`` (``vit``). v2's separable linear
attention is refused: it has no softmax attention map for ``attend()`` to compute."""

from __future__ import annotations

from timm.models.mobilevit import LinearSelfAttention

from ._patch import refuses

refuses(LinearSelfAttention, "MobileViT v2's separable linear attention has no softmax attention map "
                             "(a softmax over the tokens of one context vector); left as timm's")
