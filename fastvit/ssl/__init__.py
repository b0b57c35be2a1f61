"""Training wrappers: distillation and the self-supervised learners (MAE, SimMIM, MPP, Dino)."""

from .dino import Dino
from .distill import DistillWrapper
from .mae import MAE
from .mpp import MPP
from .simmim import SimMIM

__all__ = ["DistillWrapper", "MAE", "SimMIM", "MPP", "Dino"]
