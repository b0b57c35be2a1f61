"""The optional ``xformers`` backend: ``xformers.ops.memory_efficient_attention`` (CUDA only).

xformers uses the ``[B, N, H, D]`` layout; the transposes below are views, and xformers accepts
those strides. Relative-position and dense biases are materialised as an additive tensor bias.
Packed calls (``packed=Packed(...)``, no bias) pass xformers a ``BlockDiagonalMask`` built once per
layout and device from the lengths (``BlockDiagonalMask.from_seqlens``), kept with the ``Packed``.
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
    supports_packed = True  # BlockDiagonalMask.from_seqlens (unbiased packed calls)
    supports_packed_bias = False  # extra_reasons says why

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return _probe()

    @classmethod
    def extra_reasons(cls, inp: AttnInputs) -> list[str]:
        reasons = []
        if inp.value_dim != inp.head_dim and inp.bias:
            reasons.append("value head dim differs from the query head dim together with a bias")
        if inp.packed is not None and inp.bias:
            reasons.append(f"packed sequences ({inp.packed.describe()}) with a bias: a BlockDiagonalMask takes no "
                           "additive bias here (the reference, sdpa and flex serve it)")
        return reasons

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        import xformers.ops as xops

        q, k, v = (t.transpose(1, 2) for t in (inp.q, inp.k, inp.v))  # (b, n, h, d)
        if inp.packed is not None:  # (1, sum(lengths), h, d): every sequence on the token axis
            out = xops.memory_efficient_attention(q, k, v, attn_bias=_block_diagonal(inp.packed, inp.q.device),
                                                  p=inp.dropout_p, scale=inp.scale)
            return AttnOutput(out.transpose(1, 2))
        bias, valid = additive_mask(inp.bias, q.dtype, (inp.q.shape[0], inp.q.shape[1], inp.nq, inp.nk))
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=inp.dropout_p, scale=inp.scale)
        out = out.transpose(1, 2)
        if valid is not None:
            out = out.masked_fill(~valid.any(dim=-1, keepdim=True), 0.0)
        return AttnOutput(out)


def _block_diagonal(packed, device: torch.device):
    """xformers' block-diagonal mask of a packed layout: sequence i's queries see only its keys."""
    def build():
        from xformers.ops import fmha

        make = fmha.attn_bias.BlockDiagonalMask.from_seqlens
        lengths, kv_lengths = list(packed.lengths), list(packed.kv_lengths)
        try:  # xformers >= 0.0.26 builds the offsets on the device (no copy per call)
            return make(q_seqlen=lengths, kv_seqlen=kv_lengths, device=device)
        except TypeError:  # older releases take no device
            return make(q_seqlen=lengths, kv_seqlen=kv_lengths)

    return packed.cached("xformers_block_diagonal", device, build)
