"""vit-pytorch module path ``vit_pytorch.vit``."""

from fastvit.layers import Attention, FeedForward, Transformer
from fastvit.models.vit import ViT

__all__ = ["ViT", "Transformer", "Attention", "FeedForward"]
