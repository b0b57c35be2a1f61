"""``fastvit info | check | bench | kernels`` (also ``python -m fastvit``).

    fastvit info                        devices, versions, every backend (available or why not), dispatch
    fastvit check --device cpu          every available backend vs the reference, forward + backward
    fastvit bench --json out.json       attention shapes and whole models; ratios from one interleaved run
    fastvit kernels --json out.json     ahead-of-time compile report of the Triton kernels

Exit status: 0 on success, 1 when a check case fails or a kernel does not compile, 2 on bad usage
(an unknown backend, dtype or model; ``--device cuda`` without CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Callable, Optional, Sequence

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["main", "build_parser"]


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


def _console(stderr: bool = False) -> Console:
    # Captured output (pipes, CI logs, tests) gets a wide fixed width so tables are not truncated.
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    width = None if tty else max(shutil.get_terminal_size((200, 24)).columns, 200)
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def _split(values: Optional[Sequence[str]]) -> Optional[list]:
    """``--x a,b --x c`` -> ``[a, b, c]``; None stays None."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _device(name: Optional[str]) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch.cuda.is_available() is False")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {name!r}")
    return name


def _write_json(path: str, doc) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")


def _fmt(x: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _ratio(x: Optional[float]) -> str:
    if x is None:
        return "-"
    style = "green" if x >= 1.0 else "red"
    return f"[{style}]{x:.2f}x[/{style}]"


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------

def _sample_inputs(device: str, dtype: torch.dtype, n: int, with_bias: bool = False):
    from fastvit.attention import make_inputs

    q, k, v = (torch.zeros(8 if n < 1000 else 1, 6, n, 64, device=device, dtype=dtype) for _ in range(3))
    return make_inputs(q, k, v)


def cmd_info(args, out: Console) -> int:
    from fastvit import __version__
    from fastvit.attention import BACKENDS, auto_order, explain
    from fastvit.attention.backends.base import dtype_name
    from fastvit.bench import cpu_flags, cpu_model_name, git_info, versions

    out.print(f"[bold]fastvit {__version__}[/bold]  commit {git_info()['commit'] or 'unknown'}"
              f"{' (modified)' if git_info()['dirty'] else ''}")

    devices = Table(title="devices", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("device", "name", "details"):
        devices.add_column(col)
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    devices.add_row("cpu", cpu_model_name(), f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
                    f"ATen {capability}, flags: {' '.join(cpu_flags()) or '-'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.add_row(f"cuda:{i}", p.name, f"sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                            f"{p.multi_processor_count} SMs, bf16: {torch.cuda.is_bf16_supported()}")
    else:
        devices.add_row("cuda", "-", "not available" + (f" (torch built with CUDA {torch.version.cuda})"
                                                        if torch.version.cuda else " (CPU-only torch build)"))
    out.print(devices)

    vers = Table(title="versions", box=box.SIMPLE_HEAD, title_justify="left")
    vers.add_column("package")
    vers.add_column("version")
    for name, version in versions().items():
        vers.add_row(name, version or "[dim]not installed[/dim]")
    out.print(vers)

    backends = Table(title="attention backends", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("backend", "what", "devices", "dtypes", "bwd", "status"):
        backends.add_column(col, overflow="fold")
    for name, b in BACKENDS.items():
        ok, why = b.availability()
        backends.add_row(name, b.description, ", ".join(b.devices), ", ".join(dtype_name(d) for d in b.dtypes),
                         "yes" if b.supports_backward else "no",
                         "[green]available[/green]" if ok else f"[red]unavailable[/red]: {escape(why)}")
    out.print(backends)

    dispatch = Table(title="auto dispatch for sample shapes (ViT-S: B8 H6 D64)", box=box.SIMPLE_HEAD,
                     title_justify="left")
    for col in ("device", "dtype", "N", "order", "chosen", "refusals"):
        dispatch.add_column(col, overflow="fold")
    devices_here = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices_here:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
        for dtype in dtypes:
            for n in (197, 4096):
                inp = _sample_inputs(device, dtype, n)
                order = auto_order(inp)
                reasons = explain(inp)
                chosen = next((name for name in order if not reasons[name]), "none")
                down = [name for name in reasons if not BACKENDS[name].availability()[0]]
                refused = "; ".join(f"{name}: {', '.join(rs)}" for name, rs in reasons.items()
                                    if rs and name not in down)
                if down:
                    refused = "; ".join(filter(None, [refused, f"unavailable (see above): {', '.join(down)}"]))
                dispatch.add_row(device, dtype_name(dtype), str(n), " > ".join(order), chosen, escape(refused) or "-")
    if not torch.cuda.is_available():
        from fastvit.attention.dispatch import CUDA_ORDER

        dispatch.add_row("cuda", "-", "-", " > ".join(CUDA_ORDER) + " (or the order `fastvit tune` measured)", "-",
                         "no CUDA device here")
    out.print(dispatch)
    return 0


# --------------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------------

def cmd_check(args, out: Console) -> int:
    from fastvit.attention import BACKENDS
    from fastvit.check import generate_cases, parse_dtypes, run_check

    device = _device(args.device)
    backends = _split(args.backends)
    if backends is not None:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise UsageError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    try:
        dtypes = parse_dtypes(_split(args.dtypes))
    except ValueError as e:
        raise UsageError(str(e)) from None
    patterns = _split(args.k)

    names = backends if backends is not None else [n for n in BACKENDS if n != "reference"]
    total = len(generate_cases([n for n in names if BACKENDS[n].availability()[0]], device, dtypes, patterns,
                               args.quick))
    with _progress(_console(stderr=True)) as progress:
        task = progress.add_task(f"check on {device}", total=total)

        def advance(res):
            progress.update(task, advance=1, description=f"check {res.case.id}")

        results, unavailable = run_check(names, device, dtypes, patterns, args.quick, on_result=advance)

    table = Table(title=f"fastvit check on {device}: backends vs reference (fp32 copies, TF32 off)",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("case", "status", "worst", "max abs err", "at index", "atol / rtol", "note"):
        table.add_column(col, overflow="fold")
    styles = {"pass": "green", "fail": "bold red", "error": "bold red", "skip": "yellow"}
    for r in results:
        if args.failures_only and r.status == "pass":
            continue
        status = f"[{styles[r.status]}]{'skipped' if r.status == 'skip' else r.status}[/{styles[r.status]}]"
        tol = "-" if r.atol is None else f"{r.atol:.2g} / {r.rtol:.2g}"
        note = f"skipped: {r.reason}" if r.status == "skip" else r.reason
        table.add_row(r.case.id, status, r.worst or "-", _fmt(r.max_abs_err, ".2e"),
                      "-" if r.index is None else str(tuple(r.index)), tol, escape(note))
    out.print(table)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "skip")}
    for name, why in unavailable.items():
        out.print(f"[yellow]skipped backend {name}[/yellow]: {escape(why)}")
    out.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
              f"{counts['skip']} skipped (refused by the backend) on {device}")
    if not results and not unavailable:
        out.print("[yellow]no case matched[/yellow]")
    if args.json:
        from fastvit.bench import environment

        doc = {"schema_version": 1, "kind": "fastvit-check", **environment(device),
               "counts": counts, "unavailable": unavailable, "results": [r.to_dict() for r in results]}
        _write_json(args.json, doc)
        out.print(f"wrote {args.json}")
    return 1 if counts["fail"] or counts["error"] else 0


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------

def _unavailable_backends() -> dict:
    from fastvit.attention import BACKENDS

    return {name: b.availability()[1] for name, b in BACKENDS.items() if not b.availability()[0]}


def _is_unavailable(row: dict, unavailable: dict) -> bool:
    return row["status"] == "skipped" and row.get("backend") in unavailable and row.get("impl", "fastvit") == "fastvit"


def render_bench(doc: dict, out: Console) -> None:
    """The tables of a results document (attention, models) and the headline ratios."""
    rows = doc["results"]
    unavailable = _unavailable_backends()
    attention = [r for r in rows if r["kind"] == "attention"]
    if attention:
        table = Table(title=f"attention on {doc['device']} (median of interleaved samples; x naive = speed-up "
                            f"vs the reference backend)", box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("shape", "B H Nq Nk D Dv", "bias", "dtype", "mode", "backend", "ms", "GFLOP/s", "% peak",
                    "GB/s", "peak MiB", "x naive", "note"):
            table.add_column(col, overflow="fold", justify="right" if col in ("ms", "GFLOP/s", "% peak", "GB/s",
                                                                               "peak MiB", "x naive") else "left")
        last = None
        for r in attention:
            if _is_unavailable(r, unavailable):
                continue
            key = (r["name"], r["dtype"], r["mode"])
            if last is not None and key != last:
                table.add_section()
            last = key
            s = r.get("shape") or {}
            dims = " ".join(str(s.get(k, "?")) for k in ("B", "H", "Nq", "Nk", "D", "Dv"))
            backend = r["contender"]
            if r["contender"] == "auto" and r.get("served_by"):
                backend = f"auto -> {r['served_by']}"
            note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            bias = r.get("bias", "") + (" +cls_probs" if r.get("cls_probs") else "")
            table.add_row(r["name"], dims, bias, r["dtype"], r["mode"], backend,
                          _fmt(r.get("median_ms"), ".3f"), _fmt(r.get("gflops"), ".1f"), _fmt(r.get("pct_peak"), ".1f"),
                          _fmt(r.get("gbps"), ".2f"),
                          _mib(r.get("peak_mem_bytes")), _ratio(r.get("x_reference")), escape(note))
        out.print(table)

    models = [r for r in rows if r["kind"] == "model"]
    if models:
        table = Table(title=f"models on {doc['device']} (eval, inference_mode; ratios > 1 = faster than the "
                            f"baseline, from one interleaved run)", box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("model", "contender", "dtype", "mode", "batch", "ms/batch", "img/s", "peak MiB",
                    "x vit-pytorch", "x timm", "x fp32", "note"):
            table.add_column(col, overflow="fold", justify="left" if col in ("model", "contender", "dtype", "mode",
                                                                              "note") else "right")
        last = None
        for r in models:
            if _is_unavailable(r, unavailable):
                continue
            key = (r["name"], r["mode"])
            if last is not None and key != last:
                table.add_section()
            last = key
            contender = r.get("impl") or r.get("contender") or "-"
            if r.get("impl") == "timm" and r.get("timm_model"):
                contender = f"timm{' compiled' if r.get('compiled') else ''} ({r['timm_model']})"
            elif r.get("impl") == "fastvit":
                contender = f"fastvit[{r.get('backend')}]"
            note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            table.add_row(r["name"], escape(contender), r.get("dtype") or "-", r["mode"], str(r.get("batch_size", "-")),
                          _fmt(r.get("median_ms"), ".1f"), _fmt(r.get("img_per_s"), ".1f"),
                          _mib(r.get("peak_mem_bytes")), _ratio(r.get("x_vit_pytorch")), _ratio(r.get("x_timm")),
                          _ratio(r.get("x_fp32")), escape(note))
        out.print(table)

    host = doc.get("host", {})
    pressure = [host.get("cpu_pressure_avg10"), host.get("cpu_pressure_avg10_end")]
    if doc.get("device_type") == "cpu" and any(p is not None for p in pressure):
        noisy = any(p is not None and p > 20 for p in pressure)
        out.print(f"CPU pressure (share of time runnable threads waited for a core) at start / end: "
                  f"{' / '.join('-' if p is None else f'{p:.0f}%' for p in pressure)}"
                  + (" [yellow]- a loaded machine: absolute times are inflated and noisy[/yellow]" if noisy else ""))
    allocator = doc.get("cpu_allocator") or {}
    if doc.get("device_type") == "cpu":
        if allocator.get("applied"):
            mmap_mib, trim_mib = allocator["mmap_threshold"] >> 20, allocator["trim_threshold"] >> 20
            out.print(f"CPU allocator tuned (fastvit.runtime.tune_cpu_allocator): mmap threshold {mmap_mib} MiB, "
                      f"trim threshold {trim_mib} MiB")
        else:
            out.print(f"CPU allocator: the C library's default ({escape(allocator.get('reason', 'not tuned'))})")
    if unavailable:
        out.print("not run: " + "; ".join(f"{n} ({escape(why)})" for n, why in unavailable.items()))
    for line in headline(doc):
        out.print(line)


def headline(doc: dict) -> list:
    """One-line summaries of the ratios that matter most, where the run has them."""
    from fastvit.bench import HEADLINE_MODEL

    lines = []
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    for r in ok:
        if r["kind"] == "model" and r["name"] == HEADLINE_MODEL and r.get("impl") == "fastvit" \
                and r.get("backend") == "auto":
            parts = []
            if r.get("x_vit_pytorch") is not None:
                parts.append(f"{r['x_vit_pytorch']:.2f}x vit-pytorch")
            if r.get("x_timm") is not None:
                parts.append(f"{r['x_timm']:.2f}x timm")
            if r.get("x_fp32") is not None:
                parts.append(f"{r['x_fp32']:.2f}x its fp32 run")
            lines.append(f"{HEADLINE_MODEL} {r['dtype']} {r['mode']} bs{r['batch_size']}: fastvit auto "
                         f"{r['img_per_s']:.1f} img/s = " + ", ".join(parts))
    by = {(r["name"], r["dtype"], r["mode"], r["contender"]): r for r in ok if r["kind"] == "attention"}
    for (name, dtype, mode, contender), r in by.items():
        if name == "vit_b16_1024" and contender == "auto":
            ref = by.get((name, dtype, mode, "reference"))
            mem = ""
            if ref is not None and ref.get("peak_mem_bytes") and r.get("peak_mem_bytes"):
                mem = (f"; peak memory {r['peak_mem_bytes'] / 2**20:.0f} MiB vs "
                       f"{ref['peak_mem_bytes'] / 2**20:.0f} MiB naive")
            x = r.get("x_reference")
            lines.append(f"attention N=4096 {dtype} {mode}: auto ({r.get('served_by')}) "
                         f"{'-' if x is None else f'{x:.2f}x'} the naive path{mem}")
    return lines


def cmd_bench(args, out: Console) -> int:
    from fastvit.bench import BenchConfig, plan, run_bench, validate_document

    device = _device(args.device)
    models = _split(args.models)
    if args.no_models:
        models = []
    shapes = _split(args.shapes)
    if args.no_attention:
        shapes = []
    config = BenchConfig(device=device, dtypes=_split(args.dtype), batch_size=args.batch_size,
                         backends=_split(args.backends), models=models, shapes=shapes, backward=args.backward,
                         quick=args.quick, group_seconds=args.group_seconds, vit_pytorch=not args.no_vit_pytorch,
                         timm=not args.no_timm, memory=not args.no_memory, max_seconds=args.max_seconds,
                         threads=args.threads, tune_allocator=args.tune_allocator,
                         timm_compile=args.timm_compile)
    try:
        n_groups = len(plan(config))
    except ValueError as e:
        raise UsageError(str(e)) from None
    with _progress(_console(stderr=True)) as progress:
        task = progress.add_task("bench", total=n_groups)
        state = {"i": 0}

        def on_group(i, n, group):
            state["i"] = i
            progress.update(task, completed=i, description=f"bench {group.label}")

        def on_round(fraction):
            progress.update(task, completed=state["i"] + min(fraction, 0.99))

        def on_partial(partial):
            if args.json:
                _write_json(args.json, partial)

        doc = run_bench(config, on_group=on_group, on_round=on_round, on_partial=on_partial)
        progress.update(task, completed=n_groups)
    render_bench(doc, out)
    problems = validate_document(doc)
    if problems:  # a bug in the engine, not in what was measured
        out.print("[red]results document does not follow the schema:[/red] " + "; ".join(problems))
    if args.json:
        _write_json(args.json, doc)
        out.print(f"wrote {args.json} ({len(doc['results'])} results, {doc['wall_s']:.0f} s)")
    errors = [r for r in doc["results"] if r["status"] == "error"]
    return 1 if problems or (args.strict and errors) else 0


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

def _load_compile_report() -> Callable[[], list]:
    """``fastvit.kernels.aot.compile_report`` (a separate function so tests can substitute it)."""
    from fastvit.kernels.aot import compile_report

    return compile_report


def cmd_kernels(args, out: Console) -> int:
    try:
        compile_report = _load_compile_report()
    except Exception as e:  # noqa: BLE001 - an ImportError, or a kernels package that fails to import
        out.print(f"[red]fastvit.kernels.aot is not available[/red]: {type(e).__name__}: {escape(str(e))}")
        return 1
    import inspect

    try:
        accepted = set(inspect.signature(compile_report).parameters)
    except (TypeError, ValueError):
        accepted = set()
    kwargs = {}
    if args.capabilities and "capabilities" in accepted:
        kwargs["capabilities"] = [int(c) for c in _split(args.capabilities)]
    if args.full and "full" in accepted:
        kwargs["full"] = True
    if args.workers and "workers" in accepted:
        kwargs["workers"] = args.workers
    with _progress(_console(stderr=True)) as progress:
        task = progress.add_task("compiling kernels ahead of time", total=None)
        if "progress" in accepted:
            kwargs["progress"] = lambda row: progress.update(
                task, advance=1, description=f"compiled {row.get('kernel')} sm_{row.get('capability')}")
        report = list(compile_report(**kwargs))
    table = Table(title="Triton kernels compiled ahead of time", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("kernel", "config", "capability", "registers", "spills", "shared mem", "status"):
        table.add_column(col, overflow="fold", justify="right" if col in ("registers", "spills", "shared mem")
                         else "left")
    failed = 0
    for entry in report:
        ok = bool(entry.get("ok"))
        failed += not ok
        config = entry.get("config")
        if isinstance(config, dict):
            config = " ".join(f"{k}={v}" for k, v in config.items())
        spills = entry.get("spills")
        spill_text = "-" if spills is None else (f"[red]{spills}[/red]" if spills else "0")
        shared = entry.get("shared_mem_bytes")
        table.add_row(str(entry.get("kernel", "?")), escape(str(config if config is not None else "-")),
                      str(entry.get("capability", "-")), _fmt(entry.get("registers"), "d"), spill_text,
                      "-" if shared is None else f"{shared / 1024:.1f} KiB",
                      "[green]ok[/green]" if ok else f"[red]failed[/red]: {escape(str(entry.get('error') or ''))}")
    out.print(table)
    out.print(f"{len(report) - failed} compiled, {failed} failed")
    if args.json:
        from fastvit.bench import git_info, versions

        _write_json(args.json, {"schema_version": 1, "kind": "fastvit-kernels", "versions": versions(),
                                "git_commit": git_info()["commit"], "failed": failed, "results": report})
        out.print(f"wrote {args.json}")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------------

def cmd_tune(args, out: Console) -> int:
    from fastvit.check import DTYPES
    from fastvit.tune import tune, write_table

    device = _device(args.device)
    if device == "cpu" and "fastvit.kernels.attention" not in sys.modules:
        # The CPU smoke run needs the Triton interpreter, chosen when the kernels module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype_name not in DTYPES:
        raise UsageError(f"unknown dtype {dtype_name!r}; choose from {', '.join(DTYPES)}")
    table = Table(title=f"kernel configs tuned on {device} ({dtype_name})", box=box.SIMPLE_HEAD,
                  title_justify="left")
    for col in ("bucket", "first shape", "best config / backend order", "ms", "x default", "candidates"):
        table.add_column(col, overflow="fold", justify="right" if col in ("ms", "x default", "candidates") else "left")

    with _progress(_console(stderr=True)) as progress:
        task = progress.add_task("tuning kernel configs", total=None)

        def on_bucket(key, record):
            progress.update(task, advance=1, description=f"tuned {record['shape']} {record['kernel']}")
            best = record.get("best")
            if record["kernel"] == "dispatch":  # a backend order for auto dispatch
                cfg = " > ".join(record["order"]) or "-"
            else:
                cfg = "-" if best is None else (f"{best['block_m']}x{best['block_n']} w{best['num_warps']} "
                                                f"s{best['num_stages']}")
            table.add_row(escape(key), record["shape"], cfg, _fmt(best and best["ms"], ".3f"),
                          _ratio(record.get("x_default")), str(len(record["candidates"])))

        try:
            doc = tune(device=device, dtype=DTYPES[dtype_name], shapes=_split(args.shapes), quick=args.quick,
                       budget_s=args.bucket_seconds or (0.05 if args.quick else 0.3), max_configs=args.max_configs,
                       max_seconds=args.max_seconds, on_bucket=on_bucket)
        except ValueError as e:
            raise UsageError(str(e)) from None
    out.print(table)
    for skipped in doc["not_tuned"]:
        out.print(f"not tuned: {skipped['key']} ({skipped['shape']}): {skipped['reason']}")
    target = args.tuned_out
    if target is None and device.startswith("cuda"):
        from fastvit.kernels.attention import tuned_path

        target = tuned_path(torch.device(device))
    if target:
        write_table(doc, target)
        out.print(f"wrote the tuned table {target} ({len(doc['entries'])} buckets); the launchers read it from now on")
    else:
        out.print("no tuned table written: timings in the CPU's Triton interpreter say nothing about a GPU "
                  "(--tuned-out PATH writes one anyway)")
    if args.json:
        _write_json(args.json, doc)
        out.print(f"wrote {args.json}")
    failed = [r for r in doc["buckets"] if r.get("best") is None]
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvit", description="fastvit: Vision Transformers on one pluggable, "
                                     "kernel-backed attention layer.")
    sub = parser.add_subparsers(dest="command", metavar="{info,check,bench,kernels}")
    sub.required = True

    sub.add_parser("info", help="devices, versions, every backend (available or why not), auto dispatch")

    p = sub.add_parser("check", help="every available backend vs the reference: forward + backward, dtypes, "
                                     "awkward shapes; exits 1 on any failure")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backends", action="append", help="comma-separated backend names (default: all but reference)")
    p.add_argument("--dtypes", action="append", help="comma-separated: fp32, bf16, fp16 (default: what the "
                                                     "device supports)")
    p.add_argument("-k", action="append", metavar="PATTERN",
                   help="only case ids matching this glob, e.g. '*-N49-*' (repeatable, any match)")
    p.add_argument("--quick", action="store_true", help="only sequences of at most 64 keys")
    p.add_argument("--failures-only", action="store_true", help="list only failing, erroring and skipped cases")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    p = sub.add_parser("bench", help="attention shapes and whole models vs vit-pytorch and timm",
                       description="Benchmark attention shapes named after real models and whole models. "
                                   "Every group is one interleaved run, so its ratios are comparable even on a "
                                   "noisy machine. Default: fp32 attention shapes with every backend + auto, "
                                   "vit_small_patch16_224 at batch 8 under every backend, vs vit-pytorch and timm "
                                   "(plus fastvit bf16 autocast), and one preset per other vit-pytorch "
                                   "architecture (auto vs vit-pytorch / timm, batch 2 on the CPU).")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", action="append", help="comma-separated: fp32, bf16, fp16 (autocast for models)")
    p.add_argument("--batch-size", type=int, help="model batch size (and attention batch, overriding each shape's)")
    p.add_argument("--backends", action="append", help="comma-separated backend names and/or auto")
    p.add_argument("--models", action="append", metavar="PATTERN",
                   help="model presets: comma-separated globs, 'all' (every preset with a vit-pytorch "
                        "equivalent) or 'default'")
    p.add_argument("--no-models", action="store_true", help="attention shapes only")
    p.add_argument("--shapes", action="append", metavar="PATTERN", help="attention shapes: comma-separated globs")
    p.add_argument("--no-attention", action="store_true", help="models only")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (smoke test)")
    p.add_argument("--group-seconds", type=float, help="time budget per group (default 5 s CPU, 1.5 s CUDA; "
                                                       "the headline model gets 5x)")
    p.add_argument("--max-seconds", type=float, help="wall-time target: later groups get smaller budgets "
                                                      "when the machine is slow (default 165 for a full CPU "
                                                      "run, 0 = none)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--tune-allocator", action="store_true",
                   help="fastvit.runtime.tune_cpu_allocator() first: glibc keeps freed memory instead of "
                        "page-faulting it back (applies to every contender)")
    p.add_argument("--timm-compile", action="store_true",
                   help="also time the timm equivalent under torch.compile (compiled during warm-up)")
    p.add_argument("--no-vit-pytorch", action="store_true", help="do not compare against vit-pytorch")
    p.add_argument("--no-timm", action="store_true", help="do not compare against timm")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--strict", action="store_true", help="exit 1 if any contender raised")
    p.add_argument("--json", metavar="PATH", help="write the results document here")

    p = sub.add_parser("kernels", help="compile every Triton kernel config ahead of time: registers, spills")
    p.add_argument("--capabilities", action="append", help="comma-separated compute capabilities "
                                                           "(default: the report's, 80 and 90)")
    p.add_argument("--full", action="store_true", help="every config, not only the pruned list")
    p.add_argument("--workers", type=int, help="parallel compile processes (default: the report's)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")

    p = sub.add_parser("tune", help="time every kernel config per model-named shape bucket; keep the fastest in "
                                    "kernels/tuned/<device>.json")
    p.add_argument("--device", help="cuda (default when available) or cpu (interpreter smoke run)")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--shapes", action="append", metavar="PATTERN",
                   help="attention shapes of `fastvit bench` (comma-separated globs; default: all)")
    p.add_argument("--quick", action="store_true", help="the shapes' tiny sizes (smoke test)")
    p.add_argument("--bucket-seconds", type=float, help="interleaved timing per bucket (default 0.3 s)")
    p.add_argument("--max-configs", type=int, help="time at most this many candidates per bucket")
    p.add_argument("--max-seconds", type=float, help="start no new bucket after this many seconds")
    p.add_argument("--tuned-out", metavar="PATH", help="the tuned table to write (default on CUDA: "
                                                       "kernels/tuned/<device>.json; none on the CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the full report (every candidate's time)")
    return parser


COMMANDS = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "kernels": cmd_kernels, "tune": cmd_tune}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = _console()
    try:
        return COMMANDS[args.command](args, out)
    except UsageError as e:
        _console(stderr=True).print(f"[red]fastvit {args.command}: {escape(str(e))}[/red]")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
