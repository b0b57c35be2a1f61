"""The surface every fastvit model shares (timm-style), on top of lucidrains-style modules."""

from __future__ import annotations

from torch import Tensor, nn

from fastvit.compat.vit_pytorch import load_vit_pytorch_state_dict

__all__ = ["VisionModel"]


class VisionModel(nn.Module):
    """Base class: ``forward = forward_head(forward_features(img))`` and vit-pytorch checkpoint loading.

    Subclasses implement ``forward_features(img)`` and ``forward_head(features)``.
    """

    def forward_features(self, img: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, img: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(img))

    def load_vit_pytorch_state_dict(self, state_dict, strict: bool = True):
        """Load weights saved from the vit-pytorch 1.26.x model built with the same arguments.

        Raises:
            ValueError: naming the missing, unexpected and mis-shaped keys.
        """
        return load_vit_pytorch_state_dict(self, state_dict, strict=strict)
