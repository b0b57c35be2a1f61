"""vit-pytorch module path ``vit_pytorch.distill``."""

from fastvit.models.distill import DistillableViT
from fastvit.ssl.distill import DistillWrapper

__all__ = ["DistillableViT", "DistillWrapper"]
