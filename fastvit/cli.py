"""``fastvit info | check | bench | kernels | tune`` (also ``python -m fastvit``): thin commands over
``fastvit.tools`` (one concern per module).

    fastvit info                        devices, versions, every backend (available or why not), dispatch
    fastvit check --device cpu          every available backend vs the reference, forward + backward
    fastvit bench --json out.json       attention shapes and whole models; ratios from one interleaved run
    fastvit kernels --json out.json     ahead-of-time compile report of the Triton kernels
    fastvit kernels --model             static performance model of the attention calls of three workloads (H100)
    fastvit tune --device cuda          fastest kernel config and backend order per shape bucket
    fastvit plot RESULTS.json           PNG figures of a bench results document (models, attention)
    fastvit attention-map --model NAME --image PATH --out map.png   attention rollout over an image
    fastvit train --model NAME --data DIR   train / pre-train (--ssl); torchrun for many GPUs (fastvit.train)

Exit status: 0 on success, 1 when a check case fails or a kernel does not compile (and, for
``fastvit bench --strict``, when a contender raised or a group stayed unstable), 2 on bad usage
(an unknown backend, dtype or model; ``--device cuda`` without CUDA).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fastvit.tools.render import (
    add_tune_row,
    check_table,
    info_tables,
    kernels_table,
    perf_model_tables,
    render_bench,
    tune_table,
)
from fastvit.tools.schema import write_json

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


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------

def cmd_info(args, out: Console) -> int:
    from fastvit import __version__
    from fastvit.tools.env import git_info

    out.print(f"[bold]fastvit {__version__}[/bold]  commit {git_info()['commit'] or 'unknown'}"
              f"{' (modified)' if git_info()['dirty'] else ''}")
    for table in info_tables():
        out.print(table)
    return 0


# --------------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------------

def cmd_check(args, out: Console) -> int:
    from fastvit.attention import BACKENDS
    from fastvit.attention.testing import generate_cases, parse_dtypes
    from fastvit.tools.check import run_check

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

    table = check_table(results, device, failures_only=args.failures_only)
    out.print(table)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "skip")}
    for name, why in unavailable.items():
        out.print(f"[yellow]skipped backend {name}[/yellow]: {escape(why)}")
    out.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
              f"{counts['skip']} skipped (refused by the backend) on {device}")
    if not results and not unavailable:
        out.print("[yellow]no case matched[/yellow]")
    if args.json:
        from fastvit.tools.env import environment

        doc = {"schema_version": 1, "kind": "fastvit-check", **environment(device),
               "counts": counts, "unavailable": unavailable, "results": [r.to_dict() for r in results]}
        write_json(args.json, doc)
        out.print(f"wrote {args.json}")
    return 1 if counts["fail"] or counts["error"] else 0


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------


def cmd_bench(args, out: Console) -> int:
    from fastvit.tools.runner import BenchConfig, plan, run_bench
    from fastvit.tools.schema import validate_document

    device = _device(args.device)
    models = _split(args.models)
    if args.no_models:
        models = []
    shapes = _split(args.shapes)
    if args.no_attention:
        shapes = []
    windows = _split(args.windows)
    if args.overhead and args.no_overhead:
        raise UsageError("--overhead and --no-overhead contradict each other")
    if args.precision is not None and not args.precision >= 0:
        raise UsageError(f"--precision must be >= 0 (0.05 = ±5%), got {args.precision}")
    overhead = True if args.overhead else False if args.no_overhead else None
    config = BenchConfig(device=device, dtypes=_split(args.dtype), batch_size=args.batch_size,
                         backends=_split(args.backends), models=models, shapes=shapes, windows=windows,
                         backward=args.backward,
                         quick=args.quick, group_seconds=args.group_seconds, vit_pytorch=not args.no_vit_pytorch,
                         timm=not args.no_timm, memory=not args.no_memory, max_seconds=args.max_seconds,
                         threads=args.threads, tune_allocator=args.tune_allocator,
                         timm_compile=args.timm_compile, timm_patch=_split(args.timm_patch), overhead=overhead,
                         packed=args.packed, ats=args.ats, merge=args.merge,
                         precision=0.05 if args.precision is None else args.precision)
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
                write_json(args.json, partial)

        doc = run_bench(config, on_group=on_group, on_round=on_round, on_partial=on_partial)
        progress.update(task, completed=n_groups)
    render_bench(doc, out)
    problems = validate_document(doc)
    if problems:  # a bug in the engine, not in what was measured
        out.print("[red]results document does not follow the schema:[/red] " + "; ".join(problems))
    if args.json:
        write_json(args.json, doc)
        out.print(f"wrote {args.json} ({len(doc['results'])} results, {doc['wall_s']:.0f} s)")
    errors = [r for r in doc["results"] if r["status"] == "error"]
    unstable = list(dict.fromkeys(f"{r['kind']} {r['name']} {r.get('dtype') or ''} {r['mode']}".replace("  ", " ")
                                  for r in doc["results"] if r.get("unstable")))
    if unstable:
        style = "red" if args.strict else "yellow"
        out.print(f"[{style}]unstable (a ratio's 95% interval wider than ±{100 * config.precision:g}% at the "
                  f"hard cap): {escape(', '.join(unstable))}[/{style}]")
    return 1 if problems or (args.strict and (errors or unstable)) else 0


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

def cmd_kernels(args, out: Console) -> int:
    if args.model:
        return _kernels_model(args, out)
    from fastvit.tools import kernels_report

    try:
        compile_report = kernels_report.load_compile_report()
    except Exception as e:  # noqa: BLE001 - an ImportError, or a kernels package that fails to import
        out.print(f"[red]fastvit.kernels.aot is not available[/red]: {type(e).__name__}: {escape(str(e))}")
        return 1
    with _progress(_console(stderr=True)) as progress:
        task = progress.add_task("compiling kernels ahead of time", total=None)
        report = kernels_report.run_compile_report(
            compile_report, capabilities=[int(c) for c in _split(args.capabilities) or []], full=args.full,
            workers=args.workers, on_row=lambda row: progress.update(
                task, advance=1, description=f"compiled {row.get('kernel')} sm_{row.get('capability')}"))
    table, failed = kernels_table(report)
    out.print(table)
    out.print(f"{len(report) - failed} compiled, {failed} failed")
    if args.json:
        write_json(args.json, kernels_report.report_document(report, failed))
        out.print(f"wrote {args.json}")
    if args.check:
        bad = kernels_report.check_failures(report)
        for line in bad:
            out.print(f"[red]check[/red]: {escape(line)}")
        out.print(f"check: {len(bad)} of {len(report)} compiles fail it (failed compile, spills, serialised wgmma)")
        return 1 if bad else 0
    return 1 if failed else 0


def _kernels_model(args, out: Console) -> int:
    """``fastvit kernels --model``: the static performance model (``fastvit.tools.perf_model``)."""
    from fastvit.tools import perf_model

    names = _split(args.workloads)
    unknown = [n for n in names or [] if n not in perf_model.WORKLOADS]
    if unknown:
        raise UsageError(f"unknown workload(s) {', '.join(unknown)}: expected {', '.join(perf_model.WORKLOADS)}")
    with _progress(_console(stderr=True)) as progress:
        task = progress.add_task("compiling the launched variants for sm_90a", total=None)
        doc = perf_model.model_workloads(
            names, workers=args.workers or 2, on_plan=lambda n: progress.update(task, total=n),
            progress=lambda row: progress.update(task, advance=1, description=f"compiled {row.get('kernel')}"))
    for table in perf_model_tables(doc):
        out.print(table)
    out.print(f"model: {escape(doc['model'])}")
    failed = [k for w in doc["workloads"] for c in w["calls"] for k in c["kernels"] if k["compile_error"]]
    for k in failed:
        out.print(f"[red]compile failed[/red] {k['kernel']}: {escape(str(k['compile_error']))}")
    if args.json:
        from fastvit.tools.env import git_info, versions

        write_json(args.json, {**doc, "versions": versions(), "git_commit": git_info()["commit"]})
        out.print(f"wrote {args.json}")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------------

def cmd_tune(args, out: Console) -> int:
    from fastvit.attention import DTYPES
    from fastvit.tools.tune import tune, write_table

    device = _device(args.device)
    if device == "cpu" and "fastvit.kernels.attention" not in sys.modules:
        # The CPU smoke run needs the Triton interpreter, chosen when the kernels module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype_name not in DTYPES:
        raise UsageError(f"unknown dtype {dtype_name!r}; choose from {', '.join(DTYPES)}")
    table = tune_table(f"kernel configs tuned on {device} ({dtype_name})")

    with _progress(_console(stderr=True)) as progress:
        task = progress.add_task("tuning kernel configs", total=None)

        def on_bucket(key, record):
            progress.update(task, advance=1, description=f"tuned {record['shape']} {record['kernel']}")
            add_tune_row(table, key, record)

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
        write_json(args.json, doc)
        out.print(f"wrote {args.json}")
    failed = [r for r in doc["buckets"] if r.get("best") is None]
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------

def cmd_train(args, out: Console) -> int:
    """``fastvit train``: ``fastvit.train`` (also ``python -m fastvit.train``, and under torchrun)."""
    from fastvit.train import config_from_args, run_command

    return run_command(lambda: config_from_args(args))


# --------------------------------------------------------------------------------------------------
# plot, attention-map
# --------------------------------------------------------------------------------------------------

def cmd_plot(args, out: Console) -> int:
    from fastvit.tools.plot import PlotError, check_can_draw, load_results, plot_results

    try:
        check_can_draw()
        doc = load_results(args.results)
        stem = os.path.splitext(os.path.basename(args.results))[0]
        paths = plot_results(doc, args.out or os.path.dirname(os.path.abspath(args.results)), stem)
    except PlotError as e:
        raise UsageError(str(e)) from None
    for path in paths:
        out.print(f"wrote {path}")
    return 0


def cmd_attention_map(args, out: Console) -> int:
    from fastvit.tools.attention_map import AttentionMapError, attention_map

    try:
        result = attention_map(args.model, args.image, args.out, checkpoint=args.checkpoint, mode=args.mode,
                               alpha=args.alpha)
    except AttentionMapError as e:
        raise UsageError(str(e)) from None
    out.print(f"wrote {result.path} ({result.model}: {escape(result.description)}; "
              f"{result.grid[0]}x{result.grid[1]} tokens)")
    return 0


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
                                   "(plus fastvit bf16 autocast), one preset per other vit-pytorch "
                                   "architecture (auto vs vit-pytorch / timm, batch 2 on the CPU) and the host-path "
                                   "overhead group. Every ratio comes with its 95% interval (a bootstrap over the "
                                   "rounds).")
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
    p.add_argument("--windows", action="append", metavar="PATTERN",
                   help="windowed attention shapes (Swin-T stages, MaxViT-T block/grid, CrossFormer-S short/long, "
                        "Twins-SVT-S LSA, NesT-T blocks): comma-separated globs or 'all' (default: none); every "
                        "backend through attend(window=...) vs 'einops', the models' own window cut")
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
    p.add_argument("--timm-patch", action="append", metavar="PATTERN",
                   help="timm models patched in place (fastvit.patch_timm): unpatched vs patched vs patched with "
                        "linear=True, same weights; comma-separated globs over timm names or families, 'all' (one "
                        "model per family) or 'default' (ViT-S/16, Swin-T); combine with --no-attention "
                        "--no-models to run only these")
    p.add_argument("--packed", action="store_true",
                   help="the packed group: 16 images of 128-384 px through NaViT at ViT-S width, fastvit packed vs "
                        "the same model padded with a KeyPaddingMask vs vit-pytorch's NaViT (same weights), and one "
                        "attention call packed vs padded; fp32 forward, with the targets")
    p.add_argument("--merge", action="store_true",
                   help="the merge groups: token merging (fastvit.merge_tokens) on ViT-S/B/L/16 at 224 px, batch 8, "
                        "fastvit and timm, r = 0, 8, 16, fp32 and bf16 autocast: img/s, x r=0, the token count at the "
                        "last block and the matching's share, with the targets")
    p.add_argument("--ats", action="store_true",
                   help="the ats group: ATS-ViT-S/16 at its default sampling, the kept tokens packed (packed=True) "
                        "vs padded with a key mask, same weights and images, with the target")
    p.add_argument("--overhead", action="store_true",
                   help="the host-path group: us per call on [1, 1, 16, 16] fp32, raw SDPA vs attend() (auto, sdpa, "
                        "each bias descriptor, a Window), the triton path with its launch a no-op (on the CPU it "
                        "needs TRITON_INTERPRET=1 set before the start) and timm's Attention patched vs not; on by "
                        "default in a full run (no --quick, --models, --shapes); combine with --no-attention "
                        "--no-models to run only it")
    p.add_argument("--no-overhead", action="store_true", help="leave the host-path group out of a full run")
    p.add_argument("--precision", type=float, metavar="FRACTION",
                   help="relative half-width every ratio's 95%% interval should reach (default 0.05 = ±5%%); "
                        "groups keep sampling past their budget, up to 2x, and are marked unstable if not")
    p.add_argument("--no-vit-pytorch", action="store_true", help="do not compare against vit-pytorch")
    p.add_argument("--no-timm", action="store_true", help="do not compare against timm")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any contender raised or any group ended unstable (see --precision)")
    p.add_argument("--json", metavar="PATH", help="write the results document here")

    p = sub.add_parser("kernels", help="compile every Triton kernel config ahead of time: registers, spills")
    p.add_argument("--capabilities", action="append", help="comma-separated compute capabilities "
                                                           "(default: the report's, 80 and 90)")
    p.add_argument("--full", action="store_true", help="every config, not only the pruned list")
    p.add_argument("--workers", type=int, help="parallel compile processes (default: the report's)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on any failed compile, any spill or any serialised wgmma (ptxas C7515)")
    p.add_argument("--model", action="store_true",
                   help="static performance model of the ViT-B/16, Swin-T and LeViT-256 attention calls on an "
                        "H100 (compiles the launched variants for sm_90a; --json writes it)")
    p.add_argument("--workloads", action="append", help="with --model: comma-separated workloads "
                                                        "(vit_b16_224, swin_t_224, levit_256_224; default: all)")

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

    from fastvit.train.config import add_arguments as add_train_arguments

    add_train_arguments(sub.add_parser(
        "train", help="train or pre-train (--ssl) a model; under torchrun on many GPUs and nodes (DDP, --fsdp)"))

    p = sub.add_parser("plot", help="PNG figures of a `fastvit bench --json` document: model img/s vs vit-pytorch "
                                    "and timm, attention TFLOP/s and peak memory vs N, per backend")
    p.add_argument("results", metavar="RESULTS.json", help="a results document of `fastvit bench --json`")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: the results file's folder)")

    p = sub.add_parser("attention-map", help="a model's attention rollout (or last layer) over an image, as a "
                                             "heatmap PNG (any architecture, through Recorder)")
    p.add_argument("--model", required=True, help="preset name (see fastvit.list_models())")
    p.add_argument("--image", required=True, metavar="PATH", help="an image PIL can read")
    p.add_argument("--checkpoint", metavar="FILE", help="safetensors or torch state_dict, loaded strictly "
                                                         "(default: random weights)")
    p.add_argument("--mode", choices=("rollout", "last"), default="rollout",
                   help="attention rollout through the layers (default) or the last layer alone")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default 0.5)")
    p.add_argument("--out", required=True, metavar="PNG", help="the picture to write")
    return parser


COMMANDS = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "kernels": cmd_kernels, "tune": cmd_tune,
            "train": cmd_train,
            "plot": cmd_plot, "attention-map": cmd_attention_map}


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
