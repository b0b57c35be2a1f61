"""vit-pytorch module path ``vit_pytorch.cvt``."""

from fastvit.models.cvt import Attention, ChanLayerNorm, CvT, DepthWiseConv2d, FeedForward, Transformer

__all__ = ["CvT", "ChanLayerNorm", "DepthWiseConv2d", "Attention", "Transformer", "FeedForward"]
