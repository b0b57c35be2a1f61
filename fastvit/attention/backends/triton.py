"""The ``triton`` backend: fastvit's own fused kernels (``fastvit.kernels``).

FlashAttention-2-style forward and backward with the relative-position table gathered inside the
kernel, dense biases, key padding and the CLS-row probabilities recomputed from the saved
log-sum-exp; windowed calls (``window=Window(...)``: plain, shifted and dilated windows) go to the
window kernels, which address the windows of the raster grid in place (no partition or reverse copy)
and compute the shift masks from coordinates; packed calls (``packed=Packed(...)``) go to the
variable-length kernels (``kernels.varlen``: a grid over each sequence's own blocks, no padding), which
take no bias. Runs on CUDA, and on the CPU only under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from ..bias import DenseBias, KeyBias, KeyPaddingMask, RelPosBias
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
    supports_packed = True  # kernels.varlen (unbiased packed calls)
    supports_packed_bias = False  # extra_reasons says why
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
        if inp.packed is not None and inp.bias:
            reasons.append(f"packed sequences ({inp.packed.describe()}) with a bias: the variable-length kernels "
                           "take no bias (the reference, sdpa and flex serve it)")
        if any(len(inp.of_type(kind)) > 1 for kind in (RelPosBias, DenseBias, KeyBias, KeyPaddingMask)):
            reasons.append("more than one bias of the same kind (combine them before calling)")
        return reasons

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        from fastvit.kernels import attention as kattn

        if inp.packed is not None:  # extra_reasons refused a bias
            from fastvit.kernels import varlen

            p = inp.packed
            if inp.return_cls_probs:
                out, cls_probs = varlen.varlen_attention_with_cls_probs(inp.q, inp.k, inp.v, p.lengths, p.kv_lengths,
                                                                        scale=inp.scale, validated=True)
                return AttnOutput(out, None, cls_probs)
            return AttnOutput(varlen.varlen_attention(inp.q, inp.k, inp.v, p.lengths, p.kv_lengths, scale=inp.scale,
                                                      validated=True))
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


    @classmethod
    def runner(cls, inp: AttnInputs):
        """Calls without a window go straight to the kernels' launchers: which slot of the descriptor
        tuple holds which bias is fixed by the signature, and an eval ``RelPosBias`` small enough to be
        expanded anyway is passed as its cached dense bias (``RelPosBias.materialize``: computed once
        per table and index, not per call). Packed calls go straight to the variable-length launchers.
        Windowed calls, or a patched ``forward``, take the default."""
        if inp.window is not None or cls.forward.__func__ is not _FORWARD:
            return super().runner(inp)
        if inp.packed is not None:
            return _packed_runner(cls, inp)
        import fastvit.kernels.attention as kattn

        kinds = [b.__class__ for b in inp.bias]
        rel = kinds.index(RelPosBias) if RelPosBias in kinds else None
        dense = kinds.index(DenseBias) if DenseBias in kinds else None
        key = kinds.index(KeyBias) if KeyBias in kinds else None
        pad = kinds.index(KeyPaddingMask) if KeyPaddingMask in kinds else None
        # The launcher expands a table of at most this many logits into a dense bias on every call; with
        # no other dense bias, the cached materialisation is the same values.
        expand = rel is not None and dense is None and key is None \
            and inp.nq * inp.nk <= kattn.rel_bias_precompute_max_logits(inp.q.device)
        scale = inp.scale
        launch = kattn.attention_with_cls_probs if inp.return_cls_probs else kattn.attention
        cls_probs = inp.return_cls_probs

        def run(q, k, v, bias, head_mix):
            if cls.forward.__func__ is not _FORWARD:  # patched after the plan was built
                result = cls.forward(AttnInputs.of_call(q, k, v, bias, head_mix, static))
                return result if cls_probs else result.out
            table = index = dense_bias = None
            if rel is not None:
                b = bias[rel]
                if expand and not (torch.is_grad_enabled() and b.table.requires_grad):
                    dense_bias = b.materialize()
                else:
                    table, index = b.table, b.index
            if dense is not None:
                dense_bias = bias[dense].materialize()
            if key is not None:
                dense_bias = _with_key_bias(dense_bias, bias[key], q.shape[2])
            result = launch(q, k, v, scale=scale, rel_table=table, rel_index=index, dense_bias=dense_bias,
                            key_padding=None if pad is None else bias[pad].mask, validated=True)
            return AttnOutput(result[0], None, result[1]) if cls_probs else result

        static = inp.static_fields()
        return run


def _bias_kwargs(inp: AttnInputs) -> dict:
    """The descriptors as the kernel launchers' keyword arguments (at most one of each kind)."""
    rel = inp.of_type(RelPosBias)
    dense = inp.of_type(DenseBias)
    key = inp.of_type(KeyBias)
    pad = inp.of_type(KeyPaddingMask)
    dense_bias = dense[0].materialize() if dense else None
    if key:
        dense_bias = _with_key_bias(dense_bias, key[0], inp.nq)
    return dict(
        rel_table=rel[0].table if rel else None,
        rel_index=rel[0].index if rel else None,
        dense_bias=dense_bias,
        key_padding=pad[0].mask if pad else None,
    )


def _with_key_bias(dense_bias, key_bias: KeyBias, nq: int):
    """A ``KeyBias`` as the kernels' dense bias: its ``[B, 1|H, 1, Nk]`` form expanded over the queries (a
    zero row stride: every query row of a tile reads the same key vector, from cache), added to the
    call's own dense bias when there is one. Its gradient is the dense bias's summed over the queries
    by the expand's backward (deterministic, as every bias gradient here)."""
    kb = key_bias.materialize()
    if dense_bias is None:
        return kb.expand(kb.shape[0], kb.shape[1], nq, kb.shape[3])
    return dense_bias + kb


def _packed_runner(cls, inp: AttnInputs):
    """``run(q, k, v, bias, head_mix)`` for a packed signature: the layout's lengths are captured once."""
    from fastvit.kernels import varlen

    lengths, kv_lengths, scale = inp.packed.lengths, inp.packed.kv_lengths, inp.scale
    static = inp.static_fields()

    if inp.return_cls_probs:
        def run(q, k, v, bias, head_mix):
            if cls.forward.__func__ is not _FORWARD:  # patched after the plan was built
                return cls.forward(AttnInputs.of_call(q, k, v, bias, head_mix, static))
            out, cls_probs = varlen.varlen_attention_with_cls_probs(q, k, v, lengths, kv_lengths, scale=scale,
                                                                    validated=True)
            return AttnOutput(out, None, cls_probs)
    else:
        def run(q, k, v, bias, head_mix):
            if cls.forward.__func__ is not _FORWARD:
                return cls.forward(AttnInputs.of_call(q, k, v, bias, head_mix, static)).out
            return varlen.varlen_attention(q, k, v, lengths, kv_lengths, scale=scale, validated=True)
    return run


_FORWARD = TritonBackend.forward.__func__  # the runner's shortcut applies while forward is this one
