"""vit-pytorch module path ``vit_pytorch.cross_vit``."""

from fastvit.models.cross_vit import (
    Attention,
    CrossTransformer,
    CrossViT,
    ImageEmbedder,
    MultiScaleEncoder,
    Transformer,
)

__all__ = ["CrossViT", "Attention", "Transformer", "CrossTransformer", "MultiScaleEncoder", "ImageEmbedder"]
