"""vit-pytorch module path ``vit_pytorch.cait``."""

from fastvit.models.cait import CaiT, LayerScale, TalkingHeadsAttention, Transformer

__all__ = ["CaiT", "LayerScale", "TalkingHeadsAttention", "Transformer"]
