"""vit-pytorch module path ``vit_pytorch.nest``."""

from fastvit.models.nest import Aggregate, Attention, NesT, Transformer

__all__ = ["NesT", "Attention", "Transformer", "Aggregate"]
