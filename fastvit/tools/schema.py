"""The one results schema of ``fastvit bench`` (``SCHEMA_VERSION``), its validator, and how every command
writes its JSON document (``write_json``).

The fields are listed in benchmarks/README.md ("Results schema"). Additions that old readers can ignore
keep the version (documents written before them still validate and plot):

- every ratio column ``X`` of a row (``x_reference``, ``x_einops``, ``x_vit_pytorch``, ``x_timm``,
  ``x_fp32``, and the overhead group's ``x_sdpa``, ``time_vs_timm``, ``extra_us_vs_sdpa``,
  ``extra_us_vs_sdpa_mask``) has ``X_ci``: ``[low, high]``, its 95% bootstrap interval over the
  group's rounds, or null (the base did not run, or fewer than 3 rounds hold both);
- every row has ``unstable`` (bool): some ratio of its group stayed wider than ``±precision``
  (``config.precision``) up to the group's hard cap; then ``unstable_reason`` says which;
- rows of ``kind: "overhead"`` (the host-path group) have ``median_us``, ``min_us``, ``iqr_us``, ``shape:
  {B, H, N, D}``, ``launch_noop``, and where the issue set one, ``target: {field, max, text}`` with
  ``target_met`` (bool, or null when the row did not run).
"""

from __future__ import annotations

import json
import os

SCHEMA_VERSION = 1


_TOP_LEVEL = {"schema_version": int, "kind": str, "device": str, "device_type": str, "dtype": list,
              "versions": dict, "git_commit": (str, type(None)), "timestamp": str, "config": dict,
              "results": list}
_ROW = {"kind": str, "name": str, "mode": str, "status": str}
_OK_ROW = {"median_ms": float, "min_ms": float, "samples": int, "calls": int}


def validate_document(doc: dict) -> list:
    """Problems with a results document (an empty list means it follows the schema)."""
    problems = []
    for key, kind in _TOP_LEVEL.items():
        if key not in doc:
            problems.append(f"missing top-level key {key!r}")
        elif not isinstance(doc[key], kind):
            problems.append(f"{key!r} is {type(doc[key]).__name__}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {doc.get('schema_version')!r} != {SCHEMA_VERSION}")
    for key in ("torch", "triton", "timm", "vit-pytorch"):
        if key not in doc.get("versions", {}):
            problems.append(f"versions lacks {key!r}")
    for i, row in enumerate(doc.get("results", [])):
        for key, kind in _ROW.items():
            if not isinstance(row.get(key), kind):
                problems.append(f"results[{i}].{key} is missing or not {kind.__name__}")
        if row.get("status") not in ("ok", "skipped", "error"):
            problems.append(f"results[{i}].status is {row.get('status')!r}")
        if row.get("status") == "ok":
            for key, kind in _OK_ROW.items():
                if not isinstance(row.get(key), (kind, int) if kind is float else kind):
                    problems.append(f"results[{i}].{key} is missing or not {kind.__name__}")
            if row["kind"] in ("model", "timm") and not isinstance(row.get("img_per_s"), float):
                problems.append(f"results[{i}].img_per_s is missing")
            if row["kind"] == "attention" and not isinstance(row.get("gflops"), float):
                problems.append(f"results[{i}].gflops is missing")
            if row["kind"] == "overhead" and not isinstance(row.get("median_us"), (float, int)):
                problems.append(f"results[{i}].median_us is missing")
        elif not row.get("reason"):
            problems.append(f"results[{i}] is {row.get('status')} without a reason")
        for key, value in row.items():
            if key.endswith("_ci") and value is not None and not _is_interval(value):
                problems.append(f"results[{i}].{key} is not [low, high]: {value!r}")
        for key in ("unstable", "target_met"):
            if row.get(key) is not None and not isinstance(row[key], bool):
                problems.append(f"results[{i}].{key} is not a bool")
    return problems


def _is_interval(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] <= value[1])


def write_json(path: str, doc) -> None:
    """``doc`` as indented JSON at ``path`` (folders made; values JSON lacks written as strings)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
