"""DistillableT2TViT and DistillableEfficientViT: the DeiT distillation token (Touvron et al.,
arXiv 2012.12877) on T2T-ViT and on the pluggable-transformer ViT.

They behave as ``DistillableViT`` (``fastvit.models.distill``): ``forward(img, distill_token=None)``
returns the logits, or ``(logits, distill_out (b, dim))`` when a token ``(1, dim)`` is passed; the
token is appended at the end of the sequence after the position embedding (so it has no position)
and pooling ignores it; ``to_vit()`` returns the plain model with the same weights. The token itself
lives in ``DistillWrapper`` (``fastvit.ssl``), which reads ``student.dim`` / ``student.num_classes``.

Deliberate differences from vit-pytorch:

- They work. vit-pytorch 1.26.x's ``DistillMixin`` was rewritten for ViT's 2-D ``cls_token`` and
  fails on these two models' 3-D one (``EinopsError`` on ``'n d -> b n d'``). fastvit follows the
  mixin's semantics (embedding dropout after the token is appended for T2T; none for the pluggable
  ViT, which has no embedding dropout).
- ``to_vit()`` returns an independent model: module arguments (``transformer=``) are deep-copied;
  vit-pytorch would hand the same transformer object to both models.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .efficient import ViT as EfficientViT
from .t2t import T2TViT

__all__ = ["DistillableT2TViT", "DistillableEfficientViT"]


class _DistillTokenMixin:
    """``forward(img, distill_token=None)`` and ``to_vit()`` on a model with ``embed``/``forward_head``."""

    _plain_class: type

    def _remember_args(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs

    def _attend(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, img: Tensor, distill_token: Optional[Tensor] = None):
        if distill_token is None:
            return super().forward(img)
        x = self.embed(img)  # (b, 1 + n, dim), positions added
        tokens = distill_token.reshape(1, 1, -1).expand(x.shape[0], -1, -1)  # (b, 1, dim)
        x = self._attend(torch.cat((x, tokens), dim=1))
        x, distill_out = x[:, :-1], x[:, -1]
        return self.forward_head(x), distill_out

    def to_vit(self):
        """The plain model with this model's constructor arguments and (copied) weights."""
        kwargs = {k: copy.deepcopy(v) if isinstance(v, nn.Module) else v for k, v in self.kwargs.items()}
        v = self._plain_class(*self.args, **kwargs)
        v.load_state_dict(self.state_dict())
        return v


class DistillableT2TViT(_DistillTokenMixin, T2TViT):
    """``T2TViT`` whose forward also accepts ``distill_token (1, dim)``; same constructor as ``T2TViT``."""

    _plain_class = T2TViT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._remember_args(args, kwargs)

    def _attend(self, x: Tensor) -> Tensor:
        return self.transformer(self.dropout(x))


class DistillableEfficientViT(_DistillTokenMixin, EfficientViT):
    """The pluggable ``efficient.ViT`` whose forward also accepts ``distill_token (1, dim)``."""

    _plain_class = EfficientViT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._remember_args(args, kwargs)

    def _attend(self, x: Tensor) -> Tensor:
        return self.transformer(x)
