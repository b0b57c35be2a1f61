"""The ``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

Biases become one additive float mask (SDPA takes no descriptors). Note that any ``attn_mask``
keeps SDPA off its flash kernel on CUDA, which is why fastvit has its own bias kernels. Key padding
is applied as a large negative number rather than ``-inf`` so a row without valid keys does not turn
into NaN; that row's output is then set to zero, as the contract says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bias import DenseBias, KeyPaddingMask, RelPosBias
from ..inputs import AttnInputs, AttnOutput
from .base import Backend


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention"
    devices = ("cpu", "cuda", "mps", "xpu")

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        # SDPA silently takes its slow path (~3x on CPU) when a last dim is strided.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (inp.q, inp.k, inp.v))
        mask = None
        valid = None
        for b in inp.bias:
            if isinstance(b, (RelPosBias, DenseBias)):
                t = b.materialize().to(q.dtype)
                mask = t if mask is None else mask + t
            elif isinstance(b, KeyPaddingMask):
                valid = b.materialize() if valid is None else valid & b.materialize()
        if valid is not None:
            neg = torch.zeros(valid.shape, dtype=q.dtype, device=q.device)
            neg.masked_fill_(~valid, torch.finfo(q.dtype).min / 2)
            mask = neg if mask is None else mask + neg
        if mask is not None:
            # SDPA wants the mask to broadcast against (b, h, nq, nk).
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=inp.dropout_p, scale=inp.scale)
        if valid is not None:
            out = out.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
        return AttnOutput(out)
