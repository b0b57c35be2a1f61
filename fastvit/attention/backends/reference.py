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
    supports_window = True
    supports_packed = True  # one call per sequence (packed.per_sequence): the ground truth
    # In fp16 / bf16 the logits and probabilities are rounded to the input dtype (the fused backends keep
    # them in fp32), so an output element errs by up to ~|logit| * eps against the fp32 oracle: about
    # twice the fused backends' tolerance, reached with few keys per row (7x7 windows), where one
    # probability weighs most.
    tolerances = {**Backend.tolerances, torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        return reference_attention(inp)
