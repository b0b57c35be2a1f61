"""vit-pytorch module path ``vit_pytorch.cct``."""

from fastvit.models.cct import (
    CCT,
    Tokenizer,
    TransformerClassifier,
    cct_2,
    cct_4,
    cct_6,
    cct_7,
    cct_8,
    cct_14,
    cct_16,
)

__all__ = ["CCT", "Tokenizer", "TransformerClassifier", "cct_2", "cct_4", "cct_6", "cct_7", "cct_8", "cct_14",
           "cct_16"]
