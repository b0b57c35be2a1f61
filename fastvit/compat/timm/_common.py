"""Pieces several timm families share: their fused q/k/v projection with split biases, their masks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from fastvit.attention import DenseBias

__all__ = ["mask_bias", "qkv_with_split_bias", "unmapped_call", "run_module"]


def mask_bias(attn_mask: Optional[Tensor]):
    """timm's float ``attn_mask`` (added to the logits) as a descriptor."""
    return None if attn_mask is None else DenseBias(attn_mask)


def qkv_with_split_bias(m: nn.Module, x: Tensor) -> Tensor:
    """The fused projection of BEiT / EVA / Swin v2: separate q and v biases, a zero k bias buffer."""
    if m.q_bias is None:
        return m.qkv(x)
    bias = torch.cat((m.q_bias, m.k_bias, m.v_bias))
    if m.qkv_bias_separate:
        return m.qkv(x) + bias
    return F.linear(x, m.qkv.weight, bias)


def unmapped_call(attn_mask: Optional[Tensor], is_causal: bool) -> Optional[str]:
    """Why a call must run timm's forward (None: fastvit serves it)."""
    if is_causal:
        return "is_causal=True (attend() has no causal flag)"
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        return "a bool attn_mask (fastvit maps float masks only)"
    return None



def run_module(m: nn.Module, x: Tensor) -> Tensor:
    """``m(x)``, skipping the call when it is a no-op: an ``nn.Identity``, or an ``nn.Dropout`` in eval or of
    ``p = 0``, with no hook on it or on every module. A module call costs ~0.7 us on the CPU (a cached
    ``attend()`` call ~3 us): a ViT attention calls three such modules (``q_norm``, ``k_norm``, ``norm``)
    and ``proj_drop``. The module is asked at every call, so replacing it (LayerNorm q/k norms) or hooking
    it works as in timm."""
    kind = m.__class__
    if (kind is nn.Identity or kind is nn.Dropout and (m.p == 0.0 or not m.training)) and not (
            m._forward_hooks or m._forward_pre_hooks or _module._global_forward_hooks
            or _module._global_forward_pre_hooks):
        return x
    return m(x)
