"""vit-pytorch module path ``vit_pytorch.simple_vit``."""

from fastvit.models.simple_vit import SimpleViT

__all__ = ["SimpleViT"]
