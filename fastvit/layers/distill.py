"""``DistillTokenMixin``: the DeiT distillation token (Touvron et al., arXiv 2012.12877) on a ViT-like model.

vit-pytorch's ``DistillMixin``: ``forward(img, distill_token=None)`` returns the logits, or
``(logits, distill_out (b, dim))`` when a token ``(1, dim)`` is passed. The token is appended at the
end of the sequence after the position embedding (so it has no position), goes through the embedding
dropout and the transformer, and pooling ignores it. ``to_vit()`` returns the plain model with the same
constructor arguments and weights. The token itself lives in ``DistillWrapper`` (``fastvit.ssl``).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["DistillTokenMixin"]


class DistillTokenMixin:
    """Put first in the bases of a model with ``embed``, ``dropout``, ``transformer`` and ``forward_head``
    (``ViTStem`` models); ``plain_class`` is the model ``to_vit()`` builds."""

    plain_class: type

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args, self.kwargs = args, kwargs

    def forward(self, img: Tensor, distill_token: Optional[Tensor] = None):
        if distill_token is None:
            return super().forward(img)
        x = self.embed(img)  # (b, num_cls + n, dim), positions added
        tokens = distill_token.reshape(1, 1, -1).expand(x.shape[0], -1, -1)  # (b, 1, dim)
        x = self.transformer(self.dropout(torch.cat((x, tokens), dim=1)))
        x, distill_out = x[:, :-1], x[:, -1]
        return self.forward_head(x), distill_out

    def to_vit(self):
        """The plain model with this model's constructor arguments and (copied) weights; module
        arguments (``transformer=``) are deep-copied, so the two models are independent."""
        kwargs = {k: copy.deepcopy(v) if isinstance(v, nn.Module) else v for k, v in self.kwargs.items()}
        v = self.plain_class(*self.args, **kwargs)
        v.load_state_dict(self.state_dict())
        return v
