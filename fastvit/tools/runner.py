"""Planning and running ``fastvit bench``: groups of contenders, each timed as ONE interleaved run,
summarised as rows of one results document (schema: ``fastvit.tools.schema``)."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from fastvit.attention import BACKENDS, DTYPES
from fastvit.tools.contenders import (
    HEADLINE_MODEL,
    attention_contenders,
    model_contenders,
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
from fastvit.tools.timing import time_interleaved
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

    kind: str  # "attention" | "model" | "timm" (a timm model, unpatched vs patched)
    name: str
    mode: str
    dtype: Optional[str]  # attention groups have one dtype; model groups may mix
    budget_s: float
    build: Callable[[], tuple] = field(repr=False, default=None)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name} {self.dtype or ''} {self.mode}".replace("  ", " ")


def _bf16_ok(device: str) -> bool:
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def plan(config: BenchConfig) -> list:
    """The groups of a run, in order: attention shapes, models, then patched timm models."""
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
    return groups


def _ratio(baseline: Optional[float], t: Optional[float]) -> Optional[float]:
    if baseline is None or t is None or t <= 0:
        return None
    return baseline / t


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


def _attention_rows(group: Group, contenders: list, dims: tuple, measured: dict, device: str = "cpu") -> list:
    B, H, Nq, Nk, D, Dv = dims
    shape = next(s for s in (*ATTENTION_SHAPES, *WINDOW_SHAPES) if s.name == group.name)
    window = shape.window_for(group.build.keywords.get("quick", False)) if group.build else None
    dtype = DTYPES[group.dtype]
    peak = peak_tflops(device, dtype)
    hbm = peak_gbps(device)
    ref = measured.get("reference")
    ref_t = ref.median if ref is not None and ref.ok else None
    einops = measured.get("einops")
    einops_t = einops.median if window is not None and einops is not None and einops.ok else None
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
                       gbps=gbps, x_reference=_ratio(ref_t, t))
            if window is not None:  # memory-bound: GB/s of q, k, v, o against the HBM's
                row.update(x_einops=_ratio(einops_t, t), peak_gbps=hbm,
                           pct_hbm=100.0 * gbps / hbm if hbm else None)
        rows.append(row)
    return rows


def _model_rows(group: Group, contenders: list, info: dict, measured: dict, batch_size: int) -> list:
    by_name = {c.name: c for c in contenders}

    def median_of(name: str) -> Optional[float]:
        m = measured.get(name)
        return m.median if m is not None and m.ok and by_name[name].skip_reason is None else None

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
        if _status(row, c, m):
            t = m.median
            same_fp32 = c.name.rsplit(" ", 1)[0] + " fp32"
            row.update(status="ok", reason="", img_per_s=batch_size / t,
                       x_vit_pytorch=_ratio(median_of(f"vit-pytorch {dt}"), t),
                       x_timm=_ratio(median_of(f"timm {dt}"), t),
                       x_fp32=_ratio(median_of(same_fp32), t) if dt != "fp32" and same_fp32 in by_name else None)
        rows.append(row)
    return rows


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
    started = time.perf_counter()
    measured = time_interleaved(contenders, device, budget_s=group.budget_s, min_samples=config.min_samples,
                                measure_memory=config.memory, on_round=on_round)
    wall = time.perf_counter() - started
    if group.kind == "attention":
        rows = _attention_rows(group, contenders, extra, measured, device)
    else:
        rows = _model_rows(group, contenders, extra, measured,
                           extra.get("batch_size") or group.build.keywords["batch_size"])
    for row in rows:
        row["group_wall_s"] = wall
        if extra and isinstance(extra, dict) and extra.get("notes"):
            row["notes"] = list(extra["notes"])
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


