"""vit-pytorch module path ``vit_pytorch.distill``."""

from fastvit.models.distill import DistillableViT
from fastvit.models.distill_variants import DistillableEfficientViT, DistillableT2TViT
from fastvit.ssl.distill import DistillWrapper

__all__ = ["DistillableViT", "DistillableT2TViT", "DistillableEfficientViT", "DistillWrapper"]
