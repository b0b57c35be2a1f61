"""vit-pytorch's ``distill`` module (``DistillableViT``, ``DistillableT2TViT``, ``DistillableEfficientViT``).

Each distillable model is defined next to its plain model (``vit.py``, ``t2t.py``, ``efficient.py``) on
``fastvit.layers.DistillTokenMixin``; this module only gathers them under vit-pytorch's module path.
"""

from .efficient import DistillableEfficientViT
from .t2t import DistillableT2TViT
from .vit import DistillableViT

__all__ = ["DistillableViT", "DistillableT2TViT", "DistillableEfficientViT"]
