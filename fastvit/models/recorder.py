"""Recorder: the post-softmax attention maps of every attention layer (vit-pytorch's API).

While wrapped, every fastvit attention module (``AttentionBase``) asks ``attend()`` for its
probabilities, which routes those calls to a backend that materialises them (the reference).
Unlike vit-pytorch, this works for every fastvit architecture, not only ``vit.ViT``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastvit.layers.attention import AttentionBase

__all__ = ["Recorder"]


class Recorder(nn.Module):
    """Wrap a model; ``forward(img)`` returns ``(preds, attns)``.

    ``attns`` is ``(b, layers, heads, n, n)`` when all layers share a shape (ViT), otherwise a list
    of ``(b, heads, nq, nk)`` tensors in module order (multi-stage models); ``None`` if the model has
    no attention layer. ``eject()`` returns the original model.
    """

    def __init__(self, vit: nn.Module, device: Optional[torch.device] = None):
        super().__init__()
        self.vit = vit
        self.device = device
        self.ejected = False
        self._layers = [m for m in vit.modules() if isinstance(m, AttentionBase)]

    def _set(self, on: bool) -> None:
        for m in self._layers:
            m.record_attention = on
            m.recorded_attention = None

    def forward(self, img: Tensor, *args, **kwargs) -> tuple[Tensor, Union[Tensor, list, None]]:
        if self.ejected:
            raise RuntimeError("recorder has been ejected, cannot be used anymore")
        self._set(True)
        try:
            preds = self.vit(img, *args, **kwargs)
            target = self.device if self.device is not None else img.device
            maps = [m.recorded_attention.detach().to(target) for m in self._layers if m.recorded_attention is not None]
        finally:
            self._set(False)
        if not maps:
            return preds, None
        if all(m.shape == maps[0].shape for m in maps):
            return preds, torch.stack(maps, dim=1)
        return preds, maps

    def eject(self) -> nn.Module:
        self.ejected = True
        self._set(False)
        return self.vit
