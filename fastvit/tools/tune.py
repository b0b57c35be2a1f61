"""``fastvit tune``: time every spill-free kernel config for each model-named attention shape and keep
the fastest per shape bucket in ``kernels/tuned/<device>.json``, which the launchers then read.

    fastvit tune --device cuda                  # all attention shapes of the benchmark, bf16
    fastvit tune --device cpu --quick --tuned-out /tmp/t.json   # smoke run under TRITON_INTERPRET=1

For each shape of ``fastvit.tools.shapes.ATTENTION_SHAPES`` and each tunable kernel (forward, dK/dV, dQ),
the bucket key (``fastvit.kernels.attention.tune_key``) says which launches share a config; a bucket
is tuned once, by the first shape that falls in it. Each candidate of ``candidate_configs`` is forced
on that kernel (``forced_configs``) and all candidates are timed in ONE interleaved run
(``fastvit.tools.timing.time_interleaved``): the forward kernel by the forward call, a backward kernel by
forward + backward (the other kernels keep their defaults, so only the candidate's kernel changes).
A candidate that fails to compile or launch is recorded with its error and never chosen.

The table written is the one the launchers load (its format: ``fastvit.kernels.attention.load_tuned``);
the ``--json`` report also lists every candidate's time. Timings under the CPU's interpreter are
meaningless for speed: there this is a smoke test of the whole path, and the table is written only
where ``--tuned-out`` says.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import time
from typing import Callable, Optional, Sequence

import torch

from fastvit.tools.env import device_name, package_version

__all__ = ["tune", "write_table"]


def _shapes(patterns: Optional[Sequence[str]]) -> list:
    from fastvit.tools.shapes import ATTENTION_SHAPES

    if not patterns:
        return list(ATTENTION_SHAPES)
    shapes = [s for s in ATTENTION_SHAPES if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    if not shapes:
        raise ValueError(f"no attention shape matches {list(patterns)}; known: "
                         f"{', '.join(s.name for s in ATTENTION_SHAPES)}")
    return shapes


def _call(q, k, v, make_bias, kernel: str, cls_probs: bool) -> Callable[[], object]:
    from fastvit.attention import attend

    extra = dict(return_cls_probs=True) if cls_probs else {}
    if kernel == "_attn_fwd":
        def fn():
            with torch.inference_mode():
                return attend(q, k, v, bias=make_bias(), backend="triton", **extra)
        return fn
    grad_out = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], device=q.device, dtype=q.dtype)
    leaves = [t for t in (q, k, v) if t.requires_grad]

    def fn():
        for t in leaves:
            t.grad = None
        res = attend(q, k, v, bias=make_bias(), backend="triton", **extra)
        out = res.out if cls_probs else res
        out.backward(grad_out)
        return out
    return fn


def tune(*, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, shapes: Optional[Sequence[str]] = None,
         quick: bool = False, budget_s: float = 0.3, max_configs: Optional[int] = None,
         max_seconds: Optional[float] = None,
         on_bucket: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Tune every bucket the shapes fall into. Returns the report (``entries`` is the table).

    Args:
        device: ``cuda``, or ``cpu`` under ``TRITON_INTERPRET=1`` (smoke runs).
        dtype: the inputs' dtype.
        shapes: glob patterns of benchmark shape names (default: all).
        quick: the shapes' tiny ``quick`` sizes.
        budget_s: seconds of interleaved timing per bucket.
        max_configs: time at most this many candidates per bucket (the first ones in preference order).
        max_seconds: stop starting new buckets after this many seconds (the report says which were left).
        on_bucket: called with ``(key, entry)`` after each bucket.
    """
    from fastvit.kernels import attention as kattn
    from fastvit.tools.shapes import attention_inputs
    from fastvit.tools.timing import Contender, time_interleaved

    ok, why = kattn._runtime_available(torch.device(device))
    if not ok:
        raise ValueError(f"cannot tune on {device}: {why}")
    started = time.perf_counter()
    entries, report, skipped = {}, [], []
    for shape in _shapes(shapes):
        dims = shape.dims(device, quick)
        B, H, Nq, Nk, D, Dv = dims
        biased = shape.bias != "none"
        for kernel in kattn.TUNABLE_KERNELS:
            key = kattn.tune_key(kernel, Nq, Nk, D, Dv, dtype, biased)
            if key in entries or any(r["key"] == key for r in report):
                continue
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                skipped.append({"key": key, "shape": shape.name, "reason": f"--max-seconds {max_seconds:g} reached"})
                continue
            candidates = kattn.candidate_configs(kernel, Nq, Nk, D, Dv, dtype, biased)
            if max_configs is not None:
                candidates = candidates[:max_configs]
            q, k, v, make_bias = attention_inputs(dims, shape.bias, device, dtype,
                                                  requires_grad=kernel != "_attn_fwd")
            contenders = []
            for cfg in candidates:
                call = _call(q, k, v, make_bias, kernel, shape.cls_probs)

                def fn(cfg=cfg, call=call, kernel=kernel):
                    with kattn.forced_configs({kernel: cfg}):
                        return call()
                contenders.append(Contender(_label(cfg), fn, {"config": cfg._asdict()}))
            measured = time_interleaved(contenders, device, budget_s=budget_s, min_samples=3, measure_memory=False)
            timings = []
            for c in contenders:
                m = measured[c.name]
                timings.append({**c.meta["config"], "ms": m.median * 1e3 if m.ok else None,
                                "error": None if m.ok else (m.error or "no samples")})
            good = [t for t in timings if t["ms"] is not None]
            record = {"key": key, "kernel": kernel, "shape": shape.name, "dims": list(dims), "candidates": timings}
            if good:
                best = min(good, key=lambda t: t["ms"])
                entries[key] = {k_: best[k_] for k_ in ("block_m", "block_n", "num_warps", "num_stages", "ms")}
                entries[key]["shape"] = shape.name
                record["best"] = entries[key]
                default = kattn.launch_plan(Nq, Nk, D, Dv, dtype, biased=biased)[kernel][0]
                default_ms = next((t["ms"] for t in timings if _same(t, default)), None)
                record["default"] = {**default._asdict(), "ms": default_ms}
                record["x_default"] = default_ms / best["ms"] if default_ms else None
            else:
                record["best"] = None
                record["reason"] = "every candidate failed"
            report.append(record)
            if on_bucket is not None:
                on_bucket(key, record)
    dispatch, orders = {}, []
    for shape in _shapes(shapes):
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            skipped.append({"key": f"dispatch:{shape.name}", "shape": shape.name,
                            "reason": f"--max-seconds {max_seconds:g} reached"})
            continue
        key, record = measure_backend_order(shape, device=device, dtype=dtype, quick=quick, budget_s=budget_s)
        orders.append(record)
        if record["order"] and key not in dispatch:
            dispatch[key] = record["order"]
        if on_bucket is not None:
            on_bucket(f"dispatch:{key}", record)
    return {"kind": "fastvit-tune", "device": device_name(device), "device_type": torch.device(device).type,
            "dtype": str(dtype).replace("torch.", ""), "quick": quick,
            "triton": package_version("triton"), "torch": torch.__version__,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - started, "entries": entries, "buckets": report,
            "dispatch": dispatch, "backend_orders": orders, "not_tuned": skipped}


# Backends auto dispatch may order on CUDA by measurement (the reference is always last).
ORDERED_BACKENDS = ("triton", "flex", "xformers", "sdpa")


def measure_backend_order(shape, *, device: str, dtype: torch.dtype, quick: bool, budget_s: float) -> tuple:
    """Times the forward of every backend that serves ``shape`` in one interleaved run.

    Returns:
        ``(bucket key of fastvit.attention.measured, record)``; ``record["order"]`` is fastest first.
    """
    from fastvit.attention import BACKENDS, attend, make_inputs
    from fastvit.attention.measured import key_of
    from fastvit.tools.shapes import attention_inputs
    from fastvit.tools.timing import Contender, time_interleaved

    dims = shape.dims(device, quick)
    q, k, v, make_bias = attention_inputs(dims, shape.bias, device, dtype)
    extra = dict(return_cls_probs=True) if shape.cls_probs else {}
    inp = make_inputs(q, k, v, bias=make_bias(), **extra)
    contenders, refused = [], {}
    for name in ORDERED_BACKENDS:
        reasons = BACKENDS[name].not_supported_reasons(inp) if name in BACKENDS else [f"{name} is not registered"]
        if reasons:
            refused[name] = "; ".join(reasons)
            continue

        def fn(name=name):
            with torch.inference_mode():
                return attend(q, k, v, bias=make_bias(), backend=name, **extra)
        contenders.append(Contender(name, fn))
    measured = time_interleaved(contenders, device, budget_s=budget_s, min_samples=3, measure_memory=False)
    times = {c.name: measured[c.name].median * 1e3 for c in contenders if measured[c.name].ok}
    errors = {c.name: measured[c.name].error or "no samples" for c in contenders if not measured[c.name].ok}
    order = sorted(times, key=times.get)
    key = key_of(inp)
    return key, {"key": key, "kernel": "dispatch", "shape": shape.name, "dims": list(dims), "order": order,
                 "ms": times, "refused": refused, "errors": errors,
                 "candidates": [{"backend": n, "ms": t} for n, t in times.items()],
                 "best": {"backend": order[0], "ms": times[order[0]]} if order else None}


def write_table(doc: dict, path: str) -> str:
    """Merge ``doc["entries"]`` into the tuned table at ``path`` (entries of other buckets are kept); the
    process's tuned tables are reloaded (``fastvit.attention.measured.reload_tuned``)."""
    table = {"device": doc["device"], "triton": doc["triton"], "torch": doc["torch"], "entries": {}}
    old = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        table["entries"].update(old.get("entries", {}))
    table["entries"].update(doc["entries"])
    table["dispatch"] = {**old.get("dispatch", {}), **doc.get("dispatch", {})}
    table["updated"] = doc["timestamp"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    from fastvit.attention.measured import reload_tuned

    reload_tuned()  # this process's launchers and attention plans see the new table from the next call
    return path


def _label(cfg) -> str:
    return f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"


def _same(timing: dict, cfg) -> bool:
    return all(timing[k] == v for k, v in cfg._asdict().items())


