"""vit-pytorch module path ``vit_pytorch.deepvit``."""

from fastvit.models.deepvit import DeepViT, ReAttention, Transformer

__all__ = ["DeepViT", "ReAttention", "Transformer"]
