"""A pytest plugin that streams every test outcome to a JSON-lines file as it happens.

    PYTHONPATH=benchmarks pytest -p pytest_record --record-to results.jsonl tests/kernels

Used by ``gpu_check.py``: a run stopped at its time limit still leaves every outcome it reached (a
junit XML is written only at the end). Each line: ``{"nodeid", "outcome", "when", "duration_s",
"message"}``; ``message`` is the assertion text for failures (``tests/helpers.py:assert_close``
names the worst element, its index and the failing fraction) and the reason for skips. Works under
pytest-xdist: reports reach the controller process, which writes them.
"""

from __future__ import annotations

import json
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--record-to", default=None, help="append one JSON line per test outcome to this file")


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = getattr(report, "longreprtext", "") or ""
    # The "E   ..." lines are the assertion's own words; keep them, else the tail of the traceback.
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return "\n".join(errors)[-2000:] if errors else text[-2000:]


class _Recorder:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report):
        # One line per test: its call phase, or the setup/teardown phase that failed or skipped it.
        if report.when != "call" and report.passed:
            return
        line = {"nodeid": report.nodeid, "outcome": report.outcome, "when": report.when,
                "duration_s": round(report.duration, 3), "message": "" if report.passed else _message(report)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def pytest_configure(config):
    path = config.getoption("--record-to")
    # Under xdist only the controller writes (workers have ``workerinput``).
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Recorder(path), "fastvit-record")
