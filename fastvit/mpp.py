"""vit-pytorch module path ``vit_pytorch.mpp``."""

from fastvit.ssl.mpp import MPP, MPPLoss

__all__ = ["MPP", "MPPLoss"]
