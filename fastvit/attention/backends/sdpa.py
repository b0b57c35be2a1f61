"""The ``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

Biases become one additive float mask (SDPA takes no descriptors). Note that any ``attn_mask``
keeps SDPA off its flash kernel on CUDA, which is why fastvit has its own bias kernels. Key padding
is applied as a large negative number rather than ``-inf`` so a row without valid keys does not turn
into NaN; that row's output is then set to zero, as the contract says. Packed sequences
(``packed=Packed(...)``) run one SDPA call per distinct (length, kv_length), the sequences of a
length stacked on the batch axis (``packed.bucketed``): no padding and no block-diagonal mask,
whose ``sum(lengths)^2`` logits would cost more than the padding they replace.
"""

from __future__ import annotations

import math
from typing import Callable

import torch.nn.functional as F

from ..bias import DenseBias, RelPosBias, additive_mask
from ..inputs import AttnInputs, AttnOutput
from ..packed import bucketed
from ..partition import partitioned
from ..reference import reference_attention
from .base import Backend


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention"
    devices = ("cpu", "cuda", "mps", "xpu")
    supports_window = True  # windows gathered into a batch, the shift mask expanded (partition.partitioned)
    supports_packed = True  # one SDPA call per distinct sequence length (packed.bucketed)

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        if inp.window is not None:
            return partitioned(inp, cls.forward)
        if inp.packed is not None:
            return bucketed(inp, cls.forward)
        if inp.k.shape[2] == 0:  # no keys: zeros; SDPA's empty output would leave the biases without gradients
            return reference_attention(inp)
        # SDPA silently takes its slow path (~3x on CPU) when a last dim is strided.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (inp.q, inp.k, inp.v))
        mask, valid = additive_mask(inp.bias, q.dtype, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=inp.dropout_p, scale=inp.scale)
        if valid is not None:
            out = out.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
        return AttnOutput(out)

    @classmethod
    def runner(cls, inp: AttnInputs) -> Callable:
        """Without biases or a window, the call is SDPA itself: which of q, k, v need a contiguous copy
        is fixed by the signature's strides, so the plan is one ``F.scaled_dot_product_attention``."""
        if inp.window is not None or inp.packed is not None or inp.nk == 0 or inp.head_mix is not None:
            return super().runner(inp)
        if inp.bias:
            return cls._bias_runner(inp)
        scale, dropout_p = inp.scale, inp.dropout_p
        plain = dropout_p == 0.0 and scale == 1.0 / math.sqrt(inp.head_dim)  # SDPA's defaults: its cheapest call
        if all(t.stride(-1) == 1 for t in (inp.q, inp.k, inp.v)):
            if plain:
                return lambda q, k, v, bias, head_mix: F.scaled_dot_product_attention(q, k, v)

            def run(q, k, v, bias, head_mix):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        else:
            def run(q, k, v, bias, head_mix):
                q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        return run

    @classmethod
    def _bias_runner(cls, inp: AttnInputs) -> Callable:
        """One ``RelPosBias`` or ``DenseBias`` (the common case: Swin, LeViT, BEiT, CrossFormer) is SDPA's
        ``attn_mask`` as it is, broadcast by SDPA itself (an eval ``RelPosBias`` is materialised once per
        table and index); whether it needs a cast to q's dtype is fixed by the signature. Anything else
        (key padding, several biases) takes the default: ``additive_mask`` and the empty-row fix-up."""
        if len(inp.bias) != 1 or inp.bias[0].__class__ not in (RelPosBias, DenseBias) \
                or not all(t.stride(-1) == 1 for t in (inp.q, inp.k, inp.v)):
            return super().runner(inp)
        b = inp.bias[0]
        bias_dtype = (b.table if b.__class__ is RelPosBias else b.tensor).dtype
        dtype, scale, dropout_p = inp.q.dtype, inp.scale, inp.dropout_p
        if bias_dtype == dtype:
            def run(q, k, v, bias, head_mix):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[0].materialize(), dropout_p=dropout_p,
                                                      scale=scale)
        else:
            def run(q, k, v, bias, head_mix):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[0].materialize().to(dtype),
                                                      dropout_p=dropout_p, scale=scale)
        return run
