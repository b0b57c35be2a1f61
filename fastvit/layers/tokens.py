"""Token indexing the models share (ATS keeps sampled tokens, MAE / SimMIM the visible or masked ones)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_tokens"]


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """``x[i, ids[i]]`` for every image: ``(b, n, *rest), (b, m) -> (b, m, *rest)`` (one index_select)."""
    b, n = x.shape[:2]
    flat_ids = (ids + torch.arange(b, device=ids.device).unsqueeze(1) * n).flatten()  # (b*m,)
    return x.flatten(0, 1).index_select(0, flat_ids).view(b, ids.shape[1], *x.shape[2:])
