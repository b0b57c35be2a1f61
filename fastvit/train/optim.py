"""AdamW with decoupled weight decay, and the learning rate of every step: linear warm-up, then cosine.

The schedule is a pure function of the global step (``lr_at``), set on the optimiser before each step,
so resuming needs only the step count. No weight decay on 1-D parameters (norms, biases) and on
tokens and position tables (``cls_token``, ``pos_embedding``, ``mask_token``, ...), as in DeiT / MAE.
"""

from __future__ import annotations

import math

import torch

__all__ = ["build_optimizer", "lr_at", "set_lr"]

_NO_DECAY_NAMES = ("token", "pos_embedding", "pos_emb", "position", "centers")


def build_optimizer(named_params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``(name, parameter)`` pairs: two groups, with and without weight decay."""
    decay, no_decay = [], []
    for name, param in named_params:
        leaf = name.rsplit(".", 1)[-1]
        skip = param.ndim <= 1 or any(key in leaf for key in _NO_DECAY_NAMES)
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """The learning rate of (0-based) ``step``: ``lr * (step + 1) / warmup_steps`` during the warm-up, then a
    half cosine from ``lr`` down to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
