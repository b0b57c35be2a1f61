"""vit-pytorch module path ``vit_pytorch.dino``."""

from fastvit.ssl.dino import MLP, Dino, L2Norm, NetWrapper, RandomApply, loss_fn

__all__ = ["Dino", "NetWrapper", "MLP", "L2Norm", "RandomApply", "loss_fn"]
