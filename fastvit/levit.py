"""vit-pytorch module path ``vit_pytorch.levit``."""

from fastvit.models.levit import Attention, FeedForward, LeViT, Transformer

__all__ = ["LeViT", "Attention", "Transformer", "FeedForward"]
