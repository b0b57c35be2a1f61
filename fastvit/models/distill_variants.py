"""Kept for the ``fastvit.distill`` alias module only: the distillable models now live next to their plain
models and are gathered in ``fastvit.models.distill``."""

from .distill import DistillableEfficientViT, DistillableT2TViT

__all__ = ["DistillableT2TViT", "DistillableEfficientViT"]
