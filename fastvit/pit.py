"""vit-pytorch module path ``vit_pytorch.pit``."""

from fastvit.models.pit import DepthWiseConv2d, PiT, Pool

__all__ = ["PiT", "Pool", "DepthWiseConv2d"]
