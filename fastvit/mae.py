"""vit-pytorch module path ``vit_pytorch.mae``."""

from fastvit.ssl.mae import MAE

__all__ = ["MAE"]
