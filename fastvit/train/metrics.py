"""``metrics.jsonl``: one JSON object per line, written by rank 0.

``{"kind": "step", "epoch", "step", "loss", "lr", "img_per_s"}`` every ``--log-every`` steps (the loss
averaged over the ranks and the steps since the last line; images per second over all ranks), and
``{"kind": "epoch", "epoch", "step", "loss", "lr", "img_per_s", "time_s"[, "val_top1"]}`` after each
epoch (the loss averaged over the epoch and the ranks; top-1 in percent on ``--val-data``).
``step`` counts optimiser steps, 1-based: the line is written after step ``step``.

On ``--resume`` the lines after the checkpoint's step are dropped (they belong to the epoch the
interrupted run lost) so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["MetricsLog", "read_metrics"]


def read_metrics(path: str) -> list:
    """Every record of a ``metrics.jsonl`` (a truncated last line is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """Appends records to ``path``; a no-op when not ``enabled`` (ranks other than 0).

    Args:
        path: the ``metrics.jsonl``.
        enabled: write at all.
        resume_step: None for a fresh run (the file is started over); else keep the records up to this step.
    """

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int] = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = [] if resume_step is None else [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        with open(path, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
