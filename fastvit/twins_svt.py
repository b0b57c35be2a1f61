"""vit-pytorch module path ``vit_pytorch.twins_svt``."""

from fastvit.models.twins_svt import (
    PEG,
    GlobalAttention,
    LocalAttention,
    PatchEmbedding,
    Residual,
    Transformer,
    TwinsSVT,
)

__all__ = ["TwinsSVT", "LocalAttention", "GlobalAttention", "Transformer", "PatchEmbedding", "PEG", "Residual"]
