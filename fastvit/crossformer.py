"""vit-pytorch module path ``vit_pytorch.crossformer``."""

from fastvit.models.crossformer import (
    Attention,
    CrossEmbedLayer,
    CrossFormer,
    DynamicPositionBias,
    FeedForward,
    Transformer,
)

__all__ = ["CrossFormer", "CrossEmbedLayer", "DynamicPositionBias", "Attention", "Transformer", "FeedForward"]
