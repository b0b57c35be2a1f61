"""Planning and running ``fastvit bench``: groups of contenders, each timed as ONE interleaved run,
summarised as rows of one results document (schema: ``fastvit.tools.schema``).

Every ratio column of a row is a ``Comparison`` with another contender of its group: the value from
the two medians, its ``<column>_ci`` from the rounds both were sampled in (``timing.ratio_interval``).
The speed-up ratios are watched while the group is timed; a group whose intervals stay wider than
``±precision`` up to the hard cap is marked ``unstable`` in every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from fastvit.attention import BACKENDS, DTYPES
from fastvit.tools.contenders import (
    HEADLINE_MODEL,
    OVERHEAD_TARGETS,
    SDPA_MASK,
    SDPA_RAW,
    TIMM_ATTENTION,
    TIMM_PATCHED,
    attention_contenders,
    model_contenders,
    overhead_contenders,
    select_models,
    timm_patch_contenders,
    window_contenders,
)
from fastvit.tools.env import cpu_pressure, default_device, environment
from fastvit.tools.schema import SCHEMA_VERSION
from fastvit.tools.shapes import (
    ATTENTION_SHAPES,
    WINDOW_SHAPES,
    attention_bytes,
    attention_flops,
    peak_gbps,
    peak_tflops,
)
from fastvit.tools.timing import (
    MIN_PAIRS,
    difference_interval,
    paired_samples,
    ratio_interval,
    time_interleaved,
    unsettled,
)
from fastvit.tools.timm_models import select_timm_models


@dataclass
class BenchConfig:
    """What ``fastvit bench`` runs. ``None`` fields take the documented defaults.

    Attributes:
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        dtypes: dtype names for every group (default: fp32, plus a fastvit bf16-autocast row in the
            headline model group where the device has bf16).
        batch_size: model batch size (default 8 for the headline model, 2 (CPU) / 8 (CUDA) for the
            others); for attention it overrides each shape's batch.
        backends: backend names (and ``auto``) (default: all registered + auto for attention and the
            headline model; auto only for the other models).
        models: glob patterns of presets (default: ``default_models()``); an empty list skips models.
        shapes: glob patterns of attention shapes (default: all); an empty list skips attention.
        windows: glob patterns (or ``all``) of windowed attention shapes (``WINDOW_SHAPES``; default:
            none): every backend through ``attend(..., window=...)`` vs ``einops`` (the models' own
            window cut, copies and expanded mask included). Shapes not sized for the device are
            listed as skipped with the reason.
        backward: also time forward + backward.
        quick: tiny sizes and budgets (tests, smoke runs).
        group_seconds: time budget of one group's timed rounds (default 5 s CPU / 1.5 s CUDA, 0.2 s
            quick); the headline model group gets 5x.
        max_seconds: wall-time target of the run (default 165 s for a full CPU run, 0 = none). When
            the machine is slower than planned (a loaded shared CPU), later groups get smaller
            budgets, down to one sample per contender.
        tune_allocator: call ``fastvit.runtime.tune_cpu_allocator()`` first (glibc keeps freed memory
            for reuse instead of page-faulting it back; it applies to every contender of the process).
        timm_patch: glob patterns over ``fastvit.tools.timm_models`` (timm names or families; ``all``,
            ``default``): one group each, timm unpatched vs ``patch_timm`` vs ``patch_timm(linear=True)``
            (default: none).
        overhead: the host-path group (``overhead_contenders``: µs per call on ``[1, 1, 16, 16]``, raw
            SDPA vs ``attend()`` and each descriptor, the triton launch path, timm's Attention patched)
            (default: in a full run, i.e. neither ``quick`` nor ``models`` / ``shapes`` given; it takes
            at most 2 s of timing, 4 s at its hard cap).
        packed: the ``packed`` group (``fastvit.tools.packed_bench``): 16 mixed-resolution images through
            NaViT at ViT-S width, packed vs padded vs vit-pytorch, and one attention call packed vs
            padded (default: off; ``--packed``), in each dtype and mode.
        ats: the ``ats`` group: ATS-ViT-S/16 at its default sampling, batch 8 (``--batch-size``), kept
            tokens packed (``packed=True``) vs padded with a key mask, same weights (default: off; ``--ats``).
        merge: the ``merge`` groups (``fastvit.tools.merge_bench``): ViT-S/B/L/16 at 224 px, batch 8,
            fastvit and timm, r in {0, 8, 16} tokens merged per block, fp32 and bf16 autocast unless
            --dtype says otherwise (default: off; ``--merge``; ``--quick``: ViT-S at tiny sizes).
        precision: the relative half-width (0.05 = ``±5%``) every ratio's 95% interval should reach;
            a group keeps sampling past its budget until it does or its hard cap (2x the budget) is
            reached, and is marked ``unstable`` if not.
    """

    device: Optional[str] = None
    dtypes: Optional[list] = None
    batch_size: Optional[int] = None
    backends: Optional[list] = None
    models: Optional[list] = None
    shapes: Optional[list] = None
    windows: Optional[list] = None
    backward: bool = False
    quick: bool = False
    group_seconds: Optional[float] = None
    min_samples: int = 3
    vit_pytorch: bool = True
    timm: bool = True
    memory: bool = True
    max_seconds: Optional[float] = None
    threads: Optional[int] = None
    tune_allocator: bool = False
    timm_compile: bool = False
    timm_patch: Optional[list] = None
    overhead: Optional[bool] = None
    packed: bool = False
    ats: bool = False
    merge: bool = False
    precision: float = 0.05

    def resolved_device(self) -> str:
        return self.device or default_device()

    def resolved_max_seconds(self) -> Optional[float]:
        """The wall-time target of the whole run: 165 s for a full CPU run, none elsewhere (0 = none)."""
        if self.max_seconds is not None:
            return self.max_seconds or None
        if self.quick or torch.device(self.resolved_device()).type != "cpu":
            return None
        return 165.0


@dataclass
class Group:
    """One interleaved run: its contenders are built only when the group runs (models are freed after)."""

    kind: str  # "attention" | "model" | "timm" (a timm model, unpatched vs patched) | "overhead"
    name: str
    mode: str
    dtype: Optional[str]  # attention groups have one dtype; model groups may mix
    budget_s: float
    build: Callable[[], tuple] = field(repr=False, default=None)
    measure_memory: bool = True

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name} {self.dtype or ''} {self.mode}".replace("  ", " ")


def _bf16_ok(device: str) -> bool:
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


OVERHEAD_GROUP = "b1_h1_n16_d16"
OVERHEAD_BUDGET_S = 2.0  # tiny calls: ~15 rounds of every contender fit; the default run stays < 10 s longer


def _wants_overhead(config: BenchConfig) -> bool:
    if config.overhead is not None:
        return config.overhead
    return not config.quick and config.models is None and config.shapes is None


def plan(config: BenchConfig) -> list:
    """The groups of a run, in order: attention shapes, models, patched timm models, the host path."""
    device = config.resolved_device()
    cuda = torch.device(device).type == "cuda"
    base = config.group_seconds or (0.2 if config.quick else 1.5 if cuda else 5.0)
    modes = ["fwd", "fwd+bwd"] if config.backward else ["fwd"]
    explicit_dtypes = config.dtypes is not None
    dtype_names = list(config.dtypes) if explicit_dtypes else ["fp32"]
    for d in dtype_names:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if config.backends is not None:
        for b in config.backends:
            if b != "auto" and b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r}; known: {', '.join(BACKENDS)} or auto")

    groups = []
    shapes = ATTENTION_SHAPES
    if config.shapes is not None:
        shapes = [s for s in ATTENTION_SHAPES if any(fnmatch.fnmatchcase(s.name, p) for p in config.shapes)]
        if config.shapes and not shapes:
            raise ValueError(f"no attention shape matches {config.shapes}; known: "
                             f"{', '.join(s.name for s in ATTENTION_SHAPES)}")
    attention_groups = [(shape, attention_contenders) for shape in shapes]
    attention_groups += [(shape, window_contenders) for shape in select_window_shapes(config.windows)]
    for shape, contenders in attention_groups:
        for dt in dtype_names:
            for mode in modes:
                groups.append(Group(
                    "attention", shape.name, mode, dt, base,
                    functools.partial(contenders, shape, device=device, dtype=DTYPES[dt], mode=mode,
                                      backends=config.backends, quick=config.quick,
                                      batch_size=config.batch_size)))

    models = select_models(config.models) if config.models is None or config.models else []
    for i, name in enumerate(models):
        headline = i == 0 and name == HEADLINE_MODEL and config.models is None
        if config.batch_size:
            batch = config.batch_size
        else:
            batch = 8 if (headline or name == HEADLINE_MODEL) else (8 if cuda else 2)
            if config.quick:
                batch = 2
        backends = config.backends
        if backends is None and not headline and config.models is None:
            backends = ["auto"]  # the default run's budget: the full backend sweep on the headline model
        extra = []
        if headline and not explicit_dtypes and _bf16_ok(device):
            extra = [torch.bfloat16]
        for mode in modes:
            groups.append(Group(
                "model", name, mode, None if extra else "+".join(dtype_names),
                base * (5 if headline else 1),
                functools.partial(model_contenders, name, device=device, dtypes=[DTYPES[d] for d in dtype_names],
                                  mode=mode, batch_size=batch, backends=backends, vit_pytorch=config.vit_pytorch,
                                  timm=config.timm, quick=config.quick, extra_auto_dtypes=extra,
                                  timm_compile=config.timm_compile)))

    for entry in select_timm_models(config.timm_patch):
        for mode in modes:
            groups.append(Group(
                "timm", entry.name, mode, "+".join(dtype_names), base,
                functools.partial(timm_patch_contenders, entry, device=device,
                                  dtypes=[DTYPES[d] for d in dtype_names], mode=mode,
                                  batch_size=config.batch_size, quick=config.quick)))

    if config.packed:
        from fastvit.tools.packed_bench import PACKED_ATTENTION_GROUP, PACKED_GROUP, packed_contenders

        for dt in dtype_names:
            for mode in modes:
                for name, part, budget in ((PACKED_GROUP, "models", base * (1 if config.quick else 4)),
                                           (PACKED_ATTENTION_GROUP, "attention", base)):
                    groups.append(Group("packed", name, mode, dt, budget,
                                        functools.partial(packed_contenders, device=device, dtype=DTYPES[dt],
                                                          mode=mode, quick=config.quick, part=part)))

    if config.ats:
        from fastvit.tools.packed_bench import ATS_GROUP, ats_contenders

        for dt in dtype_names:
            for mode in modes:
                groups.append(Group("ats", ATS_GROUP, mode, dt, base,
                                    functools.partial(ats_contenders, device=device, dtype=DTYPES[dt], mode=mode,
                                                      batch_size=config.batch_size or (2 if config.quick else 8),
                                                      quick=config.quick)))

    if config.merge:
        from fastvit.tools.merge_bench import MERGE_MODELS, merge_contenders

        merge_dtypes = dtype_names if explicit_dtypes else ["fp32"] + (["bf16"] if _bf16_ok(device) else [])
        for name in MERGE_MODELS[:1] if config.quick else MERGE_MODELS:
            for dt in merge_dtypes:
                groups.append(Group("merge", name, "fwd", dt, base * (1 if config.quick else 2),
                                    functools.partial(merge_contenders, name, device=device, dtype=DTYPES[dt],
                                                      batch_size=config.batch_size or (2 if config.quick else 8),
                                                      quick=config.quick)))

    if _wants_overhead(config):  # fp32 and forward whatever --dtype / --backward say: a host-path cost
        groups.append(Group("overhead", OVERHEAD_GROUP, "fwd", "fp32",
                            config.group_seconds or min(base, OVERHEAD_BUDGET_S),
                            functools.partial(overhead_contenders, device=device),
                            measure_memory=False))
    return groups


class Comparison(NamedTuple):
    """The ``column`` of contender ``name``'s row, against contender ``base`` of the same group.

    ``form``: ``speedup`` = base time / this time (>1 = faster than the base, the ``x_*`` columns);
    ``time_ratio`` = this time / base time; ``extra_us`` = this time - base time, in µs per call.
    """

    column: str
    name: str
    base: str
    form: str = "speedup"

    def value(self, base_t: float, t: float) -> Optional[float]:
        if base_t <= 0 or t <= 0:
            return None
        if self.form == "speedup":
            return base_t / t
        if self.form == "time_ratio":
            return t / base_t
        return (t - base_t) * 1e6

    def interval(self, base_samples: list, samples: list) -> list:
        if self.form == "speedup":
            return list(ratio_interval(base_samples, samples))
        if self.form == "time_ratio":
            return list(ratio_interval(samples, base_samples))
        return [d * 1e6 for d in difference_interval(base_samples, samples)]


def _comparisons(group: Group, contenders: list) -> list:
    """Every ratio column of the group's rows, as ``Comparison``s (the contenders' own rows included:
    the base's ratio to itself is 1 with the interval ``[1, 1]``)."""
    names = {c.name for c in contenders}
    out = []
    if group.kind == "attention":
        _, window = _shape_and_window(group)
        for c in contenders:
            if "reference" in names:
                out.append(Comparison("x_reference", c.name, "reference"))
            if window is not None and "einops" in names:
                out.append(Comparison("x_einops", c.name, "einops"))
    elif group.kind in ("model", "timm"):
        for c in contenders:
            dt = c.meta["dtype"]
            for column, base in (("x_vit_pytorch", f"vit-pytorch {dt}"), ("x_timm", f"timm {dt}")):
                if base in names:
                    out.append(Comparison(column, c.name, base))
            same_fp32 = c.name.rsplit(" ", 1)[0] + " fp32"
            if dt != "fp32" and same_fp32 in names:
                out.append(Comparison("x_fp32", c.name, same_fp32))
    elif group.kind == "packed":
        from fastvit.tools.packed_bench import (
            ATTEND_PADDED,
            PACKED,
            PADDED,
            SDPA_BLOCK_DIAGONAL,
            VIT_PYTORCH,
            attend_packed,
        )

        attention = [attend_packed(b) for b in ("auto", "triton", "flex", "sdpa")] + [ATTEND_PADDED,
                                                                                     SDPA_BLOCK_DIAGONAL]
        for c in contenders:
            if c.name in (PACKED, PADDED, VIT_PYTORCH) and VIT_PYTORCH in names:
                out.append(Comparison("x_vit_pytorch", c.name, VIT_PYTORCH))
            if c.name in (PACKED, PADDED) and PADDED in names:
                out.append(Comparison("x_padded", c.name, PADDED))
            if c.name in attention and ATTEND_PADDED in names:
                out.append(Comparison("x_padded", c.name, ATTEND_PADDED))
            if c.name == attend_packed("triton") and attend_packed("flex") in names:
                out.append(Comparison("x_flex", c.name, attend_packed("flex")))
    elif group.kind == "merge":
        from fastvit.tools.merge_bench import contender_name

        for c in contenders:
            base = contender_name(c.meta["impl"], 0, c.meta["dtype"])
            if base in names:
                out.append(Comparison("x_r0", c.name, base))
    elif group.kind == "ats":
        from fastvit.tools.packed_bench import ATS_PADDED

        out += [Comparison("x_padded", c.name, ATS_PADDED) for c in contenders if ATS_PADDED in names]
    elif group.kind == "overhead":
        for c in contenders:
            if c.name in (TIMM_ATTENTION, TIMM_PATCHED):
                if TIMM_ATTENTION in names:
                    out += [Comparison("x_timm", c.name, TIMM_ATTENTION),
                            Comparison("time_vs_timm", c.name, TIMM_ATTENTION, "time_ratio")]
                continue
            if SDPA_RAW in names:
                out += [Comparison("x_sdpa", c.name, SDPA_RAW),
                        Comparison("extra_us_vs_sdpa", c.name, SDPA_RAW, "extra_us")]
            if c.name in ("attend RelPosBias", "attend DenseBias") and SDPA_MASK in names:
                # the honest base of a biased call: SDPA with the dense float mask it ends up as
                out.append(Comparison("extra_us_vs_sdpa_mask", c.name, SDPA_MASK, "extra_us"))
    return out


def _watched(comparisons: list) -> list:
    """The ``(base, contender)`` pairs whose ratio must reach the precision (each pair once)."""
    pairs = [(c.base, c.name) for c in comparisons if c.form != "extra_us" and c.base != c.name]
    return list(dict.fromkeys(pairs))


def _apply_comparisons(rows: list, contenders: list, comparisons: list, measured: dict) -> None:
    """Sets each comparison's column and ``<column>_ci`` (None: the base did not run, or fewer than
    ``MIN_PAIRS`` rounds hold both) on the rows that ran."""
    ran = {c.name for c in contenders if c.skip_reason is None and measured[c.name].ok}
    by_name = {row["contender"]: row for row in rows}
    for cmp in comparisons:
        row = by_name.get(cmp.name)
        if row is None or row.get("status") != "ok":
            continue
        value = interval = None
        if cmp.base in ran:
            value = cmp.value(measured[cmp.base].median, measured[cmp.name].median)
            if cmp.base == cmp.name:
                interval = None if value is None else [value, value]
            else:
                base_samples, samples = paired_samples(measured[cmp.base], measured[cmp.name])
                if value is not None and len(samples) >= MIN_PAIRS:
                    interval = cmp.interval(base_samples, samples)
        row[cmp.column] = value
        row[f"{cmp.column}_ci"] = interval


def _unstable(contenders: list, comparisons: list, measured: dict, precision: float) -> list:
    """``"<contender> / <base> ±7.2%"`` for each watched ratio still wider than ``±precision``."""
    ran = {c.name for c in contenders if c.skip_reason is None and measured[c.name].ok}
    watch = [(base, name) for base, name in _watched(comparisons) if base in ran and name in ran]
    return [f"{name} / {base} " + ("too few paired rounds" if width is None else f"±{100 * width:.1f}%")
            for base, name, width in unsettled(measured, watch, precision)]


def _status(row: dict, contender, m) -> bool:
    """Adds the timing and the status (skipped / error) to ``row``; True when the contender ran."""
    row.update(m.row())
    if contender.skip_reason is not None:
        row.update(status="skipped", reason=contender.skip_reason)
    elif not m.ok:
        row.update(status="error", reason=m.error or "no samples")
    return contender.skip_reason is None and m.ok


def select_window_shapes(patterns) -> list:
    """Windowed shapes matching any glob (``all``: every one); none for None or an empty list."""
    if not patterns:
        return []
    shapes = [s for s in WINDOW_SHAPES if any(p == "all" or fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    if not shapes:
        raise ValueError(f"no windowed shape matches {patterns}; known: {', '.join(s.name for s in WINDOW_SHAPES)}")
    return shapes


def _shape_and_window(group: Group) -> tuple:
    shape = next(s for s in (*ATTENTION_SHAPES, *WINDOW_SHAPES) if s.name == group.name)
    window = shape.window_for(group.build.keywords.get("quick", False)) if group.build else None
    return shape, window


def _attention_rows(group: Group, contenders: list, dims: tuple, measured: dict, device: str = "cpu") -> list:
    B, H, Nq, Nk, D, Dv = dims
    shape, window = _shape_and_window(group)
    dtype = DTYPES[group.dtype]
    peak = peak_tflops(device, dtype)
    hbm = peak_gbps(device)
    rows = []
    for c in contenders:
        m = measured[c.name]
        row = {"kind": "attention", "name": group.name, "contender": c.name, "backend": c.meta.get("backend"),
               "served_by": c.meta.get("served_by"), "dtype": group.dtype, "mode": group.mode,
               "bias": shape.bias, "cls_probs": shape.cls_probs,
               "shape": {"B": B, "H": H, "Nq": Nq, "Nk": Nk, "D": D, "Dv": Dv}, "source": shape.source}
        if window is not None:
            row["window"] = window.describe()
        if _status(row, c, m):
            t = m.median
            keys = window.tokens if window is not None else None
            gflops = attention_flops(dims, group.mode, keys_per_query=keys) / t * 1e-9
            gbps = attention_bytes(dims, dtype, group.mode) / t * 1e-9
            row.update(status="ok", reason="", gflops=gflops, tflops=gflops * 1e-3,
                       pct_peak=100.0 * gflops * 1e-3 / peak if peak else None, peak_tflops=peak,
                       gbps=gbps, x_reference=None, x_reference_ci=None)  # ratios: _apply_comparisons
            if window is not None:  # memory-bound: GB/s of q, k, v, o against the HBM's
                row.update(x_einops=None, x_einops_ci=None, peak_gbps=hbm,
                           pct_hbm=100.0 * gbps / hbm if hbm else None)
        rows.append(row)
    return rows


def _model_rows(group: Group, contenders: list, info: dict, measured: dict, batch_size: int) -> list:
    rows = []
    for c in contenders:
        m = measured[c.name]
        dt = c.meta["dtype"]
        row = {"kind": group.kind, "name": group.name, "contender": c.name, "impl": c.meta["impl"],
               "backend": c.meta.get("backend"), "dtype": dt, "mode": group.mode, "batch_size": batch_size,
               "input_size": info["input_size"], "params": info["params"], "vit_pytorch": info["vit_pytorch"],
               "timm_model": info.get("timm_model"), "compiled": bool(c.meta.get("compiled"))}
        if "family" in c.meta:
            row["family"] = c.meta["family"]
        if _status(row, c, m):  # the ratios: _apply_comparisons
            row.update(status="ok", reason="", img_per_s=batch_size / m.median,
                       **{key: None for key in ("x_vit_pytorch", "x_timm", "x_fp32", "x_vit_pytorch_ci", "x_timm_ci",
                                                "x_fp32_ci")})
        rows.append(row)
    return rows


def _overhead_rows(group: Group, contenders: list, info: dict, measured: dict) -> list:
    B, H, N, D = info["dims"]
    rows = []
    for c in contenders:
        m = measured[c.name]
        row = {"kind": "overhead", "name": group.name, "contender": c.name, "backend": c.meta.get("backend"),
               "served_by": c.meta.get("served_by"), "dtype": group.dtype, "mode": group.mode,
               "shape": {"B": B, "H": H, "N": N, "D": D}, "launch_noop": bool(c.meta.get("launch_noop"))}
        if "timm_model" in c.meta:
            row["timm_model"] = c.meta["timm_model"]
        if _status(row, c, m):
            row.update(status="ok", reason="", median_us=m.median * 1e6, min_us=m.min * 1e6,
                       iqr_us=None if m.iqr is None else m.iqr * 1e6)
        rows.append(row)
    return rows


def _merge_rows(group: Group, contenders: list, info: dict, measured: dict) -> tuple:
    from fastvit.tools.merge_bench import merge_targets

    rows = []
    for c in contenders:
        m = measured[c.name]
        row = {"kind": "merge", "name": group.name, "contender": c.name, "impl": c.meta.get("impl"),
               "backend": c.meta.get("backend"), "dtype": group.dtype, "mode": group.mode, "r": c.meta.get("r"),
               "batch_size": info["batch_size"], "input_size": info["input_size"],
               "tokens_last_block": info["tokens_last_block"].get(c.name),
               "matching_share": info["matching_share"].get(c.name)}
        if _status(row, c, m):
            row.update(status="ok", reason="", img_per_s=info["batch_size"] / m.median, x_r0=None, x_r0_ci=None)
        rows.append(row)
    return rows, merge_targets


def _ats_rows(group: Group, contenders: list, info: dict, measured: dict) -> tuple:
    from fastvit.tools.packed_bench import ats_targets

    rows = []
    for c in contenders:
        m = measured[c.name]
        row = {"kind": "ats", "name": group.name, "contender": c.name, "impl": c.meta.get("impl"),
               "backend": c.meta.get("backend"), "dtype": group.dtype, "mode": group.mode,
               "batch_size": info["batch_size"], "input_size": info["input_size"]}
        if _status(row, c, m):
            row.update(status="ok", reason="", img_per_s=info["batch_size"] / m.median, x_padded=None,
                       x_padded_ci=None)
        rows.append(row)
    return rows, ats_targets


def _packed_rows(group: Group, contenders: list, info: dict, measured: dict) -> tuple:
    from fastvit.tools.packed_bench import packed_targets

    rows = []
    for c in contenders:
        m = measured[c.name]
        row = {"kind": "packed", "name": group.name, "contender": c.name, "impl": c.meta.get("impl"),
               "backend": c.meta.get("backend"), "served_by": c.meta.get("served_by"), "dtype": group.dtype,
               "mode": group.mode, "images": len(info["lengths"]), "tokens": info["tokens"],
               "padded_tokens": info["padded_tokens"], "padding_fraction": info["padding_fraction"],
               "model": info["model"]}
        if _status(row, c, m):
            row.update(status="ok", reason="", img_per_s=len(info["lengths"]) / m.median,
                       **{key: None for key in ("x_padded", "x_padded_ci", "x_vit_pytorch", "x_vit_pytorch_ci",
                                                "x_flex", "x_flex_ci")})
        rows.append(row)
    return rows, packed_targets


def _add_targets(rows: list) -> None:
    """The overhead group's targets (``OVERHEAD_TARGETS``): ``target`` and ``target_met`` on their rows
    (``target_met`` None when the row did not run; judged on the median, the interval is beside it)."""
    for row in rows:
        target = OVERHEAD_TARGETS.get(row["contender"])
        if target is None:
            continue
        column, limit, text = target
        value = row.get(column) if row["status"] == "ok" else None
        row["target"] = {"field": column, "max": limit, "text": text}
        row["target_met"] = None if value is None else bool(value <= limit)


def run_group(group: Group, config: BenchConfig, on_round: Optional[Callable[[float], None]] = None) -> list:
    """Build, time and summarise one group; a group that fails to build becomes one error row."""
    device = config.resolved_device()
    try:
        built = group.build()
    except Exception as e:  # noqa: BLE001
        return [{"kind": group.kind, "name": group.name, "contender": None, "dtype": group.dtype,
                 "mode": group.mode, "status": "error", "reason": f"building the group failed: "
                 f"{type(e).__name__}: {e}"}]
    contenders, extra = built
    info = extra if isinstance(extra, dict) else {}
    comparisons = _comparisons(group, contenders)
    started = time.perf_counter()
    with info.get("scope", contextlib.nullcontext)():  # the overhead group's inference mode and launch no-op
        measured = time_interleaved(contenders, device, budget_s=group.budget_s, min_samples=config.min_samples,
                                    measure_memory=config.memory and group.measure_memory, on_round=on_round,
                                    precision=config.precision, watch=_watched(comparisons))
    wall = time.perf_counter() - started
    if group.kind == "attention":
        rows = _attention_rows(group, contenders, extra, measured, device)
    elif group.kind == "overhead":
        rows = _overhead_rows(group, contenders, info, measured)
    elif group.kind == "packed":
        rows, targets_of = _packed_rows(group, contenders, info, measured)
    elif group.kind == "ats":
        rows, targets_of = _ats_rows(group, contenders, info, measured)
    elif group.kind == "merge":
        rows, targets_of = _merge_rows(group, contenders, info, measured)
    else:
        rows = _model_rows(group, contenders, extra, measured,
                           extra.get("batch_size") or group.build.keywords["batch_size"])
    _apply_comparisons(rows, contenders, comparisons, measured)
    if group.kind == "overhead":
        _add_targets(rows)
    if group.kind in ("packed", "ats", "merge"):  # after the ratios: the targets read them
        for row in rows:
            targets = targets_of(row)
            if targets is not None:
                row["targets"] = targets
    wide = _unstable(contenders, comparisons, measured, config.precision)
    for row in rows:
        row["group_wall_s"] = wall
        row["unstable"] = bool(wide)
        if wide:
            row["unstable_reason"] = (f"95% interval wider than ±{100 * config.precision:g}% after "
                                      f"{wall:.1f} s: " + "; ".join(wide))
        if info.get("notes"):
            row["notes"] = list(info["notes"])
    return rows


def run_bench(config: BenchConfig, on_group: Optional[Callable[[int, int, Group], None]] = None,
              on_round: Optional[Callable[[float], None]] = None,
              on_partial: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every planned group and return the results document.

    Args:
        config: what to run.
        on_group: called as ``on_group(i, n, group)`` before group ``i`` of ``n`` starts.
        on_round: called with the fraction of the current group's budget spent after each round.
        on_partial: called with the document so far (``"complete": False``) after each group, so a
            run that is killed half-way still leaves its results behind.
    """
    device = config.resolved_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    if config.threads:
        torch.set_num_threads(config.threads)
    if torch.device(device).type == "cpu":
        # Random-init weights and activations produce denormals on the CPU, which are 10-100x slower.
        torch.set_flush_denormal(True)
    allocator = None
    if config.tune_allocator:
        from fastvit.runtime import tune_cpu_allocator

        allocator = dataclasses.asdict(tune_cpu_allocator())
    groups = plan(config)
    started = time.perf_counter()
    doc = {"schema_version": SCHEMA_VERSION, "kind": "fastvit-bench"}
    doc.update(environment(device))
    doc["cpu_allocator"] = allocator or {"applied": False, "reason": "not asked for (--tune-allocator)"}
    cfg = asdict(config)
    cfg["device"] = device
    doc.update(dtype=cfg["dtypes"] or ["fp32"], config=cfg, complete=False, wall_s=0.0, results=[])
    limit = config.resolved_max_seconds()
    overheads = []  # per group: wall time beyond its timing budget (builds, warm-ups, profiling)
    for i, group in enumerate(groups):
        if limit:
            rest = groups[i:]
            overhead = statistics.mean(overheads) if overheads else 2.0
            time_left = limit - (time.perf_counter() - started) - overhead * len(rest)
            scale = min(1.0, max(0.05, time_left / sum(g.budget_s for g in rest)))
            group = dataclasses.replace(group, budget_s=group.budget_s * scale)
        if on_group is not None:
            on_group(i, len(groups), group)
        group_started = time.perf_counter()
        rows = run_group(group, config, on_round)
        overheads.append(max(0.0, time.perf_counter() - group_started - group.budget_s))
        for row in rows:
            row["group_budget_s"] = group.budget_s
        doc["results"].extend(rows)
        doc["wall_s"] = time.perf_counter() - started
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if on_partial is not None and i + 1 < len(groups):
            on_partial(doc)
    doc["complete"] = True
    doc["host"]["cpu_pressure_avg10_end"] = cpu_pressure()
    return doc


