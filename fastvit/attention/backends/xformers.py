"""The optional ``xformers`` backend: ``xformers.ops.memory_efficient_attention`` (CUDA only).

xformers uses the ``[B, N, H, D]`` layout; the transposes below are views, and xformers accepts
those strides. Relative-position and dense biases are materialised as an additive tensor bias.
"""

from __future__ import annotations

import functools

import torch

from ..bias import additive_mask
from ..inputs import AttnInputs, AttnOutput
from .base import Backend


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # ImportError, or a broken build raising at import
        return False, f"xformers is not importable ({type(e).__name__}: {e}); install fastvit[xformers]"
    if not torch.cuda.is_available():
        return False, "xformers has no CPU kernels and no CUDA device is available"
    return True, ""


class XFormersBackend(Backend):
    name = "xformers"
    description = "xformers.ops.memory_efficient_attention"
    devices = ("cuda",)
    max_head_dim = 256
    deterministic = False

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return _probe()

    @classmethod
    def extra_reasons(cls, inp: AttnInputs) -> list[str]:
        if inp.value_dim != inp.head_dim and inp.bias:
            return ["value head dim differs from the query head dim together with a bias"]
        return []

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        import xformers.ops as xops

        q, k, v = (t.transpose(1, 2) for t in (inp.q, inp.k, inp.v))  # (b, n, h, d)
        bias, valid = additive_mask(inp.bias, q.dtype, (inp.q.shape[0], inp.q.shape[1], inp.nq, inp.nk))
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=inp.dropout_p, scale=inp.scale)
        out = out.transpose(1, 2)
        if valid is not None:
            out = out.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
        return AttnOutput(out)
