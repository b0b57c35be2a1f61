"""vit-pytorch module path ``vit_pytorch.t2t``."""

from fastvit.models.t2t import RearrangeImage, T2TViT, conv_output_size

__all__ = ["T2TViT", "RearrangeImage", "conv_output_size"]
