"""vit-pytorch module path ``vit_pytorch.recorder``."""

from fastvit.models.recorder import Recorder

__all__ = ["Recorder"]
