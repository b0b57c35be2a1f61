"""The ``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

Biases become one additive float mask (SDPA takes no descriptors). Note that any ``attn_mask``
keeps SDPA off its flash kernel on CUDA, which is why fastvit has its own bias kernels. Key padding
is applied as a large negative number rather than ``-inf`` so a row without valid keys does not turn
into NaN; that row's output is then set to zero, as the contract says.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..bias import additive_mask
from ..inputs import AttnInputs, AttnOutput
from ..partition import partitioned
from ..reference import reference_attention
from .base import Backend


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention"
    devices = ("cpu", "cuda", "mps", "xpu")
    supports_window = True  # windows gathered into a batch, the shift mask expanded (partition.partitioned)

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        if inp.window is not None:
            return partitioned(inp, cls.forward)
        if inp.k.shape[2] == 0:  # no keys: zeros; SDPA's empty output would leave the biases without gradients
            return reference_attention(inp)
        # SDPA silently takes its slow path (~3x on CPU) when a last dim is strided.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (inp.q, inp.k, inp.v))
        mask, valid = additive_mask(inp.bias, q.dtype, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=inp.dropout_p, scale=inp.scale)
        if valid is not None:
            out = out.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
        return AttnOutput(out)
