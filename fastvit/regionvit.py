"""vit-pytorch module path ``vit_pytorch.regionvit``."""

from fastvit.models.regionvit import PEG, Attention, Downsample, FeedForward, R2LTransformer, RegionViT

__all__ = ["RegionViT", "R2LTransformer", "Attention", "Downsample", "PEG", "FeedForward"]
