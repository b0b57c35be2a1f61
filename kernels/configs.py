"""Launch configurations and compile specs of the kernel family (shared by the launchers, the spill
table and the ahead-of-time report)."""

from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["Config", "CompileSpec"]


class Config(NamedTuple):
    """Launch parameters of one kernel (the AOT report lists one row per config and variant)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class CompileSpec(NamedTuple):
    """One kernel variant: what ``triton.compile`` needs to build it ahead of time, and the
    capabilities it is compiled for (empty: every capability of the report). ``divisible``: the
    arguments the run-time specialisation declares divisible by 16 (None: ``variants.divisible_by_16``
    derives them, for the attention family)."""

    kernel: str
    config: Config
    signature: dict
    constexprs: dict
    capabilities: tuple = ()
    divisible: Optional[tuple] = None
