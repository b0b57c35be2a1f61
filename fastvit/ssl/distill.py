"""DistillWrapper: knowledge distillation of a ViT student with a distillation token (DeiT).

``loss = (1 - alpha) * CE(student, labels) + alpha * D`` where ``D`` is the temperature-scaled KL
divergence to the teacher (soft) or CE against the teacher's argmax (hard), as in vit-pytorch.
The teacher runs under ``no_grad``; like vit-pytorch it is not switched to eval mode for you.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DistillWrapper"]


class DistillWrapper(nn.Module):
    """Args: teacher, student (a Distillable* model), temperature, alpha, hard, mlp_layernorm."""

    def __init__(self, *, teacher: nn.Module, student: nn.Module, temperature: float = 1.0, alpha: float = 0.5,
                 hard: bool = False, mlp_layernorm: bool = False):
        super().__init__()
        if not callable(getattr(student, "to_vit", None)):
            raise ValueError(f"student must be a Distillable model (DistillableViT, ...), got {type(student).__name__}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher
        self.student = student
        dim, num_classes = student.dim, student.num_classes
        self.temperature = temperature
        self.alpha = alpha
        self.hard = hard
        self.distillation_token = nn.Parameter(torch.randn(1, dim))
        self.distill_mlp = nn.Sequential(
            nn.LayerNorm(dim) if mlp_layernorm else nn.Identity(), nn.Linear(dim, num_classes)
        )

    def forward(self, img: Tensor, labels: Tensor, temperature: Optional[float] = None,
                alpha: Optional[float] = None, **kwargs) -> Tensor:
        alpha = self.alpha if alpha is None else alpha
        T = self.temperature if temperature is None else temperature
        with torch.no_grad():
            teacher_logits = self.teacher(img)
        student_logits, distill_tokens = self.student(img, distill_token=self.distillation_token, **kwargs)
        distill_logits = self.distill_mlp(distill_tokens)
        loss = F.cross_entropy(student_logits, labels)
        if self.hard:
            distill_loss = F.cross_entropy(distill_logits, teacher_logits.argmax(dim=-1))
        else:
            distill_loss = F.kl_div(F.log_softmax(distill_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                                    reduction="batchmean") * T ** 2
        return loss * (1 - alpha) + distill_loss * alpha
