"""fastvit.kernels: fused Triton attention kernels, their launchers, autograd and references.

Installed as ``fastvit.kernels`` (setup.py ``package_dir``). It knows nothing about models or
dispatch and depends on torch and triton only. Importing it never fails when triton is missing:
``available()`` then says why, and the launchers raise ``RuntimeError`` with the same reason.

Modules:
    attention: the fused attention family's entry points: launchers, input checks, custom ops and
        autograd, reference. Its kernels, one pass per file: attention_fwd (forward, CLS row),
        attention_bwd (the three-pass backward); attention_configs chooses their configs (preference
        lists, spill table, tuned tables); tiles holds the jit helpers they share.
    varlen: fused attention over packed variable-length sequences (``cu_seqlens``: a grid over each
        sequence's own blocks, no padding), its kernels in varlen_fwd and varlen_bwd (launchers,
        custom ops and autograd, reference).
    triton_compat: the triton import (a stub without triton, so the package always imports).
    window_attention: fused attention inside (shifted or dilated) windows of a raster token grid,
        addressed in place (kernels, launchers, custom ops, capability check, reference).
    configs: the ``Config`` / ``CompileSpec`` records.
    spill_table: generated data: the configs that spill on sm_80 / sm_90a (``PRUNED``).
    variants: every variant the launchers can launch, as compile specs (``iter_compile_specs``).
    aot: ahead-of-time compile report (registers, spills, shared memory) for sm_80 and sm_90a.
    tuned/: per-device tuned config tables (``<device-slug>.json``), written by ``fastvit tune``.

Tuning API (``fastvit tune`` calls it): ``candidate_configs``, ``tune_key``, ``forced_configs``,
``tuned_path``, ``load_tuned``; the JSON format is documented in ``attention_configs`` (tuned tables).
``DETERMINISTIC_BIAS_GRADS`` is True: the bias gradients are bitwise reproducible run to run.

``fastvit.kernels.attention`` is the module (``from fastvit.kernels import attention as kattn``,
then ``kattn.attention(q, k, v, ...)``): a function of the same name re-exported here would shadow
the submodule, so the differentiable entry point is re-exported as ``fused_attention``; likewise
``fastvit.kernels.window_attention`` is the module and ``fused_window_attention`` its entry point.
"""

from __future__ import annotations

import os

import torch

from . import attention, varlen, window_attention
from .attention import (
    DETERMINISTIC_BIAS_GRADS,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    TUNABLE_KERNELS,
    Config,
    attention_bwd,
    attention_bwd_ref,
    attention_fwd,
    attention_ref,
    attention_with_cls_probs,
    backward_path,
    candidate_configs,
    forced_configs,
    load_tuned,
    not_supported_reasons,
    tune_key,
    tuned_path,
)
from .attention import attention as fused_attention
from .variants import iter_compile_specs
from .varlen import varlen_attention, varlen_attention_bwd, varlen_attention_fwd, varlen_attention_ref
from .window_attention import window_attention as fused_window_attention
from .window_attention import (
    window_attention_bwd,
    window_attention_fwd,
    window_attention_ref,
    window_not_supported_reasons,
)

__all__ = [
    "DETERMINISTIC_BIAS_GRADS",
    "MAX_HEAD_DIM",
    "TUNABLE_KERNELS",
    "Config",
    "candidate_configs",
    "forced_configs",
    "load_tuned",
    "tune_key",
    "tuned_path",
    "SUPPORTED_DTYPES",
    "attention",
    "attention_bwd",
    "attention_bwd_ref",
    "attention_fwd",
    "attention_ref",
    "attention_with_cls_probs",
    "available",
    "backward_path",
    "fused_attention",
    "fused_window_attention",
    "iter_compile_specs",
    "not_supported_reasons",
    "varlen",
    "varlen_attention",
    "varlen_attention_bwd",
    "varlen_attention_fwd",
    "varlen_attention_ref",
    "window_attention",
    "window_attention_bwd",
    "window_attention_fwd",
    "window_attention_ref",
    "window_not_supported_reasons",
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
