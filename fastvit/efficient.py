"""vit-pytorch module path ``vit_pytorch.efficient``."""

from fastvit.models.efficient import ViT

__all__ = ["ViT"]
