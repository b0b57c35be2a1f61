"""DistillableViT: DeiT-style distillation token (Touvron et al., arXiv 2012.12877).

As in vit-pytorch, the distillation token is appended at the end of the sequence after the
position embedding (so it has no position), pooling ignores it, and ``to_vit()`` returns a plain
``ViT`` with the same weights. The token itself lives in ``DistillWrapper`` (``fastvit.ssl``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .vit import ViT

__all__ = ["DistillableViT"]


class DistillableViT(ViT):
    """``ViT`` whose forward also accepts ``distill_token (1, dim)``; same constructor as ``ViT``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args, self.kwargs = args, kwargs

    def forward(self, img: Tensor, distill_token: Optional[Tensor] = None):
        if distill_token is None:
            return super().forward(img)
        x = self.embed(img)
        tokens = distill_token.reshape(1, 1, -1).expand(x.shape[0], -1, -1)  # (b, 1, dim)
        x = torch.cat((x, tokens), dim=1)
        x = self.transformer(self.dropout(x))
        x, distill_out = x[:, :-1], x[:, -1]
        return self.forward_head(x), distill_out

    def to_vit(self) -> ViT:
        """A plain ``ViT`` with this model's constructor arguments and weights."""
        v = ViT(*self.args, **self.kwargs)
        v.load_state_dict(self.state_dict())
        return v
