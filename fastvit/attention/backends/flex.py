"""The ``flex`` backend: PyTorch's FlexAttention (``torch.nn.attention.flex_attention``).

FlexAttention computes ``softmax(score_mod(q @ k^T * scale) masked by block_mask) @ v`` with the
score modification and the mask written as small Python functions that inductor fuses into a
FlashAttention-style Triton kernel (forward and backward).

How the descriptors map:
- ``RelPosBias(table [T, H], index [Nq, Nk])``: a ``score_mod`` term ``table[index[q, k], h]``.
- ``DenseBias(t)`` (broadcastable to ``[B, H, Nq, Nk]``): a ``score_mod`` term ``t[b, h, q, k]``,
  with every broadcast (size-1) axis dropped from the indexing first.
- ``KeyPaddingMask(mask [B, Nk])``: a ``BlockMask`` built with ``create_block_mask`` from the mask_mod
  ``mask[b, k]`` (several masks are and-ed first), so fully padded key blocks are skipped. A query
  row with no valid key gives a zero output and zero gradients (FlexAttention's own semantics, the
  same as the contract's); its log-sum-exp is ``-inf``.
- ``packed=Packed(...)``: a document ``BlockMask`` (``doc_q[q] == doc_k[k]``) built once per layout and
  device and kept with the ``Packed``; biases over the packed tokens are ``score_mod`` terms as usual,
  and ``return_cls_probs`` recomputes each sequence's first row.
- Descriptors compose: every bias is one more term of the same ``score_mod``. Bias tensors are
  captured by the ``score_mod``, so FlexAttention differentiates through them: tables and dense
  biases get their gradients.
- ``return_cls_probs``: FlexAttention returns the log-sum-exp of each row; the CLS row's logits
  ``s[0, :]`` are recomputed in fp32 (one row: ``O(B H Nk D)``) and ``p[0, j] = exp(s[0, j] - lse[0])``.

Where it runs:
- CUDA: ``torch.compile(flex_attention, dynamic=False)``, created once per process and cached at
  module level. Each new combination of shapes, dtypes, strides, grad mode and descriptor kinds
  compiles once (seconds, forward and backward separately); the same shapes with new tensors and
  new descriptor objects reuse it (a CUDA test in tests/attention/test_flex.py checks this). All
  variants share one dynamo cache (it lives on ``flex_attention``'s code), whose default recompile
  limit (8) a model with several stages or a benchmark sweep would exhaust, after which dynamo
  silently runs FlexAttention uncompiled (correct, but it materialises the scores). The calls
  therefore raise that limit to ``RECOMPILE_LIMIT`` for their own duration, leaving the global
  setting alone. Inside a model that is itself being compiled, ``flex_attention``
  is called directly and inlined into the caller's graph.
- CPU: uncompiled, for tests. ``flex_attention()`` refuses CPU inputs that require grad (inductor's
  CPU kernel has no backward), so the backend calls the higher-order op the uncompiled path runs
  (FlexAttention's math implementation, fp32 scores, with a dense backward), handing it the bias
  tensors as explicit buffers so their gradients flow. It is slow (it materialises the scores) but
  within ~1e-6 of the reference in fp32.

Refusals:
- attention dropout: FlexAttention has no dropout;
- ``return_probs`` and head mixing: they need the probabilities, which FlexAttention never
  materialises;
- CUDA with a query/key or value head dim under 16: ``tl.dot`` needs K >= 16 and inductor's lowering
  raises for it. Other widths work (a head dim that is not a power of two is padded to the next one
  inside the kernel, e.g. 48 -> 64, 80 -> 128) and the value width may differ from the key width;
- deterministic algorithms enabled while a table or dense bias requires grad, off the CPU: the
  compiled backward accumulates captured-tensor gradients with atomic adds. q, k and v gradients
  are deterministic, and the CPU's math backward is deterministic too.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..bias import ADDITIVE, KeyPaddingMask, RelPosBias
from ..inputs import AttnInputs, AttnOutput
from ..partition import partitioned
from ..reference import reference_attention
from .base import Backend


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as _op  # noqa: F401
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as e:  # ImportError on torch < 2.5, or a broken build raising at import
        return False, (f"torch.nn.attention.flex_attention is not importable ({type(e).__name__}: {e}); "
                       f"FlexAttention needs torch >= 2.5")
    return True, ""


# How many compiled variants (shapes x dtypes x descriptor kinds x grad mode) flex may hold.
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    """``torch.compile(flex_attention)``, built once (dynamo keeps the compiled variants on its code)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexBackend(Backend):
    name = "flex"
    description = "torch.nn.attention.flex_attention (FlexAttention; uncompiled on the CPU)"
    devices = ("cuda", "cpu")  # the CPU runs FlexAttention uncompiled: slow, for tests
    # tl.dot needs every dimension >= 16: inductor's CUDA lowering raises for a smaller q/k or v width.
    # The CPU's math implementation has no minimum.
    min_head_dim_by_device = {"cuda": 16}  # inductor's flex kernels use tl.dot on the head dims
    supports_dropout = False
    supports_cls_probs = True  # from the returned log-sum-exp
    supports_window = True  # windows gathered into a batch; the shift mask and per-window biases as score_mod terms
    supports_packed = True  # a document block mask built once per Packed (other sequences' key blocks skipped)
    deterministic = False  # captured-tensor (bias) gradients are accumulated with atomic adds on CUDA
    tolerances = {
        torch.float32: (1e-4, 1e-4),  # the CUDA kernel reorders sums blockwise (exp2); the CPU is ~1e-6
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1.6e-2, 1.6e-2),
    }

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return _probe()

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        if inp.window is not None:
            return partitioned(inp, cls.forward)
        if inp.k.shape[2] == 0:
            # No keys: every row attends to nothing, zeros as on every other backend (FlexAttention's own
            # kernels reduce over the empty key axis and raise). The reference's empty products give
            # exactly that, with the zero gradients and the [B, H, 0] CLS probabilities, at no cost.
            return reference_attention(inp)
        q, k, v = inp.q, inp.k, inp.v
        score_mod, buffers = _score_mod(inp)
        block_mask = _padding_block_mask(inp) if inp.packed is None else _document_block_mask(inp)
        want_lse = inp.return_cls_probs
        if inp.device_type == "cpu" and not torch.compiler.is_compiling():
            out, lse = _flex_eager_op(q, k, v, score_mod, buffers, block_mask, inp.scale, want_lse)
        else:
            out, lse = _flex_public(q, k, v, score_mod, buffers, block_mask, inp.scale, want_lse)
        cls_probs = None
        if want_lse:
            cls_probs = _cls_probs(inp, lse) if inp.packed is None else _packed_cls_probs(inp, lse)
        return AttnOutput(out, None, cls_probs)


_AXES = ("b", "h", "q", "k")


def _score_mod(inp: AttnInputs) -> tuple[Optional[Callable], tuple]:
    """The biases as one ``score_mod(score, b, h, q, k, *buffers)`` and the tensors it reads.

    The terms (which buffer is what, which axes index a dense bias) are fixed Python data, so the
    function traces to a static graph; the tensors are passed as buffers so they can take gradients.
    """
    terms, buffers = [], []
    for b in inp.bias:
        if isinstance(b, RelPosBias):
            index = b.index if b.index.dtype in (torch.int32, torch.int64) else b.index.int()  # never a mask
            terms.append(("relpos", ()))
            buffers += [b.table.to(inp.dtype), index]
        elif isinstance(b, ADDITIVE):
            t = b.materialize().to(inp.dtype)
            kept = tuple(axis for axis, size in zip(_AXES, t.shape) if size != 1)
            for dim in reversed(range(4)):  # broadcast axes are not indexed at all
                if t.shape[dim] == 1:
                    t = t.select(dim, 0)
            terms.append(("dense", kept))
            buffers.append(t)
    if not terms:
        return None, ()
    terms = tuple(terms)

    def score_mod(score, b, h, q_idx, kv_idx, *bufs):
        coords = {"b": b, "h": h, "q": q_idx, "k": kv_idx}
        i = 0
        for kind, axes in terms:
            if kind == "relpos":
                table, index = bufs[i], bufs[i + 1]
                score = score + table[index[q_idx, kv_idx], h]
                i += 2
            else:
                dense = bufs[i]
                score = score + (dense[tuple(coords[a] for a in axes)] if axes else dense)
                i += 1
        return score

    return score_mod, tuple(buffers)


def _valid_keys(inp: AttnInputs) -> Optional[Tensor]:
    """Every key padding mask and-ed into one ``[B, Nk]`` bool (True = attend), or None."""
    masks = inp.of_type(KeyPaddingMask)
    if not masks:
        return None
    valid = masks[0].mask
    for m in masks[1:]:
        valid = valid & m.mask
    return valid


def _padding_block_mask(inp: AttnInputs):
    valid = _valid_keys(inp)
    if valid is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]

    return create_block_mask(mask_mod, inp.q.shape[0], None, inp.nq, inp.nk, device=inp.q.device)


def _document_block_mask(inp: AttnInputs):
    """The packed layout's document mask (a query sees only its own sequence's keys), built once per
    ``Packed`` and device and kept with it: key blocks of other sequences are skipped."""
    packed, device = inp.packed, inp.q.device

    def build():
        from torch.nn.attention.flex_attention import create_block_mask

        doc_q, doc_k = packed.document_ids(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return doc_q[q_idx] == doc_k[kv_idx]

        return create_block_mask(mask_mod, 1, None, packed.total, packed.kv_total, device=device)

    return packed.cached("flex_block_mask", device, build)


def _flex_public(q, k, v, score_mod, buffers, block_mask, scale, want_lse) -> tuple[Tensor, Optional[Tensor]]:
    """``flex_attention`` (compiled unless a caller's compilation is tracing us) with captured buffers."""
    from torch.nn.attention import flex_attention as fa

    fn = fa.flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    closure = None
    if score_mod is not None:
        def closure(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h, q_idx, kv_idx, *buffers)

    kwargs = dict(score_mod=closure, block_mask=block_mask, scale=scale)
    with _recompile_limit():
        if not want_lse:
            return fn(q, k, v, **kwargs), None
        if hasattr(fa, "AuxRequest"):  # return_lse is deprecated where AuxRequest exists
            out, aux = fn(q, k, v, return_aux=fa.AuxRequest(lse=True), **kwargs)
            return out, aux.lse
        return fn(q, k, v, return_lse=True, **kwargs)


def _recompile_limit():
    """Room for ``RECOMPILE_LIMIT`` compiled variants during one call (never lowers a user's limit)."""
    import torch._dynamo

    config = torch._dynamo.config
    if torch.compiler.is_compiling() or not hasattr(config, "recompile_limit"):
        return contextlib.nullcontext()
    return config.patch(recompile_limit=max(config.recompile_limit, RECOMPILE_LIMIT))


def _flex_eager_op(q, k, v, score_mod, buffers, block_mask, scale, want_lse) -> tuple[Tensor, Optional[Tensor]]:
    """FlexAttention's uncompiled path, with the biases as explicit (differentiable) buffers."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op
    from torch.nn.attention import flex_attention as fa

    if score_mod is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score

    if block_mask is None:
        block_mask = fa._create_empty_block_mask(q, k)
    kernel_options = fa._apply_kernel_options(q, k, v, want_lse, None)
    result = flex_op(q, k, v, score_mod, block_mask.as_tuple(), scale, kernel_options, buffers, ())
    out, lse = result[0], result[1]
    # The op keeps its statistics in base 2 (the kernels use exp2); flex_attention() rescales them.
    return out, (lse * math.log(2.0) if want_lse else None)


def _cls_probs(inp: AttnInputs, lse: Tensor) -> Tensor:
    """``[B, H, Nk]`` probabilities of query 0: ``exp(s[0, :] - lse[0])`` with ``s`` recomputed in fp32."""
    q0 = inp.q[:, :, :1].float()
    s = torch.matmul(q0 * inp.scale, inp.k.float().transpose(-1, -2))  # (b, h, 1, nk)
    for b in inp.bias:
        if isinstance(b, RelPosBias):
            row = torch.nn.functional.embedding(b.index[:1].long(), b.table.to(inp.dtype))  # (1, nk, h)
            s = s + row.permute(2, 0, 1).unsqueeze(0).float()
        elif isinstance(b, ADDITIVE):
            s = s + b.materialize()[..., :1, :].to(inp.dtype).float()
    valid = _valid_keys(inp)
    lse0 = lse[:, :, :1, None].float()  # (b, h, 1, 1)
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        # A sample without valid keys has lse = -inf: use 0 there so exp(-inf - 0) = 0, never NaN.
        lse0 = torch.where(torch.isinf(lse0), torch.zeros_like(lse0), lse0)
    return torch.exp(s - lse0).squeeze(2).to(inp.dtype)


def _packed_cls_probs(inp: AttnInputs, lse: Tensor) -> Tensor:
    """``[1, H, sum(kv_lengths)]``: for each sequence, its first query's probabilities over its own
    keys, ``exp(s - lse)`` with ``s`` recomputed in fp32 for the sequences' first rows only."""
    packed = inp.packed
    starts = torch.tensor(packed.offsets[:-1], device=inp.q.device)
    _, doc_k = packed.document_ids(inp.q.device)
    s = torch.matmul(inp.q[:, :, starts].float() * inp.scale, inp.k.float().transpose(-1, -2))  # (1, h, seqs, nk)
    for b in inp.bias:
        if isinstance(b, RelPosBias):
            rows = torch.nn.functional.embedding(b.index[starts].long(), b.table.to(inp.dtype))  # (seqs, nk, h)
            s = s + rows.permute(2, 0, 1).unsqueeze(0).float()
        elif isinstance(b, ADDITIVE):
            t = b.materialize()
            s = s + (t[..., starts, :] if t.shape[-2] != 1 else t).to(inp.dtype).float()
    own = doc_k[None, :] == torch.arange(packed.num_sequences, device=doc_k.device)[:, None]  # (seqs, nk)
    p = torch.exp(s.masked_fill(~own, float("-inf")) - lse[:, :, starts, None].float())
    # key j belongs to sequence doc_k[j]: its probability is that sequence's row
    return p.gather(2, doc_k.long().view(1, 1, 1, -1).expand(1, p.shape[1], 1, -1)).squeeze(2).to(inp.dtype)
