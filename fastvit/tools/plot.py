"""Pictures of a ``fastvit bench`` results document (schema: ``fastvit.tools.schema``), drawn with
matplotlib's Agg canvas (no display, no pyplot state):

- ``<stem>_models.png``: img/s of every model, one bar per contender (fastvit under each backend it
  ran, vit-pytorch, timm), log scale, fastvit's ratio to vit-pytorch written next to its bars;
- ``<stem>_attention_tflops.png``: attention TFLOP/s against the sequence length N (query tokens,
  log scale) per backend, the model-named shapes written at their N;
- ``<stem>_attention_memory.png``: the same shapes' peak memory (MiB, log scale) per backend.

Rows that did not run (``skipped``, ``error``) are not drawn; their contenders are listed under the
axes. One panel per dtype and mode the document holds. A figure with nothing to draw is not written.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from fastvit.extras import MissingDependency, require
from fastvit.tools.schema import validate_document

__all__ = ["PlotError", "check_can_draw", "load_results", "plot_results", "plot_models", "plot_attention"]

# Baselines keep one colour in every figure; fastvit's backends take the rest in order of appearance.
_FIXED_COLOURS = {"vit-pytorch": "#7f7f7f", "timm": "#ff7f0e", "timm compiled": "#d62728"}
_PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#aec7e8", "#98df8a"]
_MARKERS = "osD^v<>ph*"


class PlotError(ValueError):
    """A results file that cannot be plotted: missing, not JSON, not a bench document, nothing ran."""


def load_results(path: str) -> dict:
    """Read and check a ``fastvit bench --json`` document.

    Raises:
        PlotError: the file is missing or unreadable, is not JSON, or does not follow the schema.
    """
    if not os.path.isfile(path):
        raise PlotError(f"{path}: no such file (write one with `fastvit bench --json {path}`)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise PlotError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "fastvit-bench":
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise PlotError(f"{path}: not a fastvit bench results document (kind {kind!r}, expected 'fastvit-bench')")
    problems = validate_document(doc)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PlotError(f"{path}: does not follow the results schema: {'; '.join(problems[:3])}{more}")
    return doc


def check_can_draw() -> None:
    """``PlotError`` naming matplotlib and ``fastvit[plot]`` when it is not importable (ask before any work)."""
    try:
        require("matplotlib", "fastvit plot", "plot")
    except MissingDependency as e:
        raise PlotError(str(e)) from None


def plot_results(doc: dict, out_dir: str, stem: str = "bench") -> list:
    """Draw every figure the document has data for into ``out_dir``; returns the paths written.

    Raises:
        PlotError: matplotlib is missing, or no row of the document ran (nothing to draw).
    """
    check_can_draw()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, f"{stem}_models.png")
    if plot_models(doc, path):
        written.append(path)
    for metric in ("tflops", "memory"):
        path = os.path.join(out_dir, f"{stem}_attention_{metric}.png")
        if plot_attention(doc, path, metric):
            written.append(path)
    if not written:
        raise PlotError("nothing to plot: no model or attention row of the document ran (status 'ok')")
    return written


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _subtitle(doc: dict) -> str:
    versions = doc.get("versions", {})
    commit = (doc.get("git_commit") or "")[:8] or "unknown commit"
    return (f"{doc.get('device', '?')} | torch {versions.get('torch', '?')} | {commit} | "
            f"{str(doc.get('timestamp', ''))[:10]}")


def _panels(rows: list) -> list:
    """``(dtype, mode)`` keys in order of appearance."""
    keys = []
    for r in rows:
        key = (r.get("dtype") or "-", r["mode"])
        if key not in keys:
            keys.append(key)
    return keys


def _not_run(rows: list, label) -> str:
    names = sorted({label(r) for r in rows if r["status"] != "ok"} - {label(r) for r in rows if r["status"] == "ok"})
    return ("not run: " + ", ".join(names)) if names else ""


def _colours(labels: list) -> dict:
    colours, free = {}, iter(_PALETTE * 4)
    for label in labels:
        base = label.rsplit(" ", 1)[0] if label.endswith(("bf16", "fp16", "fp32")) else label
        colours[label] = _FIXED_COLOURS.get(label) or _FIXED_COLOURS.get(base) or next(free)
    return colours


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------

def _model_label(row: dict, with_dtype: bool) -> str:
    impl = row.get("impl") or row.get("contender") or "?"
    if impl == "fastvit":
        label = f"fastvit[{row.get('backend')}]"
    elif impl == "timm" and row.get("compiled"):
        label = "timm compiled"
    else:
        label = impl
    return f"{label} {row.get('dtype')}" if with_dtype else label


def plot_models(doc: dict, path: str) -> bool:
    """Model throughput per contender (horizontal bars, log img/s). False (nothing written) when no
    model row ran."""
    rows = [r for r in doc["results"] if r["kind"] == "model"]
    ok = [r for r in rows if r["status"] == "ok" and r.get("img_per_s")]
    if not ok:
        return False
    with_dtype = len({r.get("dtype") for r in ok}) > 1
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    labels = list(dict.fromkeys(_model_label(r, with_dtype) for r in ok))
    colours = _colours(labels)
    models = list(dict.fromkeys(r["name"] for r in ok))
    most = max(sum(1 for r in ok if r["mode"] == mode) for mode in modes)
    fig = _figure(9.0 * len(modes), max(3.0, 1.2 + 0.17 * most + 0.12 * len(models)))
    for i, mode in enumerate(modes):
        ax = fig.add_subplot(1, len(modes), i + 1)
        seen, ticks, y = set(), [], 0.0
        for model in models:
            bars = [r for r in ok if r["name"] == model and r["mode"] == mode]
            if not bars:
                continue
            ticks.append((y + (len(bars) - 1) / 2, model))
            for r in bars:  # one bar per contender, the model's bars together
                label = _model_label(r, with_dtype)
                ax.barh(y, r["img_per_s"], height=0.85, color=colours[label], label=None if label in seen else label)
                seen.add(label)
                note = f" {r['img_per_s']:.3g}"
                if r.get("impl") == "fastvit" and r.get("x_vit_pytorch"):
                    note += f"  {r['x_vit_pytorch']:.2f}x vit-pytorch"
                ax.text(r["img_per_s"], y, note, va="center", fontsize=6)
                y += 1
            y += 0.7  # the gap between models
        ax.set_yticks([t for t, _ in ticks], [m for _, m in ticks], fontsize=7)
        ax.set_ylim(y - 0.5, -0.7)  # the first model on top
        values = [r["img_per_s"] for r in ok if r["mode"] == mode]
        ax.set_xscale("log")
        ax.set_xlabel("images / s (log scale; longer is faster)")
        batch = sorted({r.get("batch_size") for r in ok if r["mode"] == mode and r.get("batch_size")})
        ax.set_title(f"model throughput, {mode}, batch {'/'.join(map(str, batch))}", fontsize=9)
        ax.set_xlim(min(values) / 2, max(values) * 6)  # room for the labels
        ax.grid(axis="x", which="both", alpha=0.25)
        if i == len(modes) - 1:  # one legend, right of the last panel
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"fastvit bench: models ({_subtitle(doc)})", fontsize=10)
    footer = _not_run(rows, lambda r: _model_label(r, with_dtype))
    fig.tight_layout(rect=(0, 0.03 if footer else 0, 1, 0.97))
    if footer:
        fig.text(0.01, 0.005, footer, fontsize=6, color="#555555")
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------

def _attention_label(row: dict) -> str:
    return row.get("contender") or row.get("backend") or "?"


def _metric(row: dict, metric: str) -> Optional[float]:
    if metric == "tflops":
        return None if row.get("gflops") is None else row["gflops"] / 1000.0
    return None if not row.get("peak_mem_bytes") else row["peak_mem_bytes"] / 2**20


def plot_attention(doc: dict, path: str, metric: str = "tflops") -> bool:
    """Attention TFLOP/s (``metric="tflops"``) or peak memory in MiB (``"memory"``) against N per
    backend, one panel per dtype and mode. False (nothing written) when no attention row has it."""
    if metric not in ("tflops", "memory"):
        raise ValueError(f"metric must be 'tflops' or 'memory', got {metric!r}")
    rows = [r for r in doc["results"] if r["kind"] == "attention"]
    ok = [r for r in rows if r["status"] == "ok" and _metric(r, metric) is not None and r.get("shape")]
    if not ok:
        return False
    panels = _panels(ok)
    labels = list(dict.fromkeys(_attention_label(r) for r in ok))
    colours = _colours(labels)
    fig = _figure(max(7.5, 6.5 * len(panels)), 5.0)
    for i, (dtype, mode) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        mine = [r for r in ok if (r.get("dtype") or "-", r["mode"]) == (dtype, mode)]
        # A small horizontal offset per backend keeps markers at the same N apart.
        for j, label in enumerate(labels):
            pts = sorted((r["shape"]["Nq"], _metric(r, metric)) for r in mine if _attention_label(r) == label)
            if not pts:
                continue
            shift = 1.0 + 0.03 * (j - (len(labels) - 1) / 2)
            ax.scatter([n * shift for n, _ in pts], [v for _, v in pts], color=colours[label],
                       marker=_MARKERS[j % len(_MARKERS)], s=28, label=label, zorder=3)
        by_n = {}
        for r in mine:
            s = r["shape"]
            name = r["name"] + (f" (Nk={s['Nk']})" if s["Nk"] != s["Nq"] else "")
            by_n.setdefault(s["Nq"], []).append(name)
        ax.set_xscale("log")
        ax.set_xticks(sorted(by_n), [str(n) for n in sorted(by_n)], fontsize=7)
        ax.minorticks_off()
        bottom, top = ax.get_ylim()
        if metric == "memory":
            ax.set_yscale("log")
            bottom, top = ax.get_ylim()
            top = top * (top / bottom) ** 0.6  # a band above the data for the shape names
        else:
            top = top + (top - bottom) * 0.6
        ax.set_ylim(bottom, top)
        for n, names in by_n.items():
            ax.axvline(n, color="#dddddd", lw=0.8, zorder=1)
            ax.text(n, top, "\n".join(dict.fromkeys(names)), fontsize=5.5, rotation=90, va="top", ha="center",
                    color="#444444")
        ax.set_xlabel("N (query tokens, log scale)")
        ax.set_ylabel("TFLOP/s (higher is faster)" if metric == "tflops" else "peak memory, MiB (log scale)")
        ax.set_title(f"attention {'throughput' if metric == 'tflops' else 'peak memory'}, {dtype} {mode}",
                     fontsize=9)
        ax.grid(alpha=0.25)
        if i == len(panels) - 1:  # one legend, right of the last panel
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"fastvit bench: attention ({_subtitle(doc)})", fontsize=10)
    footer = _not_run(rows, _attention_label)
    fig.tight_layout(rect=(0, 0.04 if footer else 0, 1, 0.96))
    if footer:
        fig.text(0.01, 0.005, footer, fontsize=6, color="#555555")
    fig.savefig(path)
    return True
