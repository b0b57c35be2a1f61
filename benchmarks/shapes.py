"""Benchmark shapes named after the models they come from (after xformers' benchmark shapes).

The shapes live in ``fastvit.tools.shapes`` (``fastvit bench`` uses them too); this module re-exports them
for the pytest-benchmark suites and for anyone scripting a benchmark:

    from shapes import ATTENTION_SHAPES, shape_by_name
    shape_by_name("vit_b16_1024").dims("cuda")   # (B, H, Nq, Nk, D, Dv)
"""

from __future__ import annotations

from fastvit.tools.contenders import HEADLINE_MODEL, default_models
from fastvit.tools.shapes import ATTENTION_SHAPES, AttentionShape

__all__ = ["ATTENTION_SHAPES", "AttentionShape", "HEADLINE_MODEL", "default_models", "shape_by_name"]


def shape_by_name(name: str) -> AttentionShape:
    for shape in ATTENTION_SHAPES:
        if shape.name == name:
            return shape
    raise KeyError(f"unknown shape {name!r}; known: {', '.join(s.name for s in ATTENTION_SHAPES)}")
