"""vit-pytorch module path ``vit_pytorch.ats_vit``."""

from fastvit.layers import FeedForward
from fastvit.models.ats_vit import AdaptiveTokenSampling, Attention, Transformer, ViT

__all__ = ["ViT", "Transformer", "Attention", "AdaptiveTokenSampling", "FeedForward"]
