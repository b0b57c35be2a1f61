"""Training wrappers: distillation (and the self-supervised learners)."""

from .distill import DistillWrapper

__all__ = ["DistillWrapper"]
