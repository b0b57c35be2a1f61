"""The static performance model (``fastvit kernels --model``) against the GPU: each modelled attention
call timed with the triton kernels, measured beside predicted (the ``model`` part of ``gpu_check.py``).

    python benchmarks/perf_model_check.py --device cuda --json model.json
    python benchmarks/perf_model_check.py --device cpu --quick --json model.json   # dry run

Each call runs the launchers the model describes (``kernels.attention.attention_fwd`` / ``attention_bwd``,
``kernels.window_attention.window_attention_fwd`` / ``window_attention_bwd``) on bf16 CUDA tensors at the
workload's shape: 3 warm-up calls, then the median of ``--reps`` CUDA-event timed calls per direction.
The measured time includes what the launchers do around the kernels (the bias gather, the dS sums),
which the model leaves out. ``ratio`` = measured / predicted (> 1: slower than the model says).
The CPU dry run computes the predictions and runs each call once, in the triton interpreter, at
batch 1, one head and at most 20 tokens (one 4x4 window for the window family).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _inputs(call, device, dtype, quick: bool):
    batch, heads = (1, 1) if quick else (call.batch, call.heads)
    if call.windows:
        grid, size = ((4, 4), (4, 4)) if quick else ((7 * int(call.windows ** 0.5),) * 2, (7, 7))
        n = grid[0] * grid[1]
        nq = nk = n
    else:
        nq, nk = (min(call.nq, 20), min(call.nk, 20)) if quick else (call.nq, call.nk)
        grid = size = None
    q = torch.randn(batch, heads, nq, call.d, device=device, dtype=dtype)
    k = torch.randn(batch, heads, nk, call.d, device=device, dtype=dtype)
    v = torch.randn(batch, heads, nk, call.dv, device=device, dtype=dtype)
    extra = {}
    if call.bias != "none":
        if call.windows:
            wn = size[0] * size[1]
            extra["rel_table"] = torch.randn((2 * size[0] - 1) * (2 * size[1] - 1), heads, device=device)
            extra["rel_index"] = torch.randint(0, extra["rel_table"].shape[0], (wn, wn), device=device)
        else:
            extra["rel_table"] = torch.randn(nk, heads, device=device)
            extra["rel_index"] = torch.randint(0, nk, (nq, nk), device=device)
        extra["rel_table"].requires_grad_(True)
    window = dict(grid=grid, size=size, shift=(size[0] // 2,) * 2 if call.shifted else (0, 0)) if call.windows else {}
    return q, k, v, extra, window


def _timed(fn, device: str, reps: int) -> float:
    """Median microseconds of ``fn`` (CUDA events on CUDA, one call on the CPU)."""
    if not device.startswith("cuda"):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def measure(call, device: str, quick: bool, reps: int) -> dict:
    """``{"fwd": us, "bwd": us}`` of one call through the triton launchers (the attention family also
    ``"bwd_threepass"``: the backward forced onto its three passes)."""
    from fastvit.kernels import attention as A
    from fastvit.kernels import window_attention as W

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    q, k, v, extra, window = _inputs(call, device, dtype, quick)
    scale = call.d ** -0.5
    if call.windows:
        fwd = lambda: W.window_attention_fwd(q, k, v, scale=scale, **window, **extra)
        out, lse = fwd()
        do = torch.randn_like(out)
        bwd = lambda: W.window_attention_bwd(do, q, k, v, out, lse, scale=scale, **window, **extra)
    else:
        fwd = lambda: A.attention_fwd(q, k, v, scale=scale, **extra)
        out, lse, _ = fwd()
        do = torch.randn_like(out)
        bwd = lambda: A.attention_bwd(do, q, k, v, out, lse, scale=scale, **extra)
        times = {"fwd": _timed(fwd, device, reps), "bwd": _timed(bwd, device, reps)}
        with A.backward_path("threepass"):  # the one-pass backward's baseline, same inputs
            times["bwd_threepass"] = _timed(bwd, device, reps)
        return times
    return {"fwd": _timed(fwd, device, reps), "bwd": _timed(bwd, device, reps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="dry run: tiny shapes, one call each")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--workloads", default="", help="comma-separated (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("perf_model_check: no CUDA device", file=sys.stderr)
        return 2
    from fastvit.tools import perf_model

    names = [n for n in args.workloads.split(",") if n] or None
    doc = perf_model.model_workloads(names, workers=min(8, max(2, (os.cpu_count() or 2) // 2)))
    calls = {(w.name, c.name, c.shape): c for w in (perf_model.WORKLOADS[n]() for n in names or perf_model.WORKLOADS)
             for c in w.calls}
    results, failed = [], 0
    for w in doc["workloads"]:
        for entry in w["calls"]:
            call = calls[(w["name"], entry["name"], entry["shape"])]
            try:
                measured = measure(call, args.device, args.quick, args.reps)
                error = None
            except Exception as e:  # noqa: BLE001 - recorded; the next call still runs
                measured, error = {}, f"{type(e).__name__}: {e}"[:300]
                failed += 1
            for direction in ("fwd", "bwd"):
                predicted = entry[direction]["time_us"]
                got = measured.get(direction)
                row = {"workload": w["name"], "call": entry["name"], "shape": entry["shape"], "mode": direction,
                       "count": entry["count"], "predicted_us": round(predicted, 2),
                       "measured_us": None if got is None else round(got, 2),
                       "ratio": None if got is None or args.quick else round(got / predicted, 3),
                       "status": "ok" if error is None else "error", "error": error}
                results.append(row)
                print(f"{w['name']:<14} {entry['name'] + ' ' + direction:<20} {entry['shape']:<36} predicted "
                      f"{predicted:8.1f} us  measured {'-' if got is None else f'{got:8.1f}'} us  ratio "
                      f"{row['ratio'] if row['ratio'] is not None else '-'}", flush=True)
            three = measured.get("bwd_threepass")
            if three is not None:  # what the backward took before the one pass (the launcher's other path)
                speedup = None if args.quick else round(three / measured["bwd"], 3)
                results.append({"workload": w["name"], "call": entry["name"], "shape": entry["shape"],
                                "mode": "bwd_threepass", "count": entry["count"], "predicted_us": None,
                                "measured_us": round(three, 2), "onepass_speedup": speedup, "status": "ok",
                                "error": None})
                print(f"{w['name']:<14} {entry['name'] + ' bwd 3-pass':<20} {entry['shape']:<36} measured "
                      f"{three:8.1f} us  one pass {speedup if speedup is not None else '-'}x faster", flush=True)
    out = {"schema_version": 1, "kind": "fastvit-perf-model-check", "device_type": args.device, "quick": args.quick,
           "note": "measured at tiny shapes in the interpreter: no ratios" if args.quick else None,
           "model": doc, "results": results}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
