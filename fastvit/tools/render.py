"""The tables the command line prints: ``fastvit bench`` results, the kernel compile report, tuned
buckets, and the number formats they share."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["fmt", "mib", "ratio", "render_bench", "overhead_table", "headline", "info_tables", "check_table",
           "kernels_table", "perf_model_tables", "tune_table", "add_tune_row"]


def fmt(x: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def ratio(x: Optional[float], ci: Optional[Sequence[float]] = None) -> str:
    """``1.12x (1.05-1.19)``: a speed-up (green from 1 up) and its interval, where there is one."""
    if x is None:
        return "-"
    style = "green" if x >= 1.0 else "red"
    interval = f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci is not None else ""
    return f"[{style}]{x:.2f}x[/{style}]{interval}"


def _ratio_of(r: dict, column: str) -> str:
    return ratio(r.get(column), r.get(f"{column}_ci"))


def _marked(r: dict, note: str) -> str:
    """The note of a row of an unstable group, marked (the reason is printed once below the tables)."""
    if not r.get("unstable"):
        return escape(note)
    return "[yellow]unstable[/yellow]" + (f"; {escape(note)}" if note else "")



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
                            f"vs the reference backend, with its 95% interval)", box=box.SIMPLE_HEAD,
                      title_justify="left")
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
            if r.get("window"):  # windowed: the geometry, and the ratio to the models' own window cut
                bias += f" {r['window']}"
                if r["status"] == "ok":
                    einops_ci = r.get("x_einops_ci")
                    note = "; ".join(part for part in (
                        r.get("x_einops") is not None and f"{r['x_einops']:.2f}x einops" + (
                            f" ({einops_ci[0]:.2f}-{einops_ci[1]:.2f})" if einops_ci else ""),
                        r.get("pct_hbm") is not None and f"{r['pct_hbm']:.0f}% of HBM") if part)
            table.add_row(r["name"], dims, bias, r["dtype"], r["mode"], backend,
                          fmt(r.get("median_ms"), ".3f"), fmt(r.get("gflops"), ".1f"), fmt(r.get("pct_peak"), ".1f"),
                          fmt(r.get("gbps"), ".2f"),
                          mib(r.get("peak_mem_bytes")), _ratio_of(r, "x_reference"), _marked(r, note))
        out.print(table)

    models = [r for r in rows if r["kind"] == "model"]
    if models:
        table = Table(title=f"models on {doc['device']} (eval, inference_mode; ratios > 1 = faster than the "
                            f"baseline, from one interleaved run, with their 95% intervals)", box=box.SIMPLE_HEAD,
                      title_justify="left")
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
                          fmt(r.get("median_ms"), ".1f"), fmt(r.get("img_per_s"), ".1f"),
                          mib(r.get("peak_mem_bytes")), _ratio_of(r, "x_vit_pytorch"), _ratio_of(r, "x_timm"),
                          _ratio_of(r, "x_fp32"), _marked(r, note))
        out.print(table)

    patched = [r for r in rows if r["kind"] == "timm"]
    if patched:
        table = Table(title=f"timm models patched in place on {doc['device']} (fastvit.patch_timm; same weights; "
                            f"x timm = speed-up vs the unpatched model, one interleaved run)",
                      box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("timm model", "family", "contender", "dtype", "mode", "batch", "ms/batch", "img/s", "peak MiB",
                    "x timm", "note"):
            table.add_column(col, overflow="fold", justify="right" if col in ("batch", "ms/batch", "img/s",
                                                                               "peak MiB", "x timm") else "left")
        last = None
        for r in patched:
            key = (r["name"], r["mode"])
            if last is not None and key != last:
                table.add_section()
            last = key
            note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            if r["status"] == "ok" and r.get("notes"):
                note = "; ".join(r["notes"])
            contender = (r["contender"] or "-").rsplit(" ", 1)[0]
            table.add_row(r["name"], r.get("family") or "-", contender, r.get("dtype") or "-", r["mode"],
                          str(r.get("batch_size", "-")), fmt(r.get("median_ms"), ".1f"), fmt(r.get("img_per_s"), ".1f"),
                          mib(r.get("peak_mem_bytes")), _ratio_of(r, "x_timm"), _marked(r, note))
        out.print(table)

    overhead = [r for r in rows if r["kind"] == "overhead"]
    if overhead:
        out.print(overhead_table(doc, overhead))
    packed = [r for r in rows if r["kind"] == "packed"]
    if packed:
        out.print(packed_table(doc, packed))
    ats = [r for r in rows if r["kind"] == "ats"]
    if ats:
        out.print(ats_table(doc, ats))
    merged = [r for r in rows if r["kind"] == "merge"]
    if merged:
        out.print(merge_table(doc, merged))

    unstable = {}
    for r in rows:
        if r.get("unstable"):
            label = f"{r['kind']} {r['name']} {r.get('dtype') or ''} {r['mode']}".replace("  ", " ")
            unstable.setdefault(label, r.get("unstable_reason", ""))
    for label, why in unstable.items():
        out.print(f"[yellow]unstable[/yellow] {escape(label)}: {escape(why)}")

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


def _us(x: Optional[float], ci: Optional[Sequence[float]] = None, sign: bool = False) -> str:
    if x is None:
        return "-"
    text = f"{x:+.2f}" if sign else f"{x:.2f}"
    return text + (f" ({ci[0]:+.2f} to {ci[1]:+.2f})" if sign and ci else f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def _target(r: dict) -> str:
    """``+2.38 µs vs sdpa raw <= +3: met``: the target's field as measured, its limit and the verdict."""
    target = r.get("target")
    if not target:
        return ""
    field, limit, what = target["field"], target["max"], target["text"]
    value, ci = r.get(field), r.get(f"{field}_ci")
    if field.startswith("extra_us"):
        measured = f"{_us(value, ci, sign=True)} µs {what} <= +{limit:g}"
    elif field == "median_us":
        measured = f"{_us(value)} µs {what} <= {limit:g}"
    else:
        measured = f"{fmt(value, '.3f')}x" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f" {what} <= {limit:g}x"
    verdict = {True: "[green]met[/green]", False: "[red]not met[/red]", None: "[yellow]not measured[/yellow]"}
    return f"{escape(measured)}: {verdict[r.get('target_met')]}"


def overhead_table(doc: dict, rows: list) -> Table:
    """The overhead group: µs per call, the cost over raw SDPA (or timm's own Attention), the targets."""
    threads = (doc.get("config") or {}).get("threads")
    table = Table(title=f"host-path overhead on {doc['device']} (µs per call on [1, 1, 16, 16] fp32, one interleaved "
                        f"run under inference_mode, {threads or 'default'} torch threads; +µs and x = vs sdpa raw, "
                        f"timm rows: x = timm Attention's time / this; 95% intervals)", box=box.SIMPLE_HEAD,
                  title_justify="left")
    for col in ("contender", "served by", "µs/call", "+µs vs sdpa raw", "x", "target", "note"):
        table.add_column(col, overflow="fold", justify="right" if col in ("µs/call", "+µs vs sdpa raw", "x")
                         else "left")
    for r in rows:
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        if r["status"] == "ok" and r.get("notes"):
            note = "; ".join(r["notes"])
        if r["status"] == "ok" and r.get("extra_us_vs_sdpa_mask") is not None and not r.get("target"):
            note = "; ".join(filter(None, [f"{r['extra_us_vs_sdpa_mask']:+.2f} µs vs sdpa raw dense-mask", note]))
        served = r.get("served_by") or "-"
        if r.get("launch_noop"):
            served += " (launch no-op)"
        x_column = "x_timm" if "x_timm" in r else "x_sdpa"
        table.add_row(escape(r["contender"]), escape(served), _us(r.get("median_us")),
                      _us(r.get("extra_us_vs_sdpa"), r.get("extra_us_vs_sdpa_ci"), sign=True),
                      _ratio_of(r, x_column), _target(r), _marked(r, note))
    return table


def _target_text(t: dict) -> str:
    bound = f">= {t['min']:g}" if "min" in t else f"<= {t['max']:g}"
    return f"{t['field']} {fmt(t['value'], '.2f')} {bound}"


def _packed_targets(r: dict) -> str:
    verdict = {True: "[green]met[/green]", False: "[red]not met[/red]", None: "[yellow]not measured[/yellow]"}
    return "; ".join(f"{escape(_target_text(t))}: {verdict[t['met']]}" for t in r.get("targets") or [])


def merge_table(doc: dict, rows: list) -> Table:
    """The merge groups: img/s at each r, the speed-up over r = 0, tokens at the last block, matching share."""
    table = Table(title=f"token merging on {doc['device']}: batch {rows[0]['batch_size']}, forward, one interleaved "
                        f"run per model and dtype; x r=0 = the same implementation's unmerged time / this (95% "
                        f"intervals)", box=box.SIMPLE_HEAD, title_justify="left")
    numeric = ("ms", "img/s", "x r=0", "tokens last block", "matching")
    for col in ("model", "contender", *numeric, "targets", "note"):
        table.add_column(col, overflow="fold", justify="right" if col in numeric else "left")
    last = None
    for r in rows:
        if last is not None and (r["name"], r["dtype"]) != last:
            table.add_section()
        last = (r["name"], r["dtype"])
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        share = r.get("matching_share")
        table.add_row(r["name"], escape(r["contender"]), fmt(r.get("median_ms"), ".1f"), fmt(r.get("img_per_s"), ".1f"),
                      _ratio_of(r, "x_r0"), str(r.get("tokens_last_block") or "-"),
                      "-" if share is None else f"{100 * share:.1f}%", _packed_targets(r), _marked(r, note))
    return table


def packed_table(doc: dict, rows: list) -> Table:
    """The packed group: img/s of NaViT packed, padded and vit-pytorch's, one attention call packed vs padded."""
    first = rows[0]
    table = Table(title=f"packed sequences on {doc['device']}: {first['images']} images, {first['tokens']} tokens "
                        f"({first['padded_tokens']} padded, {100 * first['padding_fraction']:.0f}% padding), NaViT "
                        f"dim {first['model']['dim']} depth {first['model']['depth']}, one interleaved run per dtype "
                        f"and mode; x = the other contender's time / this (95% "
                        f"intervals)", box=box.SIMPLE_HEAD,
                  title_justify="left")
    numeric = ("ms", "img/s", "x vit-pytorch", "x padded", "x flex")
    for col in ("mode", "contender", "served by", *numeric, "targets", "note"):
        table.add_column(col, overflow="fold", justify="right" if col in numeric else "left")
    last = None
    for r in rows:
        if last is not None and (r["name"], r["dtype"], r["mode"]) != last:
            table.add_section()
        last = (r["name"], r["dtype"], r["mode"])
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        table.add_row(f"{r['dtype']} {r['mode']}", escape(r["contender"]),
                      escape(r.get("served_by") or r.get("impl") or "-"), fmt(r.get("median_ms"), ".1f"),
                      fmt(r.get("img_per_s"), ".1f"), _ratio_of(r, "x_vit_pytorch"), _ratio_of(r, "x_padded"),
                      _ratio_of(r, "x_flex"), _packed_targets(r), _marked(r, note))
    return table


def ats_table(doc: dict, rows: list) -> Table:
    """The ats group: adaptive token sampling with the kept tokens packed vs padded."""
    first = rows[0]
    table = Table(title=f"adaptive token sampling on {doc['device']}: {first['name']}, batch {first['batch_size']}, "
                        f"kept tokens packed vs padded with a key mask, one interleaved run per dtype and mode; x = "
                        f"the padded model's time / this (95% intervals)", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("mode", "contender", "ms", "img/s", "x padded", "targets", "note"):
        table.add_column(col, overflow="fold", justify="right" if col in ("ms", "img/s", "x padded") else "left")
    for r in rows:
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        table.add_row(f"{r['dtype']} {r['mode']}", escape(r["contender"]), fmt(r.get("median_ms"), ".1f"),
                      fmt(r.get("img_per_s"), ".1f"), _ratio_of(r, "x_padded"), _packed_targets(r), _marked(r, note))
    return table


def headline(doc: dict) -> list:
    """One-line summaries of the ratios that matter most, where the run has them."""
    from fastvit.tools.contenders import HEADLINE_MODEL

    lines = []
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    for r in ok:
        if r["kind"] == "model" and r["name"] == HEADLINE_MODEL and r.get("impl") == "fastvit" \
                and r.get("backend") == "auto":
            parts = []
            for column, what in (("x_vit_pytorch", "vit-pytorch"), ("x_timm", "timm"), ("x_fp32", "its fp32 run")):
                if r.get(column) is not None:
                    ci = r.get(f"{column}_ci")
                    parts.append(f"{r[column]:.2f}x" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "") + f" {what}")
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
    for kind in ("packed", "ats", "merge"):
        found = [(r, t) for r in doc["results"] if r["kind"] == kind for t in r.get("targets") or []]
        if found:
            met = sum(t["met"] is True for _, t in found)
            lines.append(f"{kind} targets: {met} of {len(found)} met (" + "; ".join(
                (f"{r['name']} {r['contender']} " if kind == "merge" else f"{r['contender']} {r['dtype']} {r['mode']} ")
                + _target_text(t) for r, t in found) + ")")
    targets = [r for r in doc["results"] if r["kind"] == "overhead" and r.get("target")]
    if targets:
        met = sum(r.get("target_met") is True for r in targets)
        verdicts = {True: "met", False: "not met", None: "not measured"}
        lines.append(f"host-path targets: {met} of {len(targets)} met ("
                     + "; ".join(f"{r['contender']} {verdicts[r.get('target_met')]}" for r in targets) + ")")
    return lines



def kernels_table(report: list) -> tuple:
    """``(table, failed count)`` of the ahead-of-time compile report."""
    table = Table(title="Triton kernels compiled ahead of time", box=box.SIMPLE_HEAD, title_justify="left")
    numeric = ("registers", "spills", "shared mem", "loop mma / all")
    for col in ("kernel", "config", "capability", "registers", "spills", "shared mem", "wgmma", "loop mma / all",
                "global loads", "status"):
        table.add_column(col, overflow="fold", justify="right" if col in numeric else "left")
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
        serialized = entry.get("wgmma_serialized")
        loop = ("-" if entry.get("loop_instructions") is None
                else f"{entry.get('loop_mma')} / {entry.get('loop_instructions')}")
        loads = " ".join(f"{w}-bit: {n}" if w != "tma" else f"TMA: {n}" for w, n in (entry.get("loads") or {}).items())
        table.add_row(str(entry.get("kernel", "?")), escape(str(config if config is not None else "-")),
                      str(entry.get("capability", "-")), fmt(entry.get("registers"), "d"), spill_text,
                      "-" if shared is None else f"{shared / 1024:.1f} KiB",
                      "-" if serialized is None else ("[red]serialised[/red]" if serialized else "ok"), loop,
                      loads or "-",
                      "[green]ok[/green]" if ok else f"[red]failed[/red]: {escape(str(entry.get('error') or ''))}")
    return table, failed


def perf_model_tables(doc: dict) -> list:
    """One table per workload of ``fastvit.tools.perf_model.model_workloads``'s document: a row per kernel
    launch of one call (``x``: the call's count per step), then the forward, backward and step totals
    (their FLOPs: FlashAttention's 5 backward matmuls; us and FLOPs multiplied by the counts)."""
    tables = []
    for w in doc["workloads"]:
        table = Table(title=f"{w['description']} (a model, not a measurement)", box=box.SIMPLE_HEAD,
                      title_justify="left")
        for col in ("call", "kernel", "shape", "x", "GFLOP", "MB", "useful", "loop tc share", "bound", "pred us",
                    "% peak"):
            table.add_column(col, justify="left" if col in ("call", "kernel", "shape", "bound") else "right")
        for call in w["calls"]:
            for k in call["kernels"]:
                share = k["loop_mma_share"]
                table.add_row(f"{call['name']} {k['direction']}", k["kernel"], call["shape"], str(call["count"]),
                              f"{k['flops'] / 1e9:.2f}", f"{k['bytes'] / 1e6:.1f}", f"{k['useful']:.2f}",
                              "-" if share is None else f"{share:.3f}",
                              k["bound"] + (" [red]serialised[/red]" if k["wgmma_serialized"] else ""),
                              f"{k['time_us']:.1f}", f"{k['pct_peak']:.1f}")
        for direction, label in (("fwd", "forward total"), ("bwd", "backward total"), ("step", "step total")):
            t = w["totals"][direction]
            table.add_row(f"[bold]{label}[/bold]", "", "", "", f"{t['flops'] / 1e9:.1f}", f"{t['bytes'] / 1e6:.0f}",
                          "", "", "", f"[bold]{t['time_us']:.0f}[/bold]", f"[bold]{t['pct_peak']:.1f}[/bold]")
        tables.append(table)
    return tables


def tune_table(title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("bucket", "first shape", "best config / backend order", "ms", "x default", "candidates"):
        table.add_column(col, overflow="fold", justify="right" if col in ("ms", "x default", "candidates") else "left")
    return table


def add_tune_row(table: Table, key: str, record: dict) -> None:
    """One tuned bucket: a kernel config, or (``kernel == "dispatch"``) a backend order."""
    best = record.get("best")
    if record["kernel"] == "dispatch":
        cfg = " > ".join(record["order"]) or "-"
    else:
        cfg = "-" if best is None else (f"{best['block_m']}x{best['block_n']} w{best['num_warps']} "
                                        f"s{best['num_stages']}")
    table.add_row(escape(key), record["shape"], cfg, fmt(best and best["ms"], ".3f"), ratio(record.get("x_default")),
                  str(len(record["candidates"])))


def _sample_inputs(device: str, dtype: torch.dtype, n: int, with_bias: bool = False):
    from fastvit.attention import make_inputs

    q, k, v = (torch.zeros(8 if n < 1000 else 1, 6, n, 64, device=device, dtype=dtype) for _ in range(3))
    return make_inputs(q, k, v)


def info_tables() -> list:
    """``fastvit info``: devices, versions, every backend (available or why not), auto dispatch."""
    from fastvit.attention import BACKENDS, auto_order, dtype_name, explain
    from fastvit.tools.env import cpu_flags, cpu_model_name, versions

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

    vers = Table(title="versions", box=box.SIMPLE_HEAD, title_justify="left")
    vers.add_column("package")
    vers.add_column("version")
    for name, version in versions().items():
        vers.add_row(name, version or "[dim]not installed[/dim]")

    backends = Table(title="attention backends", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("backend", "what", "devices", "dtypes", "bwd", "status"):
        backends.add_column(col, overflow="fold")
    for name, b in BACKENDS.items():
        ok, why = b.availability()
        backends.add_row(name, b.description, ", ".join(b.devices), ", ".join(dtype_name(d) for d in b.dtypes),
                         "yes" if b.supports_backward else "no",
                         "[green]available[/green]" if ok else f"[red]unavailable[/red]: {escape(why)}")

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
        from fastvit.attention.dispatch import CUDA_ORDER, CUDA_PLAIN_ORDER

        dispatch.add_row("cuda", "-", "-", " > ".join(CUDA_PLAIN_ORDER) + "; what only the kernels fuse: "
                         + " > ".join(CUDA_ORDER) + " (or the order `fastvit tune` measured)", "-",
                         "no CUDA device here")
    return [devices, vers, backends, dispatch]


def check_table(results: list, device: str, *, failures_only: bool = False) -> Table:
    """``fastvit check``'s results: one row a case (only failures, errors and skips with ``failures_only``)."""
    table = Table(title=f"fastvit check on {device}: backends vs reference (fp32 copies, TF32 off)",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("case", "status", "worst", "max abs err", "at index", "atol / rtol", "note"):
        table.add_column(col, overflow="fold")
    styles = {"pass": "green", "fail": "bold red", "error": "bold red", "skip": "yellow"}
    for r in results:
        if failures_only and r.status == "pass":
            continue
        status = f"[{styles[r.status]}]{'skipped' if r.status == 'skip' else r.status}[/{styles[r.status]}]"
        tol = "-" if r.atol is None else f"{r.atol:.2g} / {r.rtol:.2g}"
        note = f"skipped: {r.reason}" if r.status == "skip" else r.reason
        table.add_row(r.case.id, status, r.worst or "-", fmt(r.max_abs_err, ".2e"),
                      "-" if r.index is None else str(tuple(r.index)), tol, escape(note))
    return table
