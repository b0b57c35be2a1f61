"""The ``triton`` backend: fastvit's own fused kernels (``fastvit.kernels``).

FlashAttention-2-style forward and backward with the relative-position table gathered inside the
kernel, dense biases, key padding and the CLS-row probabilities recomputed from the saved
log-sum-exp; windowed calls (``window=Window(...)``: plain, shifted and dilated windows) go to the
window kernels, which address the windows of the raster grid in place (no partition or reverse copy)
and compute the shift masks from coordinates. Runs on CUDA, and on the CPU only under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from ..bias import DenseBias, KeyPaddingMask, RelPosBias
from ..inputs import AttnInputs, AttnOutput
from .base import Backend


class TritonBackend(Backend):
    name = "triton"
    description = "fastvit.kernels fused attention (Triton)"
    devices = ("cuda", "cpu")  # cpu only under TRITON_INTERPRET=1: the kernels module says so
    max_head_dim = 128
    supports_dropout = False
    supports_cls_probs = True
    supports_window = True  # kernels.window_attention
    deterministic = True  # bias gradients: plain stores per batch element, then a fixed-order sum (no atomics)
    tolerances = {
        torch.float32: (1e-4, 1e-4),  # tl.dot may use TF32-free fp32 FMA; blockwise exp2 reorders sums
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1.6e-2, 1.6e-2),
    }

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import fastvit.kernels as kernels
        except Exception as e:  # pragma: no cover - the package ships kernels
            return False, f"fastvit.kernels failed to import ({type(e).__name__}: {e})"
        return kernels.available()

    @classmethod
    def extra_reasons(cls, inp: AttnInputs) -> list[str]:
        from fastvit.kernels import attention as kattn
        from fastvit.kernels import window_attention as kwin

        # A pure capability check: make_inputs has validated shapes, dtypes and devices already.
        win = inp.window
        if win is None:
            reasons = kattn.capability_reasons(inp.q.device, inp.dtype, max(inp.head_dim, inp.value_dim),
                                               dropout_p=inp.dropout_p, scale=inp.scale)
        else:
            # the geometry is the Window's, validated when it was built: the kernels serve every valid one
            reasons = kwin.window_not_supported_reasons(inp.q.device, inp.dtype, inp.head_dim,
                                                        value_dim=inp.value_dim, dropout_p=inp.dropout_p,
                                                        scale=inp.scale)
        if any(len(inp.of_type(kind)) > 1 for kind in (RelPosBias, DenseBias, KeyPaddingMask)):
            reasons.append("more than one bias of the same kind (combine them before calling)")
        return reasons

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        from fastvit.kernels import attention as kattn

        kwargs = dict(scale=inp.scale, validated=True, **_bias_kwargs(inp))
        win = inp.window
        if win is not None:  # validate_inputs refused key padding and the probabilities with a window
            from fastvit.kernels.window_attention import window_attention

            del kwargs["key_padding"]
            out = window_attention(inp.q, inp.k, inp.v, grid=win.grid, size=win.size, shift=win.shift,
                                   dilation=win.dilation, **kwargs)
            return AttnOutput(out)
        if inp.return_cls_probs:
            out, cls_probs = kattn.attention_with_cls_probs(inp.q, inp.k, inp.v, **kwargs)
            return AttnOutput(out, None, cls_probs)
        return AttnOutput(kattn.attention(inp.q, inp.k, inp.v, **kwargs))


def _bias_kwargs(inp: AttnInputs) -> dict:
    """The descriptors as the kernel launchers' keyword arguments (at most one of each kind)."""
    rel = inp.of_type(RelPosBias)
    dense = inp.of_type(DenseBias)
    pad = inp.of_type(KeyPaddingMask)
    return dict(
        rel_table=rel[0].table if rel else None,
        rel_index=rel[0].index if rel else None,
        dense_bias=dense[0].materialize() if dense else None,
        key_padding=pad[0].mask if pad else None,
    )
