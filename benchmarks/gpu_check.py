"""Everything worth knowing from a lent CUDA machine, in one command and one JSON file.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out-dir DIR     # also copy the JSON into DIR
    python benchmarks/gpu_check.py --device cpu --quick   # dry run of the orchestration (CI)

What the GPU machine needs: torch (with CUDA), triton, timm, einops, rich, pytest, hypothesis
(pytest-xdist is used when present). No network, no vit-pytorch, no xformers: the tests that need
them skip with the reason. ``make gpu-check`` installs fastvit itself (``pip install --no-deps -e .``).

Parts, most valuable first, each in its own subprocess with its own time limit (a failing or hanging
part is recorded and the next one still runs), inside a total budget of 420 s (``--budget``):

1. ``tests``: the triton (and flex) kernel tests natively on CUDA tensors, no ``-x``: forward and the
   gradients of q, k, v, tables and dense biases, fp32/fp16/bf16, N = 1..785, Nq != Nk, key padding,
   CLS probabilities, padding poisoning. Every outcome is streamed to the JSON as it happens
   (``benchmarks/pytest_record.py``), each failure with its message (worst element, index, fraction).
2. ``check``: ``fastvit check --device cuda`` (every backend vs the reference).
3. ``bench_attention``: bf16 forward and forward + backward at shapes named after models, triton vs
   flex vs sdpa vs the reference, with TFLOP/s and % of the device's peak.
4. ``bench_windows``: bf16 forward and forward + backward of the windowed shapes (``fastvit bench
   --windows``; Swin-T stage 1, the targets' shape, first): triton vs sdpa vs the reference through
   ``attend(window=...)`` vs ``einops`` (the models' own cut: roll, rearrange, expanded mask, SDPA,
   paste, roll back), with GB/s of q/k/v/o and % of the HBM bandwidth. No flex here: compiling it
   per shape and mode would take the part's time (``fastvit bench --windows all`` runs it).
5. ``model``: ``benchmarks/perf_model_check.py``: the static performance model's attention calls
   (``fastvit kernels --model``: ViT-B/16, Swin-T, LeViT-256) timed with the triton kernels, measured
   beside predicted with their ratio (the dry run: predictions, and each call once at tiny shapes).
6. ``bench_vit_b16``: ViT-B/16 at batch 128 in bf16 autocast: fastvit auto vs the ``sdpa`` backend
   vs timm eager.
7. ``graphs``: ``benchmarks/cuda_graphs.py``: a fastvit ViT-B/16 and a patched timm ViT-B/16 on the
   triton backend, batch 1 and 8, bf16 autocast: eager vs one captured CUDA graph replayed (the
   graph's logits against eager's, and the speed-up: at small batch the host path is the cost).
8. ``bench_packed``: ``fastvit bench --packed`` in bf16, forward and forward + backward: 16 images of
   128-384 px through NaViT (ViT-S width) packed vs padded vs vit-pytorch's (skipped: not installed),
   and one attention call at those lengths packed on triton (the variable-length kernels), flex (a
   document block mask) and sdpa, each against padded SDPA with a key mask.
9. ``bench_models``: the default presets, same contenders.
10. ``bench_timm_patch``: timm's Swin-T, LeViT-256, CaiT-XXS24, Twins-SVT-S, MaxViT-T and ViT-B/16 in
   bf16 autocast, unpatched (timm eager) vs ``fastvit.patch_timm`` (same weights).
11. ``tune``: ``fastvit tune --device cuda`` (kernel configs per model-named shape bucket, written to
   ``kernels/tuned/<device>.json``), with what time is left.
12. ``bench_timm_compile``: ViT-B/16 again with timm under ``torch.compile`` as one more contender,
   only if at least 90 s are left.
13. ``graphs_compile``: the graph cases again, plus ``torch.compile(mode="reduce-overhead")`` at batch
    8, only if at least 120 s are left.

A part gets its share of the budget plus what earlier parts left unused. At its limit it receives
SIGINT (pytest and ``fastvit bench`` then write what they have), then SIGKILL 15 s later. The JSON
(``benchmarks/results/gpu-<device>-<date>.json``) is rewritten after every part and carries device,
versions, commit, per part its status, exit code, wall time, output tail and parsed results, and a
``targets`` section: the measured ratios against the design's GPU targets.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TOTAL_BUDGET_S = 420.0

# Seconds per part at the default budget (scaled to --budget); a part's unused time rolls forward.
SHARES = {"info": 10, "tests": 120, "check": 35, "bench_attention": 70, "bench_windows": 30, "model": 20,
          "bench_vit_b16": 35, "graphs": 20, "bench_packed": 15, "bench_models": 20, "bench_timm_patch": 25,
          "tune": 20,
          "bench_timm_compile": 0,
          "graphs_compile": 0}
OPTIONAL_MIN_S = {"bench_timm_compile": 90.0, "graphs_compile": 120.0}  # no share: only with this much left

# The kernel tests, natively on CUDA (on the CPU dry run: a few interpreter cases).
TEST_PATHS = ["tests/kernels", "tests/attention/test_backends.py", "tests/attention/test_flex.py"]
QUICK_TEST_ARGS = ["tests/attention/test_backends.py", "-k", "(triton or flex) and fp32 and N1-"]
ATTENTION_SHAPES = ("vit_b16_224,vit_s16_224,levit_256_stage1,levit_256_stage2,levit_256_stage3,vit_l16_384,"
                    "ats_vit_s_cls_probs,ats_keypad,cvt_13_stage1,twins_svt_s_gsa_stage1,vit_b16_1024")
BENCH_DTYPE = "bf16"  # on CUDA; the CPU dry run uses fp32
VIT_B16, QUICK_MODEL = "vit_base_patch16_224", "vit_small_patch16_224"
QUICK_SHAPES = "vit_b16_224,vit_s16_224,levit_256_stage2,ats_vit_s_cls_probs"
# Windowed shapes run in WINDOW_SHAPES' order: the targets' shape first, so a part cut short still has it.
QUICK_WINDOW_SHAPES = "swin_t_stage1,crossformer_s_long"
WINDOW_TARGET_SHAPE = "swin_t_stage1"
PACKED_GROUP = "navit_s16_mixed16"  # fastvit.tools.packed_bench's groups: the models, the attention calls
PACKED_ATTENTION_GROUP = "navit_s16_mixed16_attention"  # 7x7 windows, relative-position bias, shift 3
# timm models patched in place (fastvit.tools.timm_models) and their GPU goals vs timm eager.
TIMM_PATCH_GOALS = {"swin_tiny_patch4_window7_224": 1.3, "levit_256": 1.3, "cait_xxs24_224": 1.3,
                    "twins_svt_small": 1.3, "maxvit_tiny_tf_224": 1.3, "vit_base_patch16_224": 1.0}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# --------------------------------------------------------------------------------------------------
# The environment, probed without importing fastvit (a broken install must still give a JSON)
# --------------------------------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "versions": {name: _version(name) for name in ("torch", "triton", "timm", "einops", "rich", "pytest",
                                                           "pytest-xdist", "hypothesis", "vit-pytorch", "xformers",
                                                           "fastvit")},
           "cuda_runtime": torch.version.cuda}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    env.update(git_commit=commit, git_dirty=dirty)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["cuda_device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                              "memory_bytes": props.total_memory, "sms": props.multi_processor_count}
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        env["device"] = name
    return env


# --------------------------------------------------------------------------------------------------
# Running one part
# --------------------------------------------------------------------------------------------------

def run_part(cmd: list, timeout: float, json_path: Optional[str] = None, env: Optional[dict] = None) -> dict:
    """Run one part in a session of its own; never raises. Returns its record."""
    started = time.perf_counter()
    record = {"command": " ".join(cmd), "timeout_s": round(timeout, 1)}
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1))
            record.update(rc=proc.returncode, status="ok" if proc.returncode == 0 else "failed")
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest and `fastvit bench` then flush what they have measured.
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            record.update(rc=proc.returncode, status="timeout")
        log.seek(0)
        output = log.read()
    except Exception as e:  # noqa: BLE001 - e.g. the executable is missing
        output = f"{type(e).__name__}: {e}"
        record.update(rc=None, status="error")
    finally:
        log.close()
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["output_tail"] = output[-6000:]
    if json_path and os.path.exists(json_path):
        try:
            with open(json_path, encoding="utf-8") as f:
                record["result"] = json.load(f)
        except (OSError, ValueError) as e:
            record["result_error"] = f"could not read {json_path}: {e}"
    return record


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except OSError:
        try:
            proc.send_signal(sig)
        except OSError:
            pass


def pytest_summary(output: str) -> dict:
    """Counts from pytest's last summary line (``3 failed, 120 passed, 4 skipped in 80.1s``)."""
    counts = {}
    lines = [line for line in output.splitlines()
             if re.search(r"\d+ (passed|failed|errors?|skipped)\b", line)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", lines[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
        counts["line"] = lines[-1].strip("= ").strip()
    return counts


def read_records(path: str) -> dict:
    """The streamed test outcomes: counts per outcome and every non-passing test with its message."""
    outcomes, problems = {}, []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                key = rec["outcome"] if rec["when"] == "call" or rec["outcome"] == "skipped" else "error"
                outcomes[key] = outcomes.get(key, 0) + 1
                if key != "passed":
                    problems.append(rec)
    failing = [p for p in problems if p["outcome"] != "skipped"]
    skip_reasons = {}
    for p in problems:
        if p["outcome"] == "skipped":
            skip_reasons[p["message"][:200]] = skip_reasons.get(p["message"][:200], 0) + 1
    return {"counts": outcomes, "failures": failing, "skip_reasons": skip_reasons}


# --------------------------------------------------------------------------------------------------
# The measured ratios against the design's targets
# --------------------------------------------------------------------------------------------------

def _median(rows: list, *, kind: str, name: str, mode: str = "fwd", **match) -> Optional[float]:
    for r in rows:
        if r.get("kind") == kind and r.get("name") == name and r.get("mode") == mode and r.get("status") == "ok" \
                and all(r.get(k) == v for k, v in match.items()):
            return r["median_ms"]
    return None


def _target(what: str, goal: float, numerator: Optional[float], denominator: Optional[float],
            lower_is_better: bool = False) -> dict:
    """``ratio`` = denominator time / numerator time (>1: the numerator is faster)."""
    if numerator is None or denominator is None:
        return {"target": what, "goal": goal, "ratio": None, "met": None, "reason": "not measured"}
    ratio = denominator / numerator
    if lower_is_better:  # overhead: numerator / denominator - 1
        overhead = numerator / denominator - 1.0
        return {"target": what, "goal": goal, "overhead": round(overhead, 4), "met": overhead <= goal}
    return {"target": what, "goal": goal, "ratio": round(ratio, 3), "met": ratio >= goal}


def _row(rows: list, **match) -> Optional[dict]:
    return next((r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())), None)


def _bandwidth_target(what: str, goal: float, row: Optional[dict]) -> dict:
    """``ratio`` = the GB/s of q, k, v, o over the device's nominal HBM bandwidth."""
    if row is None:
        return {"target": what, "goal": goal, "ratio": None, "met": None, "reason": "not measured"}
    if not row.get("peak_gbps"):
        return {"target": what, "goal": goal, "ratio": None, "met": None,
                "reason": f"no nominal HBM bandwidth known for {row.get('device', 'this device')} "
                          f"({row.get('gbps', 0.0):.1f} GB/s measured)"}
    ratio = row["gbps"] / row["peak_gbps"]
    return {"target": what, "goal": goal, "ratio": round(ratio, 3), "gbps": round(row["gbps"], 1),
            "peak_gbps": row["peak_gbps"], "met": ratio >= goal}


def _graph_targets(parts: dict) -> list:
    """Each model captures in a CUDA graph on the triton backend and replays eager's logits; the replay's
    speed-up over eager is reported (batch 1: the host path is most of eager's time)."""
    rows = ((parts.get("graphs") or {}).get("result") or {}).get("results", [])
    found = []
    for impl in ("fastvit", "timm"):
        graph = [r for r in rows if r.get("impl") == impl and r.get("mode") == "cuda_graph"]
        what = f"{impl} ViT on triton captures in a CUDA graph and replays eager's logits (batch 1 and 8)"
        if not graph or all(r.get("status") == "skipped" for r in graph):
            reason = graph[0].get("reason", "not measured") if graph else "not measured"
            found.append({"target": what, "goal": 1.0, "ratio": None, "met": None, "reason": reason})
            continue
        ok = [r for r in graph if r.get("status") == "ok"]
        found.append({"target": what, "goal": 1.0, "met": len(ok) == len(graph),
                      "ratio": round(min(r["x_eager"] for r in ok), 3) if ok else None,
                      "by_batch": {str(r.get("batch")): r.get("x_eager", r.get("reason")) for r in graph}})
    return found


def targets(parts: dict, dtype: str = "bf16", model: str = "vit_base_patch16_224") -> list:
    """The design's GPU targets from the parts' results (``dtype`` and ``model`` as the run used them)."""
    att = ((parts.get("bench_attention") or {}).get("result") or {}).get("results", [])
    win = ((parts.get("bench_windows") or {}).get("result") or {}).get("results", [])
    w = lambda contender, mode="fwd": _median(win, kind="attention", name=WINDOW_TARGET_SHAPE, mode=mode,
                                              contender=contender, dtype=dtype)
    vitb = ((parts.get("bench_vit_b16") or {}).get("result") or {}).get("results", [])
    patched = ((parts.get("bench_timm_patch") or {}).get("result") or {}).get("results", [])
    a = lambda name, backend, mode="fwd": _median(att, kind="attention", name=name, mode=mode, backend=backend,
                                                  dtype=dtype)
    m = lambda contender: _median(vitb, kind="model", name=model, contender=contender)
    packed = ((parts.get("bench_packed") or {}).get("result") or {}).get("results", [])
    p = lambda contender, mode="fwd": _median(packed, kind="packed", name=PACKED_ATTENTION_GROUP, mode=mode,
                                              contender=contender, dtype=dtype)
    pm = lambda contender: _median(packed, kind="packed", name=PACKED_GROUP, contender=contender, dtype=dtype)
    return [
        _target("ViT-B attention (N=197, D=64) fwd: triton >= 1.0x sdpa", 1.0, a("vit_b16_224", "triton"),
                a("vit_b16_224", "sdpa")),
        _target("ViT-B attention fwd: triton >= 4x reference", 4.0, a("vit_b16_224", "triton"),
                a("vit_b16_224", "reference")),
        _target("LeViT relative-bias attention fwd: triton >= 1.5x sdpa (expanded float bias)", 1.5,
                a("levit_256_stage2", "triton"), a("levit_256_stage2", "sdpa")),
        _target("LeViT relative-bias attention fwd: triton >= 1.2x flex", 1.2, a("levit_256_stage2", "triton"),
                a("levit_256_stage2", "flex")),
        _target("ViT-B attention fwd+bwd: triton >= 0.9x sdpa", 0.9, a("vit_b16_224", "triton", "fwd+bwd"),
                a("vit_b16_224", "sdpa", "fwd+bwd")),
        _target("CLS probabilities: <= 10% over plain fused attention (ViT-S shape)", 0.10,
                a("ats_vit_s_cls_probs", "triton"), a("vit_s16_224", "triton"), lower_is_better=True),
        _target("ViT-B/16 end to end, bf16, batch 128: fastvit auto >= 1.0x timm eager", 1.0,
                m(f"fastvit[auto] {dtype}"), m(f"timm {dtype}")),
        _target("7x7 windows with bias and shift (Swin-T stage 1) fwd: triton >= 2x SDPA with the expanded mask "
                "(einops cut, copies included)", 2.0, w("triton"), w("einops")),
        _target("7x7 windows with bias and shift fwd+bwd: triton >= 2x SDPA with the expanded mask (copies "
                "included)", 2.0, w("triton", "fwd+bwd"), w("einops", "fwd+bwd")),
        _bandwidth_target("7x7 windows with bias and shift fwd: triton >= 60% of HBM bandwidth on the q/k/v/o bytes",
                          0.6, _row(win, kind="attention", name=WINDOW_TARGET_SHAPE, mode="fwd", contender="triton",
                                    dtype=dtype)),
        _target("packed attention at 16 mixed-resolution images' lengths fwd: triton varlen >= 1.5x padded SDPA "
                "with a key mask", 1.5, p("attend packed triton"), p("attend padded sdpa")),
        _target("packed attention fwd+bwd: triton varlen >= 1.5x padded SDPA with a key mask", 1.5,
                p("attend packed triton", "fwd+bwd"), p("attend padded sdpa", "fwd+bwd")),
        _target("packed attention fwd: triton varlen >= 1.0x flex's document mask", 1.0, p("attend packed triton"),
                p("attend packed flex")),
        _target("NaViT (ViT-S width, 16 mixed images) fwd: packed >= 1.5x the same model padded", 1.5,
                pm("fastvit NaViT packed"), pm("fastvit NaViT padded")),
        *_graph_targets(parts),
        *(_target(f"timm {name} patched in place, {dtype}: >= {goal}x timm eager", goal,
                  _median(patched, kind="timm", name=name, contender=f"patched {dtype}"),
                  _median(patched, kind="timm", name=name, contender=f"timm {dtype}"))
          for name, goal in TIMM_PATCH_GOALS.items()),
    ]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def tuned_table_path(device_name: str) -> str:
    """Where ``fastvit.kernels`` looks for this device's tuned configs (``kernels/tuned/<slug>.json``)."""
    return os.path.join(ROOT, "kernels", "tuned", slug(device_name) + ".json")


def build_parts(args, tmp: str) -> dict:
    """``{part: (command, json path or None, extra env)}`` in the order they run."""
    py = sys.executable
    fastvit = [py, "-m", "fastvit"]
    quick = ["--quick"] if args.quick else []
    dev = ["--device", args.device]
    record = os.path.join(tmp, "tests.jsonl")
    pytest_cmd = [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "pytest_record",
                  "--record-to", record]
    pytest_cmd += QUICK_TEST_ARGS if args.quick else [p for p in TEST_PATHS if os.path.exists(os.path.join(ROOT, p))]
    if not args.quick and _version("pytest-xdist") is not None:
        pytest_cmd += ["-n", str(min(8, max(2, (os.cpu_count() or 4) // 2)))]
    bench = [*fastvit, "bench", *dev, "--dtype", BENCH_DTYPE if args.device.startswith("cuda") else "fp32", *quick]
    models = [*bench, "--no-attention", "--backends", "auto,sdpa", "--no-vit-pytorch"]
    path = lambda name: os.path.join(tmp, name)
    interpret = {} if args.device.startswith("cuda") else {"TRITON_INTERPRET": "1"}
    graphs = os.path.join(ROOT, "benchmarks", "cuda_graphs.py")
    return {
        "info": ([*fastvit, "info"], None, {}),
        "tests": (pytest_cmd, None, {"PYTHONPATH": os.pathsep.join(filter(None, [
            os.path.join(ROOT, "benchmarks"), os.environ.get("PYTHONPATH")]))}),
        "check": ([*fastvit, "check", *dev, "--failures-only", *quick, "--json", path("check.json")],
                  path("check.json"), {}),
        # On the CPU dry run triton runs in its interpreter (tiny shapes), so the target ratios are computed.
        "bench_attention": ([*bench, "--no-models", "--backward", "--shapes", QUICK_SHAPES if args.quick
                             else ATTENTION_SHAPES, "--backends", "triton,flex,sdpa,reference,auto",
                             "--group-seconds", "0.2" if args.quick else "0.6", "--json", path("attention.json")],
                            path("attention.json"), interpret),
        "bench_windows": ([*bench, "--no-models", "--no-attention", "--backward", "--windows",
                           QUICK_WINDOW_SHAPES if args.quick else "all", "--backends", "triton,sdpa,reference,auto",
                           "--group-seconds", "0.2" if args.quick else "0.5", "--json", path("windows.json")],
                          path("windows.json"), interpret),
        "model": ([py, os.path.join(ROOT, "benchmarks", "perf_model_check.py"), *dev, *quick,
                   *(["--workloads", "vit_b16_224,swin_t_224"] if args.quick else []), "--json", path("model.json")],
                  path("model.json"), interpret),
        "bench_vit_b16": ([*models, "--models", VIT_B16 if not args.quick else QUICK_MODEL,
                           "--batch-size", "2" if args.quick else "128", "--group-seconds",
                           "0.2" if args.quick else "2", "--json", path("vit_b16.json")], path("vit_b16.json"), {}),
        "graphs": ([py, graphs, *dev, *quick, "--json", path("graphs.json")], path("graphs.json"), {}),
        "bench_packed": ([*bench, "--no-attention", "--no-models", "--packed", "--backward", "--group-seconds",
                          "0.2" if args.quick else "0.6", "--json", path("packed.json")], path("packed.json"),
                         interpret),
        "bench_models": ([*models, "--models", "default", "--group-seconds", "0.2" if args.quick else "0.4",
                          *(["--batch-size", "32"] if not args.quick else []), "--json", path("models.json")],
                         path("models.json"), {}),
        "bench_timm_patch": ([*bench, "--no-attention", "--no-models", "--timm-patch", ",".join(TIMM_PATCH_GOALS),
                              "--group-seconds", "0.2" if args.quick else "1", "--json", path("timm_patch.json")],
                             path("timm_patch.json"), {}),
        # The tuned table goes where the launchers read it (kernels/tuned/<device>.json, copied to --out-dir);
        # the dry run writes a throwaway one.
        "tune": ([*fastvit, "tune", *dev, *quick, "--json", path("tune.json"), "--tuned-out",
                  path("tuned.json") if args.quick else tuned_table_path(args.device_name)], path("tune.json"), {}),
        "bench_timm_compile": ([*models, "--models", VIT_B16 if not args.quick else QUICK_MODEL,
                                "--batch-size", "2" if args.quick else "128",
                                "--timm-compile", "--group-seconds", "0.2" if args.quick else "2",
                                "--json", path("timm_compile.json")], path("timm_compile.json"), {}),
        "graphs_compile": ([py, graphs, *dev, *quick, "--compile",
                            "--json", path("graphs_compile.json")], path("graphs_compile.json"), {}),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (dry run)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (orchestration dry run)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: " + ", ".join(SHARES))
    parser.add_argument("--out", default=None, help="the results JSON (default: benchmarks/results/gpu-<device>-"
                                                    "<date>.json; cpu-dry-run-<date>.json with --device cpu)")
    parser.add_argument("--out-dir", default=None, help="also copy the results JSON into this directory")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SHARES):
        parser.error(f"unknown part(s) to skip: {', '.join(sorted(skip - set(SHARES)))}")
    started = time.perf_counter()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    env = environment(args.device)
    date = datetime.date.today().strftime("%Y%m%d")
    default_name = (f"gpu-{slug(env['device'])}-{date}.json" if args.device.startswith("cuda")
                    else f"cpu-dry-run-{date}.json")
    out_path = args.out or os.path.join(RESULTS, default_name)
    doc = {"schema_version": 2, "kind": "fastvit-gpu-check", "device_type": args.device, **env,
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "budget_s": args.budget, "quick": args.quick, "complete": False, "parts": {}}

    def save():
        doc["wall_s"] = round(time.perf_counter() - started, 1)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            shutil.copy(out_path, os.path.join(args.out_dir, os.path.basename(out_path)))

    tmp = tempfile.mkdtemp(prefix="fastvit-gpu-check-")
    args.device_name = env["device"]
    parts = build_parts(args, tmp)
    deadline = started + args.budget
    scale = args.budget / TOTAL_BUDGET_S
    carry = 0.0
    save()
    for part, (cmd, json_path, part_env) in parts.items():
        remaining = deadline - time.perf_counter()
        if part in skip:
            doc["parts"][part] = {"status": "skipped", "reason": "--skip"}
            continue
        if SHARES[part] == 0 and remaining < OPTIONAL_MIN_S[part] * scale:
            doc["parts"][part] = {"status": "skipped", "reason": f"runs only with {OPTIONAL_MIN_S[part] * scale:.0f} s "
                                                                 f"left; {remaining:.0f} s were"}
            save()
            continue
        if remaining < 5:
            doc["parts"][part] = {"status": "skipped", "reason": "the time budget was spent by earlier parts"}
            save()
            continue
        allowance = min(remaining, SHARES[part] * scale + carry) if SHARES[part] else remaining
        if part == "tune":  # tuning stops starting new buckets in time to write its table
            cmd = [*cmd, "--max-seconds", f"{max(1.0, allowance - 30):.0f}"]
        print(f"[gpu_check] {part}: {' '.join(cmd[1:])} (limit {allowance:.0f} s)", flush=True)
        record = run_part(cmd, allowance, json_path, part_env)
        carry = max(0.0, allowance - record["wall_s"])
        if part == "tests":
            record["summary"] = pytest_summary(record["output_tail"])
            record.update(read_records(os.path.join(tmp, "tests.jsonl")))
            if record["status"] == "failed" and record["summary"].get("failed") and not record.get("counts"):
                record["note"] = "pytest reported failures but none were streamed: see output_tail"
        elif part == "info":
            record["output"] = record.pop("output_tail")
        elif part == "tune" and not args.quick and args.out_dir and os.path.exists(tuned_table_path(env["device"])):
            shutil.copy(tuned_table_path(env["device"]), args.out_dir)
            record["tuned_table"] = os.path.relpath(tuned_table_path(env["device"]), ROOT)
        doc["parts"][part] = record
        target_dtype = BENCH_DTYPE if args.device.startswith("cuda") else "fp32"
        target_model = VIT_B16 if not args.quick else QUICK_MODEL
        doc["targets"] = targets(doc["parts"], target_dtype, target_model)
        doc["targets_measured_with"] = {"dtype": target_dtype, "model": target_model, "quick": args.quick,
                                        "device": env["device"]}
        print(f"[gpu_check] {part}: {record['status']} in {record['wall_s']:.0f} s", flush=True)
        save()

    doc["statuses"] = {p: r.get("status") for p, r in doc["parts"].items()}
    doc["ok"] = all(s in ("ok", "skipped") for s in doc["statuses"].values())
    doc["complete"] = True
    save()
    print(f"[gpu_check] wrote {out_path} in {doc['wall_s']:.0f} s: "
          + ", ".join(f"{p} {s}" for p, s in doc["statuses"].items()))
    for t in doc.get("targets", []):
        print(f"[gpu_check] target: {t['target']}: "
              + (f"{t['ratio'] if 'ratio' in t else t['overhead']} (met: {t['met']})" if t["met"] is not None
                 else t["reason"]))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
