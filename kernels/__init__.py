"""fastvit.kernels: fused Triton attention kernels, their launchers, autograd and references.

Installed as ``fastvit.kernels`` (setup.py ``package_dir``). It knows nothing about models or
dispatch and depends on torch and triton only. Importing it never fails when triton is missing:
``available()`` then says why, and the launchers raise ``RuntimeError`` with the same reason.

Modules:
    attention: the fused attention family (forward, CLS probabilities, backward, reference).
    aot: ahead-of-time compile report (registers, spills, shared memory) for sm_80 and sm_90a.

``fastvit.kernels.attention`` is the module (``from fastvit.kernels import attention as kattn``,
then ``kattn.attention(q, k, v, ...)``): a function of the same name re-exported here would shadow
the submodule, so the differentiable entry point is re-exported as ``fused_attention``.
"""

from __future__ import annotations

import os

import torch

from . import attention
from .attention import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    AttentionFn,
    attention_bwd,
    attention_fwd,
    attention_ref,
    attention_with_cls_probs,
    iter_compile_specs,
    not_supported_reasons,
)
from .attention import attention as fused_attention

__all__ = [
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "AttentionFn",
    "attention",
    "attention_bwd",
    "attention_fwd",
    "attention_ref",
    "attention_with_cls_probs",
    "available",
    "fused_attention",
    "iter_compile_specs",
    "not_supported_reasons",
]


def available() -> tuple[bool, str]:
    """Whether the kernels can run in this process: ``(True, "")`` or ``(False, reason)``."""
    from .attention import _TRITON_IMPORT_ERROR

    if _TRITON_IMPORT_ERROR is not None:
        return False, f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (the triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU)"
    return True, ""
