"""Everything worth knowing from a lent CUDA machine, in one run and one JSON file.

    python benchmarks/gpu_check.py                 # on the GPU machine, from the repository root

Parts, each in its own subprocess with its own time limit, so one failing or hanging part is
recorded and the others still run:

1. ``info``: ``fastvit info`` (devices, versions, backends, dispatch).
2. ``tests``: ``pytest tests -x -q`` natively on the GPU (Triton kernels compiled, not interpreted).
3. ``check``: ``fastvit check --device cuda`` (every backend vs the reference, fwd + bwd, fp32/bf16/fp16).
4. ``bench_attention``: ``fastvit bench --no-models`` in fp32 and bf16, forward and forward + backward.
5. ``bench_models``: ``fastvit bench --no-attention`` (the default models plus ViT-B/16, batch 64),
   fp32 and bf16 autocast, forward and forward + backward.
6. ``kernels``: ``fastvit kernels`` (ahead-of-time compile report: registers, spills, shared memory).

The result goes to ``benchmarks/results/gpu-<device-name-slug>-<date>.json`` (``--out`` to change):
device, versions, commit, and per part its status (ok / failed / timeout / error), exit code, wall
time, the tail of its output and its parsed JSON results. The whole run is budgeted to finish in
under 9 minutes on an H100 (``--budget``); a part gets its share plus whatever earlier parts left.
The file is rewritten after every part, so even an interrupted run leaves what it measured.

``--device cpu --quick`` exercises the orchestration on a CPU machine (tiny sizes, quick checks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# Share of the budget per part (seconds on an H100, scaled to --budget); leftovers roll forward.
SHARES = {"info": 15, "tests": 190, "check": 70, "bench_attention": 90, "bench_models": 110, "kernels": 35}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_part(name: str, cmd: list, timeout: float, json_path: str | None = None) -> dict:
    """Run one part; never raises. Returns its record."""
    started = time.perf_counter()
    record = {"command": " ".join(cmd), "timeout_s": round(timeout, 1)}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        # A session of its own, so a timeout can end the whole process group (pytest-xdist workers,
        # compile workers), not just the direct child.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=max(timeout, 1))
            record.update(rc=proc.returncode, status="ok" if proc.returncode == 0 else "failed")
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            out, err = proc.communicate()
            record.update(rc=None, status="timeout")
        output = (out or "") + ("\n[stderr]\n" + err if (err or "").strip() else "")
    except Exception as e:  # noqa: BLE001 - e.g. the executable is missing
        output = f"{type(e).__name__}: {e}"
        record.update(rc=None, status="error")
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["output_tail"] = output[-6000:]
    if json_path and os.path.exists(json_path):
        try:
            with open(json_path, encoding="utf-8") as f:
                record["result"] = json.load(f)
        except (OSError, ValueError) as e:
            record["result_error"] = f"could not read {json_path}: {e}"
    return record


def pytest_summary(output: str) -> dict:
    """Counts from pytest's last summary line (``3 failed, 120 passed, 4 skipped in 80.1s``)."""
    counts = {}
    lines = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", line)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", lines[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
        counts["line"] = lines[-1].strip("= ").strip()
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (dry run)")
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for all parts together")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (orchestration dry run)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: " + ", ".join(SHARES))
    parser.add_argument("--pytest-args", default=None, help="replace the pytest arguments (default: "
                                                            "'tests -x -q', plus -n 8 when xdist is installed)")
    parser.add_argument("--out", default=None, help="the results JSON (default: benchmarks/results/gpu-<device>-"
                                                    "<date>.json)")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    from fastvit.bench import device_name, git_info, versions

    name = device_name(args.device)
    date = datetime.date.today().strftime("%Y%m%d")
    out_path = args.out or os.path.join(RESULTS, f"gpu-{slug(name)}-{date}.json")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(SHARES)
    if unknown:
        parser.error(f"unknown part(s) to skip: {', '.join(sorted(unknown))}")

    doc = {
        "schema_version": 1, "kind": "fastvit-gpu-check", "device": name, "device_type": args.device,
        "versions": versions(), "git_commit": git_info()["commit"], "git_dirty": git_info()["dirty"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget, "quick": args.quick, "parts": {},
    }
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        doc["cuda_device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                              "memory_bytes": props.total_memory}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, default=str)
            f.write("\n")

    py = sys.executable
    fastvit = [py, "-m", "fastvit"]
    quick = ["--quick"] if args.quick else []
    tmp = tempfile.mkdtemp(prefix="fastvit-gpu-check-")
    if args.pytest_args is not None:
        pytest_cmd = [py, "-m", "pytest", *args.pytest_args.split()]
    else:
        pytest_cmd = [py, "-m", "pytest", "tests", "-x", "-q", "-p", "no:cacheprovider"]
        try:
            import xdist  # noqa: F401

            pytest_cmd += ["-n", "8"]
        except ImportError:
            pass
    bench_common = [*fastvit, "bench", "--device", args.device, "--dtype", "fp32,bf16", "--backward", *quick]
    parts = {
        "info": ([*fastvit, "info"], None),
        "tests": (pytest_cmd, None),
        "check": ([*fastvit, "check", "--device", args.device, "--failures-only", *quick,
                   "--json", os.path.join(tmp, "check.json")], os.path.join(tmp, "check.json")),
        "bench_attention": ([*bench_common, "--no-models", "--group-seconds", "0.2" if args.quick else "1.0",
                             "--json", os.path.join(tmp, "attention.json")], os.path.join(tmp, "attention.json")),
        "bench_models": ([*bench_common, "--no-attention", "--models", "default,vit_base_patch16_224",
                          "--backends", "auto,sdpa,triton,xformers", "--group-seconds",
                          "0.2" if args.quick else "0.5", *([] if args.quick else ["--batch-size", "64"]),
                          "--json", os.path.join(tmp, "models.json")], os.path.join(tmp, "models.json")),
        "kernels": ([*fastvit, "kernels", "--workers", str(max(2, (os.cpu_count() or 4) - 2)),
                     "--json", os.path.join(tmp, "kernels.json")], os.path.join(tmp, "kernels.json")),
    }

    deadline = time.perf_counter() + args.budget
    scale = args.budget / sum(SHARES.values())
    carry = 0.0
    for part, (cmd, json_path) in parts.items():
        if part in skip:
            doc["parts"][part] = {"status": "skipped", "reason": "--skip"}
            continue
        remaining = deadline - time.perf_counter()
        if remaining < 5:
            doc["parts"][part] = {"status": "skipped", "reason": "the time budget was spent by earlier parts"}
            save()
            continue
        allowance = min(remaining, SHARES[part] * scale + carry)
        print(f"[gpu_check] {part}: {' '.join(cmd[1:])} (limit {allowance:.0f} s)", flush=True)
        record = run_part(part, cmd, allowance, json_path)
        carry = max(0.0, allowance - record["wall_s"])
        if part == "tests":
            record["summary"] = pytest_summary(record["output_tail"])
        elif part == "info":
            record["output"] = record.pop("output_tail")
        doc["parts"][part] = record
        print(f"[gpu_check] {part}: {record['status']} in {record['wall_s']:.0f} s", flush=True)
        save()

    doc["statuses"] = {p: r.get("status") for p, r in doc["parts"].items()}
    doc["ok"] = all(s in ("ok", "skipped") for s in doc["statuses"].values())
    save()
    print(f"[gpu_check] wrote {out_path}: " + ", ".join(f"{p} {s}" for p, s in doc["statuses"].items()))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
