"""``BlockRunner``: the one place a stack of blocks is gradient-checkpointed and its outputs recorded.

Every block loop of every model (the shared ``ResidualBlocks`` and the loops of CaiT, ATS, CCT, LeViT,
Twins-SVT, CrossFormer, RegionViT) runs its blocks through ``run_block``, and every loop whose outputs
are a model's intermediates (blocks of a ViT, stages of a hierarchical model) hands them to ``tap``.
``VisionModel.set_grad_checkpointing`` switches the first on in every runner of a model;
``VisionModel.forward_intermediates`` turns the second on in the one runner the model names.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils import checkpoint as torch_checkpoint

__all__ = ["BlockRunner"]


class BlockRunner:
    """Mixin for an ``nn.Module`` that runs blocks in a loop.

    Attributes:
        grad_checkpointing: recompute each block in the backward pass instead of keeping its
            activations (``torch.utils.checkpoint``, non-reentrant, RNG state preserved, so dropout
            masks replay). Only while gradients are enabled. BatchNorm in train mode updates its
            running statistics twice per step, as in timm.
        taps: a list while ``forward_intermediates`` records this runner's outputs, else ``None``.
    """

    grad_checkpointing: bool = False
    taps: Optional[list] = None

    def run_block(self, fn: Callable, *args):
        """``fn(*args)``, checkpointed when ``grad_checkpointing`` is on and gradients are enabled."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Looked up on the module at call time, so a test can count the calls by patching it.
            return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def tap(self, x):
        """Record ``x`` as the next intermediate while ``forward_intermediates`` listens; returns ``x``."""
        if self.taps is not None:
            self.taps.append(x)
        return x
