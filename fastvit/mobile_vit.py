"""vit-pytorch module path ``vit_pytorch.mobile_vit``."""

from fastvit.models.mobile_vit import MobileViT, MobileViTBlock, MV2Block, conv_1x1_bn, conv_nxn_bn

__all__ = ["MobileViT", "MobileViTBlock", "MV2Block", "conv_1x1_bn", "conv_nxn_bn"]
