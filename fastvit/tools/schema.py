"""The one results schema of ``fastvit bench`` (``SCHEMA_VERSION``), its validator, and how every command
writes its JSON document (``write_json``)."""

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
        elif not row.get("reason"):
            problems.append(f"results[{i}] is {row.get('status')} without a reason")
    return problems


def write_json(path: str, doc) -> None:
    """``doc`` as indented JSON at ``path`` (folders made; values JSON lacks written as strings)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
