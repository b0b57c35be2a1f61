"""CPU allocator tuning, model by model: each model in a fresh process, with and without
``fastvit.runtime.tune_cpu_allocator()``.

    python benchmarks/allocator.py [--models cait_xxs24_224,deepvit_small_patch16_224] [--batch 2]
                                   [--dtype fp32|bf16] [--reps 7] [--json PATH]

Why fresh processes: glibc adapts its mmap threshold to the largest block freed so far (up to
32 MiB), so a process that has already run a big model (as one ``fastvit bench`` run does) hides the
page faults a service running only this model takes. Prints the median forward time of both runs
(each after warm-up) and their ratio; the runs alternate so drift on a shared machine cancels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

DEFAULT_MODELS = ["vit_small_patch16_224", "cait_xxs24_224", "deepvit_small_patch16_224", "levit_128s",
                  "pit_ti_224", "crossvit_tiny_240", "cvt_13", "t2t_vit_14", "ats_vit_small_patch16_224"]

_CHILD = r"""
import json, sys, time
tuned = sys.argv[1] == "tuned"
if tuned:
    from fastvit.runtime import tune_cpu_allocator
    assert tune_cpu_allocator().applied
import torch
torch.set_flush_denormal(True)
import fastvit
from fastvit.models import get_model_entry
name, batch, dtype, reps = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
entry = get_model_entry(name)
model = entry.build().eval()
x = torch.randn(batch, *entry.input_size)
times = []
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
    for _ in range(2):
        model(x)
    for _ in range(reps):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def run(mode: str, name: str, batch: int, dtype: str, reps: int) -> list:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, name, str(batch), dtype, str(reps)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2, help="alternating process pairs per model")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        samples = {"default": [], "tuned": []}
        for _ in range(args.rounds):
            for mode in samples:
                samples[mode] += run(mode, name, args.batch, args.dtype, args.reps)
        default, tuned = (statistics.median(samples[m]) * 1e3 for m in ("default", "tuned"))
        results.append({"model": name, "batch": args.batch, "dtype": args.dtype, "default_ms": default,
                        "tuned_ms": tuned, "speedup": default / tuned})
        print(f"{name:30s} batch {args.batch} {args.dtype}: default {default:8.1f} ms  tuned {tuned:8.1f} ms  "
              f"x{default / tuned:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
