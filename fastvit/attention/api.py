"""``attend()``: the one entry point every fastvit model calls for attention."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import plan
from .bias import DenseBias, HeadMix, KeyBias, KeyPaddingMask, RelPosBias, normalize_bias
from .dispatch import choose, get_selected_backend
from .dispatch import explain as _explain
from .inputs import AttnInputs, AttnOutput, validate_inputs
from .packed import Packed
from .window import Window

__all__ = ["attend", "make_inputs", "explain_call"]

_DESCRIPTORS = (RelPosBias, DenseBias, KeyBias, KeyPaddingMask)



def make_inputs(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, bias=None,
                dropout_p: float = 0.0, **options) -> AttnInputs:
    """Build and validate the inputs of an attention call (shared by ``attend`` and ``explain_call``).

    ``options`` are ``attend()``'s remaining keywords (``return_probs``, ``return_cls_probs``,
    ``head_mix``, ``window``, ``packed``), passed through to ``AttnInputs``.
    """
    if not isinstance(q, Tensor):
        raise ValueError(f"q must be a tensor, got {type(q).__name__}")
    inp = AttnInputs(q=q, k=k, v=v, scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
                     bias=normalize_bias(bias), dropout_p=float(dropout_p), **options)
    validate_inputs(inp)
    return inp


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    bias=None,
    dropout_p: float = 0.0,
    return_probs: bool = False,
    return_cls_probs: bool = False,
    head_mix: Optional[HeadMix] = None,
    window: Optional[Window] = None,
    packed: Optional[Packed] = None,
    backend: Optional[str] = None,
) -> Union[Tensor, AttnOutput]:
    """Scaled dot-product attention on the ``[B, H, N, D]`` layout, dispatched to a backend.

    Args:
        q: ``[B, H, Nq, D]``.
        k: ``[B, H, Nk, D]``.
        v: ``[B, H, Nk, Dv]``.
        scale: multiplies the logits; defaults to ``D ** -0.5``.
        bias: a descriptor (``RelPosBias``, ``DenseBias``, ``KeyPaddingMask``) or a tuple of them.
        dropout_p: dropout on the probabilities; pass 0 in eval (models pass ``p if self.training``).
        return_probs: also return the ``[B, H, Nq, Nk]`` post-softmax probabilities (pre-dropout).
        return_cls_probs: also return the probabilities of query 0 over all keys, ``[B, H, Nk]``.
        head_mix: talking-heads / re-attention mixing (needs a backend that materialises probabilities).
        window: attend only inside the (shifted / dilated) windows of a grid of raster tokens; q, k, v
            are then ``[B, H, grid_h * grid_w, D]`` and a ``RelPosBias`` index is window-local
            (see ``fastvit.attention.window``).
        packed: many sequences of different lengths on the token axis (``Packed(lengths, kv_lengths)``):
            q is ``[1, H, sum(lengths), D]``, k and v ``[1, H, sum(kv_lengths), D]``, and each sequence
            attends only to its own keys (see ``fastvit.attention.packed``).
        backend: force a backend by name for this call (``"auto"`` for auto dispatch).

    Returns:
        ``[B, H, Nq, Dv]``, or an ``AttnOutput(out, probs, cls_probs)`` when extra outputs are requested.

    The first call of each signature validates and chooses; later ones run its cached plan
    (``fastvit.attention.plan``; ``clear_plans()`` forgets them).
    """
    if not torch.compiler.is_compiling():  # graphs trace the full path below
        selection = get_selected_backend(backend)
        key = plan.signature(q, k, v, scale, bias, dropout_p, return_probs, return_cls_probs, head_mix, window,
                             selection, packed)
        if key is not None:
            found = plan.lookup(key)
            descriptors = () if bias is None else (bias,) if bias.__class__ in _DESCRIPTORS else normalize_bias(bias)
            if found is None:
                inp = make_inputs(q, k, v, scale=scale, bias=descriptors, dropout_p=dropout_p,
                                  return_probs=return_probs, return_cls_probs=return_cls_probs, head_mix=head_mix,
                                  window=window, packed=packed)
                chosen = choose(inp, selection=selection)
                found = plan.store(key, plan.Plan(chosen, chosen.runner(inp)))
            return found.run(q, k, v, descriptors, head_mix)
    inp = make_inputs(q, k, v, scale=scale, bias=bias, dropout_p=dropout_p, return_probs=return_probs,
                      return_cls_probs=return_cls_probs, head_mix=head_mix, window=window, packed=packed)
    result = choose(inp, backend).forward(inp)
    if return_probs or return_cls_probs:
        return result
    return result.out


def explain_call(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> dict[str, list[str]]:
    """Why each backend can or cannot serve ``attend(q, k, v, **kwargs)`` (empty list = it can)."""
    kwargs.pop("backend", None)
    return _explain(make_inputs(q, k, v, **kwargs))
