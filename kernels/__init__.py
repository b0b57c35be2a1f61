"""fastvit's Triton kernels, installed as ``fastvit.kernels``.

A separate layer with no model knowledge: each family has its kernels, launchers, autograd and a
``*_ref`` PyTorch twin (``attention.py``); ``aot.py`` compiles every config ahead of time.
Importing this package never fails without triton: ``available()`` says why the kernels cannot run.
"""

from __future__ import annotations

import os

from . import attention
from .attention import attention_ref

__all__ = ["attention", "attention_ref", "available"]


def available() -> tuple[bool, str]:
    """Whether the kernels can run in this process, and if not, why."""
    if not attention.HAS_TRITON:
        return False, "triton is not installed (pip install triton; Linux only)"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the Triton interpreter)"
