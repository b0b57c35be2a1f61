"""``fastvit kernels``: the ahead-of-time compile report of the Triton kernels, run and written as JSON.

``fastvit.kernels.aot.compile_report`` compiles every kernel config for sm_80 / sm_90a and returns one row
per compile (registers, spills, shared memory, ok / error). This module loads it (a separate function so
tests can substitute a report), passes only the options that report accepts, and builds the JSON document.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

__all__ = ["load_compile_report", "run_compile_report", "report_document", "check_failures"]


def check_failures(report: list) -> list:
    """What ``fastvit kernels --check`` fails on (``fastvit.kernels.aot.check_failures``)."""
    from fastvit.kernels.aot import check_failures as failures

    return failures(report)


def load_compile_report() -> Callable[..., list]:
    """``fastvit.kernels.aot.compile_report`` (raises whatever importing it raises)."""
    from fastvit.kernels.aot import compile_report

    return compile_report


def run_compile_report(compile_report: Callable[..., list], capabilities: Optional[Sequence[int]] = None,
                       full: bool = False, workers: Optional[int] = None,
                       on_row: Optional[Callable[[dict], None]] = None) -> list:
    """The report's rows, passing each option only if ``compile_report`` takes it."""
    try:
        accepted = set(inspect.signature(compile_report).parameters)
    except (TypeError, ValueError):
        accepted = set()
    options = {"capabilities": list(capabilities) if capabilities else None, "full": full or None,
               "workers": workers or None, "progress": on_row}
    return list(compile_report(**{k: v for k, v in options.items() if v is not None and k in accepted}))


def report_document(report: list, failed: int) -> dict:
    """The ``fastvit-kernels`` JSON document of a report."""
    from fastvit.tools.env import git_info, versions

    return {"schema_version": 1, "kind": "fastvit-kernels", "versions": versions(),
            "git_commit": git_info()["commit"], "failed": failed, "results": report}
