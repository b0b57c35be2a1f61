"""The CPU work of timm's models unpatched vs ``fastvit.patch_timm`` vs ``patch_timm(linear=True)``.

    python benchmarks/timm_patch_work.py                  # every model of fastvit.tools.timm_models
    python benchmarks/timm_patch_work.py swin_tiny* --rounds 9 --batch-size 4

On a shared CPU the wall-clock ratios of ``fastvit bench --timm-patch`` move with the other
processes (a 2-thread run waits at OpenMP barriers for descheduled threads). This script times the
same three versions (same weights, eval, ``inference_mode``, denormals flushed) on ONE thread by the
thread's CPU time, which other processes do not inflate: it says whether patching adds or removes
work, not how fast a quiet multi-core machine runs. Rounds alternate the order of the three.
Results: ``benchmarks/results/cpu-timm-patch-work.json``.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import platform
import statistics
import time

import timm
import torch

from fastvit.compat.timm import patch_timm
from fastvit.tools.env import cpu_model_name, git_info
from fastvit.tools.timm_models import TIMM_BENCH_MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(name: str, batch_size: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch_size, *model.pretrained_cfg["input_size"])
    versions = {"timm": model, "patched": patch_timm(copy.deepcopy(model)),
                "patched+linear": patch_timm(copy.deepcopy(model), linear=True)}
    seconds = {k: [] for k in versions}
    with torch.inference_mode():
        for m in versions.values():  # warm-up (and the prepacked weights)
            m(x)
        for r in range(rounds):
            order = list(versions.items()) if r % 2 == 0 else list(versions.items())[::-1]
            for key, m in order:
                t0 = time.thread_time()
                m(x)
                seconds[key].append(time.thread_time() - t0)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"model": name, "batch_size": batch_size, "rounds": rounds,
            "cpu_ms": {k: round(v * 1e3, 1) for k, v in median.items()},
            "x_timm": {k: round(median["timm"] / v, 3) for k, v in median.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=["*"], help="globs over timm model names")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu-timm-patch-work.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    names = [m.name for m in TIMM_BENCH_MODELS if any(fnmatch.fnmatchcase(m.name, p) for p in args.patterns)]
    rows = []
    for name in names:
        row = measure(name, args.batch_size, args.rounds)
        rows.append(row)
        print(f"{name:34s} " + "  ".join(f"{k} {row['cpu_ms'][k]:.0f} ms ({row['x_timm'][k]:.3f}x)"
                                          for k in row["cpu_ms"]), flush=True)
    doc = {"kind": "fastvit-timm-patch-work", "clock": "thread CPU time, 1 thread", "cpu": cpu_model_name(),
           "machine": platform.machine(), "torch": torch.__version__, "timm": timm.__version__, **git_info(),
           "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
