"""The ``reference`` backend: plain PyTorch, serves every input on every device."""

from __future__ import annotations

import torch

from ..inputs import AttnInputs, AttnOutput
from ..reference import reference_attention
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    description = "materialise logits, softmax, matmul (the oracle)"
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    supports_probs = True
    supports_cls_probs = True

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        return reference_attention(inp)
