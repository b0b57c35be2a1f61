"""CUDA-graph capture of whole models on the triton backend: a fastvit ViT and a timm ViT patched with
``fastvit.patch_timm``, at batch 1 and 8, eager vs one captured graph replayed (``torch.cuda.CUDAGraph``),
and optionally ``torch.compile(mode="reduce-overhead")`` (which captures graphs itself).

    python benchmarks/cuda_graphs.py --json out.json             # on a CUDA machine (make gpu-check runs it)
    python benchmarks/cuda_graphs.py --device cpu --quick --json out.json   # the dry run: eager, batch 1

At small batch a ViT's attention call is 10-30 us of GPU work, so the host path is the whole cost there;
a graph replays the kernels without it. Every row records the graph's output against eager's (max abs
difference; the graph must reproduce eager), eager and replay times (median of CUDA-event timed
repetitions, ms per forward) and their ratio. Capture needs every host decision made before it: the
models are run eagerly first (plans built, relative-position index ranges checked, launch specs
cached), then captured on a side stream, as torch documents. On the CPU (dry run) the graph rows are
recorded as skipped with the reason, the eager rows still run, so the orchestration is exercised.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch

import fastvit

MODELS = {"fastvit": "vit_base_patch16_224", "timm": "vit_base_patch16_224"}
QUICK_MODELS = {"fastvit": "vit_small_patch16_224", "timm": "vit_small_patch16_224"}
BATCHES = (1, 8)
COMPILE_BATCH = 8  # reduce-overhead compiles per shape: one batch size is what the time allows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, reps: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``reps`` back-to-back calls (ms)."""
    fn()
    _sync(device)
    samples = []
    for _ in range(rounds):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(samples)


def build(impl: str, name: str, device: str) -> torch.nn.Module:
    if impl == "fastvit":
        model = fastvit.create_model(name)
    else:
        import timm

        model = fastvit.patch_timm(timm.create_model(name, pretrained=False))
    return model.eval().to(device)


def capture(model: torch.nn.Module, x: torch.Tensor, autocast: Optional[torch.dtype]):
    """``(graph, static_input, static_output)``: warm-up on a side stream, then one capture."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode(), torch.autocast("cuda", autocast, enabled=autocast
                                                                             is not None):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), torch.autocast("cuda", autocast,
                                                                          enabled=autocast is not None):
        static_out = model(static_x)
    return graph, static_x, static_out


def run_case(impl: str, name: str, batch: int, device: str, args) -> list:
    cuda = device.startswith("cuda")
    autocast = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    model = build(impl, name, device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    rows = []
    base = {"impl": impl, "model": name, "batch": batch, "backend": "triton",
            "autocast": str(autocast).replace("torch.", "") if autocast else None}

    def eager():
        with torch.inference_mode(), torch.autocast(device.split(":")[0], autocast or torch.bfloat16,
                                                    enabled=autocast is not None):
            return model(x)

    reps = args.reps if cuda else 1
    with fastvit.use_backend("triton" if cuda else "auto"):
        expected = eager().float()
        eager_ms = time_ms(eager, device, reps=reps, rounds=args.rounds)
        rows.append({**base, "mode": "eager", "status": "ok", "ms": eager_ms,
                     **({} if cuda else {"backend": "auto", "note": "CPU dry run: no triton, no graph"})})
        if not cuda:
            rows.append({**base, "mode": "cuda_graph", "status": "skipped", "reason": "no CUDA device"})
            return rows
        try:
            graph, static_x, static_out = capture(model, x, autocast)
            graph.replay()
            torch.cuda.synchronize()
            diff = (static_out.float() - expected).abs().max().item()
            graph_ms = time_ms(graph.replay, device, reps=reps, rounds=args.rounds)
            rows.append({**base, "mode": "cuda_graph", "status": "ok" if diff <= args.atol else "mismatch",
                         "ms": graph_ms, "x_eager": eager_ms / graph_ms, "max_abs_diff_vs_eager": diff})
        except Exception as e:  # noqa: BLE001 - recorded; the other cases still run
            rows.append({**base, "mode": "cuda_graph", "status": "error", "reason": f"{type(e).__name__}: {e}"})
        if args.compile and batch == COMPILE_BATCH:
            try:
                compiled = torch.compile(copy.deepcopy(model), mode="reduce-overhead")

                def run_compiled():
                    with torch.inference_mode(), torch.autocast("cuda", autocast or torch.bfloat16,
                                                                enabled=autocast is not None):
                        return compiled(x)

                t0 = time.perf_counter()
                for _ in range(3):
                    out = run_compiled()
                torch.cuda.synchronize()
                diff = (out.float() - expected).abs().max().item()
                ms = time_ms(run_compiled, device, reps=reps, rounds=args.rounds)
                rows.append({**base, "mode": "reduce-overhead", "status": "ok" if diff <= args.atol else "mismatch",
                             "ms": ms, "x_eager": eager_ms / ms, "max_abs_diff_vs_eager": diff,
                             "compile_s": time.perf_counter() - t0})
            except Exception as e:  # noqa: BLE001
                rows.append({**base, "mode": "reduce-overhead", "status": "error",
                             "reason": f"{type(e).__name__}: {e}"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="ViT-S, fewer repetitions")
    parser.add_argument("--compile", action="store_true",
                        help=f"also torch.compile(mode='reduce-overhead') at batch {COMPILE_BATCH}")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--atol", type=float, default=0.05, help="graph vs eager, max abs logit difference")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("cuda_graphs: no CUDA device (use --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    if args.quick:
        args.reps, args.rounds = min(args.reps, 5), min(args.rounds, 3)
    models = QUICK_MODELS if args.quick else MODELS
    doc = {"kind": "fastvit-cuda-graphs", "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
           else "cpu", "torch": torch.__version__, "results": []}
    for impl, name in models.items():
        if impl == "timm":
            try:
                import timm  # noqa: F401
            except ImportError as e:
                doc["results"].append({"impl": impl, "model": name, "status": "skipped", "reason": str(e)})
                continue
        # The CPU dry run exercises the orchestration only: one batch size.
        for batch in BATCHES if args.device.startswith("cuda") else BATCHES[:1]:
            try:
                rows = run_case(impl, name, batch, args.device, args)
            except Exception as e:  # noqa: BLE001
                rows = [{"impl": impl, "model": name, "batch": batch, "status": "error",
                         "reason": f"{type(e).__name__}: {e}"}]
            for row in rows:
                shown = f"{row['ms']:.3f} ms" if "ms" in row else row.get("reason", "")
                ratio = f" ({row['x_eager']:.2f}x eager)" if "x_eager" in row else ""
                print(f"[cuda_graphs] {impl} {name} b{batch} {row.get('mode', '')}: {row['status']} {shown}{ratio}",
                      flush=True)
            doc["results"].extend(rows)
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(doc, f, indent=1)
    failed = [r for r in doc["results"] if r["status"] in ("error", "mismatch")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
