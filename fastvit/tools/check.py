"""``fastvit check``: every attention backend against the reference, forward and backward, over the
cases of ``fastvit.attention.testing`` (dtypes, awkward shapes, every bias kind).

Each case builds q, k, v (and bias tables / dense biases) in the case's dtype, runs the backend, then
runs the reference on detached fp32 copies of the same inputs (TF32 off) and compares the output and
the gradients of q, k, v and of every trainable bias with the backend's own tolerances
(``Backend.tolerances[dtype]``). A case the backend refuses (``not_supported_reasons``) is a skip with
its reason, never a failure; an unavailable backend is skipped as a whole, with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from fastvit.attention import BACKENDS, attend, dtype_name, get_backend, make_inputs
from fastvit.attention.testing import (
    CheckCase,
    compare,
    fp32_copy,
    generate_cases,
    grad_scale,
    make_case_inputs,
    no_tf32,
    trainable,
)

__all__ = ["CaseResult", "run_case", "run_check"]


@dataclass
class CaseResult:
    """The outcome of one case. ``status`` is ``pass``, ``fail``, ``skip`` or ``error``."""

    case: CheckCase
    status: str
    worst: str = ""  # which tensor had the largest error relative to its tolerance: out, dq, dk, ...
    max_abs_err: Optional[float] = None
    index: Optional[tuple] = None
    atol: Optional[float] = None
    rtol: Optional[float] = None
    failed_fraction: Optional[float] = None
    reason: str = ""
    errors: dict = field(default_factory=dict)  # tensor name -> max abs err

    def to_dict(self) -> dict:
        B, H, Nq, Nk, D, Dv = self.case.shape
        return {
            "id": self.case.id, "backend": self.case.backend, "device": self.case.device,
            "dtype": dtype_name(self.case.dtype), "bias": self.case.bias,
            "window": None if self.case.window is None else self.case.window.describe(),
            "packed": None if self.case.packed is None else {"lengths": list(self.case.packed.lengths),
                                                             "kv_lengths": list(self.case.packed.kv_lengths)},
            "shape": {"B": B, "H": H, "Nq": Nq, "Nk": Nk, "D": D, "Dv": Dv},
            "status": self.status, "worst": self.worst, "max_abs_err": self.max_abs_err,
            "index": list(self.index) if self.index is not None else None,
            "atol": self.atol, "rtol": self.rtol, "failed_fraction": self.failed_fraction,
            "reason": self.reason, "errors": dict(self.errors),
        }


def run_case(case: CheckCase, *, seed: int = 0) -> CaseResult:
    """Run one case; never raises (an exception inside the backend is an ``error`` result)."""
    backend = get_backend(case.backend)
    ok, why = backend.availability()
    if not ok:
        return CaseResult(case, "skip", reason=f"unavailable: {why}")
    backward = backend.supports_backward
    q, k, v, bias = make_case_inputs(case, requires_grad=backward, seed=seed)
    try:
        reasons = backend.not_supported_reasons(make_inputs(q, k, v, bias=bias, **case.layout))
    except Exception as e:  # a capability check must not take the whole run down
        return CaseResult(case, "error", reason=f"not_supported_reasons raised {type(e).__name__}: {e}")
    if reasons:
        return CaseResult(case, "skip", reason="; ".join(reasons))

    atol, rtol = backend.tolerances[case.dtype]
    q32, k32, v32, bias32 = fp32_copy(q, k, v, bias)
    with no_tf32():
        try:
            out = attend(q, k, v, bias=bias, **case.layout, backend=case.backend)
        except Exception as e:
            return CaseResult(case, "error", atol=atol, rtol=rtol,
                              reason=f"forward raised {type(e).__name__}: {e}")
        ref = attend(q32, k32, v32, bias=bias32, **case.layout, backend="reference")
        checks = [("out", out, ref, atol, rtol)]
        if out.dtype != case.dtype:
            return CaseResult(case, "fail", worst="out", atol=atol, rtol=rtol,
                              reason=f"output dtype {out.dtype} != input dtype {case.dtype}")
        if backward:
            grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).to(ref.device)
            try:
                out.backward(grad_out.to(out.dtype))
            except Exception as e:
                return CaseResult(case, "error", atol=atol, rtol=rtol,
                                  reason=f"backward raised {type(e).__name__}: {e}")
            ref.backward(grad_out)
            for (name, t), (_, t32) in zip(trainable(q, k, v, bias), trainable(q32, k32, v32, bias32)):
                if t.grad is None:
                    return CaseResult(case, "fail", worst=f"d{name}", atol=atol, rtol=rtol,
                                      reason=f"no gradient for {name}")
                scale = grad_scale(t32.grad)
                checks.append((f"d{name}", t.grad, t32.grad, atol * scale * 4, rtol * 4))

    compared = []
    for name, actual, expected, a_tol, r_tol in checks:
        cmp = compare(actual, expected, a_tol, r_tol)
        compared.append((not cmp["ok"], cmp["max_abs_err"] / a_tol, name, a_tol, r_tol, cmp))
    # The tensor to report: the worst failing one, otherwise the one closest to its tolerance.
    failed, _, name, a_tol, r_tol, cmp = max(compared, key=lambda c: (c[0], c[1]))
    reason = ""
    if failed:
        reason = cmp["reason"] or f"{cmp['failed_fraction']:.2%} of {name} outside atol={a_tol:.2g} rtol={r_tol:.2g}"
    return CaseResult(case, "fail" if failed else "pass", worst=name, max_abs_err=cmp["max_abs_err"],
                      index=cmp["index"], atol=a_tol, rtol=r_tol, failed_fraction=cmp["failed_fraction"],
                      reason=reason, errors={c[2]: c[5]["max_abs_err"] for c in compared})


def run_check(backends: Optional[Iterable[str]] = None, device: str = "cpu", dtypes: Optional[Sequence] = None,
              patterns: Optional[Sequence[str]] = None, quick: bool = False,
              on_result: Optional[Callable[[CaseResult], None]] = None) -> tuple:
    """Run every case of the available backends.

    Returns:
        ``(results, unavailable)``: the ``CaseResult`` list, and ``{backend: reason}`` for backends
        that cannot run at all in this process (their cases are not generated).
    """
    names = [n for n in (backends if backends is not None else BACKENDS) if n != "reference"]
    unavailable, runnable = {}, []
    for name in names:
        backend = get_backend(name)
        ok, why = backend.availability()
        if not ok:
            unavailable[name] = why
        elif device not in backend.devices:
            unavailable[name] = f"does not run on {device} (runs on {', '.join(backend.devices)})"
        else:
            runnable.append(name)
    results = []
    for case in generate_cases(runnable, device, dtypes, patterns, quick):
        res = run_case(case)
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results, unavailable
