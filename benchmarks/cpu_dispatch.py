"""Calibrate CPU auto dispatch: reference (naive) vs SDPA over sequence lengths and dtypes.

    python benchmarks/cpu_dispatch.py [--threads 2]

Prints, per dtype and shape, the median time of each path (interleaved repetitions in one process)
and the smallest key count from which SDPA wins at every larger shape; that is what
``fastvit.attention.dispatch.CPU_SDPA_MIN_KEYS`` should hold on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastvit.attention import attend

# (B, H, N) at D=64: ViT-S/B at 224 (197), window attention (49), 384 px (577), 1024 px (4096).
SHAPES = [(64, 3, 49), (32, 6, 65), (16, 6, 128), (8, 6, 197), (4, 6, 257), (2, 12, 401), (2, 12, 577),
          (1, 12, 1024), (1, 12, 2048)]


def time_it(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for dtype in (torch.float32, torch.bfloat16):
        wins = []
        for B, H, N in SHAPES:
            q, k, v = (torch.randn(B, H, N, 64).to(dtype) for _ in range(3))
            times = {"reference": [], "sdpa": []}
            for _ in range(3):  # interleave the contenders to cancel drift on a shared machine
                for name in times:
                    call = lambda name=name, q=q, k=k, v=v: attend(q, k, v, backend=name)  # noqa: E731
                    times[name].append(time_it(call, args.reps))
            ref, sdpa = min(times["reference"]), min(times["sdpa"])
            wins.append((N, ref / sdpa))
            print(f"{str(dtype):16s} B{B:<3d} H{H:<3d} N{N:<5d} "
                  f"reference {ref * 1e3:8.2f} ms  sdpa {sdpa * 1e3:8.2f} ms"
                  f"  sdpa speed-up {ref / sdpa:5.2f}x")
        crossover = next((n for i, (n, _) in enumerate(wins) if all(r > 1.0 for _, r in wins[i:])), None)
        print(f"{dtype}: SDPA wins from N = {crossover} on\n")


if __name__ == "__main__":
    main()
