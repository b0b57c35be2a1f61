"""vit-pytorch module path ``vit_pytorch.simmim``."""

from fastvit.ssl.simmim import SimMIM

__all__ = ["SimMIM"]
