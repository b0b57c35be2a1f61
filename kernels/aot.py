"""Ahead-of-time compile report: every kernel variant the launchers may launch, built for sm_80 and
sm_90a without a GPU, with its registers, spills and shared memory, and what its machine code says
(``sass.py``: ptxas's notices such as serialised wgmma, the main loop's tensor-core share, the width
of the global loads). ``--check`` fails on any failed compile, spill or serialised wgmma. Both
kernel families are in it:
``variants.iter_compile_specs`` (attention) and ``window_attention.iter_compile_specs`` (windows).

    python -m fastvit.kernels.aot [--full] [--capabilities 80 90] [--workers 2] [--json out.json] [--check]

How: ``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cap, 32))``
runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) on the CPU. Registers and
the stack frame come from ``cuobjdump --dump-resource-usage`` on the cubin (both shipped in the
triton wheel); ptxas puts spilled registers in the stack frame, so ``spills`` is the stack frame in
bytes and 0 means no spills. Shared memory comes from the compiled metadata.

The compiles run in worker processes with ``TRITON_INTERPRET`` cleared: under the interpreter
``@triton.jit`` yields interpreted functions, which cannot be compiled. So the report works from a
process that has ``TRITON_INTERPRET=1`` set (the test suite). Triton's cache (``~/.triton/cache``)
makes a second run fast.

The spill table: configs whose variants spill on either capability are listed in
``spill_table.PRUNED`` (``--spill-table`` compiles every config of the preference lists for every
head-block pair and bias kind); ``keep()`` then skips them and the heuristics fall back to the next
config. Each row is labelled with its variant (see ``variants.divisible_by_16`` for the run-time
specialisation each row stands for): ``split`` marks the variants with the split key/query loop's
masked last block compiled in, ``even`` the mask-free one of aligned shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Optional

__all__ = ["compile_report", "compile_spec", "main"]

_CUDA_TARGET_NAMES = {80: "sm_80", 90: "sm_90a"}


def _dtype_of(spec) -> str:
    return spec.signature["Q"][1:] if "Q" in spec.signature else spec.signature["Out"][1:]


def _variant(constexprs: dict) -> str:
    """A short label of a variant's switches and specialisation, e.g. ``rel+dense+pad even:D split``
    (the table gathered in-kernel, a dense bias, key padding; the head dim a block size; Nq and Nk
    not block multiples, so the split loop's masked last block is compiled in), ``plain even``
    (every extent a block multiple: no masks at all) or ``dense+pad even:D split tf32``."""
    feats = [name for name, flag in (("rel", "HAS_REL"), ("dense", "HAS_DENSE"), ("pad", "HAS_PAD"),
                                     ("bias", "HAS_BIAS"), ("shift", "SHIFT"), ("ds", "STORE_DS"),
                                     ("bsum", "BATCH_SUM"), ("padded", "BIAS_PADDED"))
             if constexprs.get(flag)]
    evens = [k for k in ("EVEN_M", "EVEN_N", "EVEN_D") if k in constexprs]
    if all(constexprs[k] for k in evens):
        shape = "even"
    elif not any(constexprs[k] for k in evens):
        shape = "uneven"
    else:
        shape = "even:" + ",".join(k[5:] for k in evens if constexprs[k])
    if any(k in constexprs and not constexprs[k] for k in ("EVEN_M", "EVEN_N")):
        shape += " split"
    return f"{'+'.join(feats) or 'plain'} {shape}"


def _config_dict(spec) -> dict:
    c = spec.constexprs
    cfg = {"dtype": _dtype_of(spec)}
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV"):
        if key in c:
            cfg[key] = c[key]
    variant = _variant(c) + (" tf32" if cfg["dtype"] == "fp32" and c.get("FP32_IEEE") is False else "")
    if spec.divisible is not None and "stride_dm" in spec.divisible and not c.get("EVEN_N"):
        variant += " aligned-bias"  # the launcher's expanded table: rows padded to 64 elements
    cfg.update(num_warps=spec.config.num_warps, num_stages=spec.config.num_stages, variant=variant)
    return cfg


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    """(registers, stack frame bytes) of the one kernel in ``cubin``, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    regs = stack = None
    for token in text.split():
        if token.startswith("REG:"):
            regs = int(token[4:])
        elif token.startswith("STACK:"):
            stack = int(token[6:])
    return regs, stack


def _ast_source(fn, signature: dict, constexprs: dict, divisible: list, target):
    """``ASTSource`` with the divisibility hints the runtime would derive (triton >= 3.3 format;
    triton 3.2's ``constants`` keyword gets no hints, which only makes its report pessimistic)."""
    import inspect

    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params:  # pragma: no cover - triton 3.2
        return ASTSource(fn=fn, signature=signature, constants=constexprs)
    hint = make_backend(target).parse_attr("D")
    names = list(signature)
    attrs = {(names.index(name),): hint for name in divisible}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_spec(spec, capability: int) -> dict:
    """Compiles one spec for ``capability`` (80 or 90) and returns its report row."""
    row = {"kernel": spec.kernel, "config": _config_dict(spec), "capability": capability,
           "registers": None, "spills": None, "shared_mem_bytes": None, "ok": False, "error": None}
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        from . import sass, variants

        fn = _kernels()[spec.kernel]
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise RuntimeError("the kernels were created under TRITON_INTERPRET=1 and cannot be compiled; "
                               "run the report in a process without it (compile_report does)")
        start = time.perf_counter()
        target = GPUTarget("cuda", capability, 32)
        missing = [n for n, is_constexpr in variants._kernel_params(fn) if is_constexpr and n not in spec.constexprs]
        if missing:  # triton would compile them as None: a variant no launcher runs
            raise ValueError(f"the spec gives no value for the constexprs {', '.join(missing)}")
        divisible = spec.divisible if spec.divisible is not None else variants.divisible_by_16(fn, spec.constexprs)
        source = _ast_source(fn, spec.signature, spec.constexprs, divisible, target)
        compiled = triton.compile(source, target=target,
                                  options={"num_warps": spec.config.num_warps,
                                           "num_stages": spec.config.num_stages})
        registers, stack = _resource_usage(compiled.asm["cubin"])
        row.update(registers=registers, spills=stack, shared_mem_bytes=compiled.metadata.shared, ok=True,
                   seconds=round(time.perf_counter() - start, 2))
        row.update(sass.machine_code(compiled.asm["ptx"], compiled.asm["cubin"], capability))
    except Exception as e:  # noqa: BLE001 - the report records every failure, whatever it is
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
    return row


def _kernels() -> dict:
    """Every kernel of the report by name: the attention, variable-length and window families."""
    from . import attention, varlen, window_attention

    return {**attention.KERNELS, **varlen.KERNELS, **window_attention.KERNELS}


def default_specs(full: bool = False) -> list:
    """What the report compiles by default: ``variants.iter_compile_specs`` (the attention family),
    ``varlen.iter_compile_specs`` (packed sequences) and ``window_attention.iter_compile_specs``."""
    from . import varlen, window_attention
    from .variants import iter_compile_specs

    return (list(iter_compile_specs(full=full)) + list(varlen.iter_compile_specs(full=full))
            + list(window_attention.iter_compile_specs(full=full)))


def _worker_init() -> None:
    # Runs in a fresh (spawned) worker before it imports the kernels: compile, don't interpret.
    os.environ["TRITON_INTERPRET"] = "0"


def _compile_chunk(args) -> list[dict]:
    specs, capability = args
    return [compile_spec(spec, capability) for spec in specs]


def compile_report(capabilities: Iterable[int] = (80, 90), progress: Optional[Callable[[dict], None]] = None,
                   *, specs=None, full: bool = False, workers: int = 2) -> list[dict]:
    """Compiles every spec from `default_specs` for each capability; one row per compile.

    Args:
        capabilities: CUDA compute capabilities; 80 -> sm_80, 90 -> sm_90a.
        progress: called with each row as it completes.
        specs: the specs to compile (default: ``default_specs(full)``).
        workers: worker processes (spawned, with ``TRITON_INTERPRET`` cleared).

    Returns:
        Rows ``{kernel, config, capability, registers, spills, shared_mem_bytes, ok, error}``.
    """
    specs = default_specs(full) if specs is None else list(specs)
    caps = [int(c) for c in capabilities]
    # Chunks of a few specs amortise process round trips; capabilities alternate so both workers
    # stay busy to the end.
    chunk = 4
    # A spec that names its capabilities (the config a launcher picks on that one) compiles for those.
    per_cap = {cap: [s for s in specs if not getattr(s, "capabilities", ()) or cap in s.capabilities]
               for cap in caps}
    jobs = [(per_cap[cap][i:i + chunk], cap) for cap in caps for i in range(0, len(per_cap[cap]), chunk)]
    rows: list[dict] = []
    with _compile_pool(workers) as pool:
        for result in pool.map(_compile_chunk, jobs):
            for row in result:
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


def _check_config(args) -> tuple[list, list]:
    """Compiles the default variants of one (kernel, config, dtype, head blocks, bias kind) for every
    capability; returns (its `PRUNED` key if any variant spills or fails, else nothing; the errors)."""
    kernel, cfg, dtype_name, blocks, kind, capabilities = args
    import torch

    from . import attention as A
    from . import variants as V
    from . import varlen

    dtype = getattr(torch, dtype_name)
    rows = []
    if kernel in varlen.KERNELS:  # one default variant: aligned head dims, the dtype's matmul mode
        rows += [compile_spec(varlen.tile_spec(kernel, cfg, dtype, blocks), cap) for cap in capabilities]
    for variant in ([] if kernel in varlen.KERNELS else
                    V._variants(kind, full=False, even_plain=kernel == "_attn_fwd")):  # as the report
        extras = V._ds_variants(variant, full=False) if kernel in V._DS_KERNELS else [{}]
        if kernel == "_attn_bwd_onepass":
            extras = V._onepass_bias_variants(variant, extras, dtype)
        for extra in extras:
            spec = V.tile_spec(kernel, cfg, dtype, blocks, dict(variant, **extra))
            rows += [compile_spec(spec, cap) for cap in capabilities]
    errors = [r for r in rows if not r["ok"]]
    bad_caps = sorted({r["capability"] for r in rows
                       if not (r["ok"] and not r["spills"] and not r.get("wgmma_serialized"))})
    return [(kernel, cfg, A._dtype_class(dtype), tuple(blocks), kind, cap) for cap in bad_caps], errors


def spill_table_configs(dtype_class: str) -> dict:
    """``{kernel: [config, ...]}``: what `spill_table` compiles for a dtype class ("16bit", "fp32"):
    every config of every preference list and, for the fitted kernels, each one fitted to a short
    query side and to a short sequence (`attention_configs.fit_config`)."""
    from . import attention as A
    from . import attention_configs as C

    fwd = A._FWD_PREFS[(dtype_class, "short")] + A._FWD_PREFS[(dtype_class, "long")]
    configs = {"_attn_fwd": fwd, "_attn_bwd_dkdv": A._DKDV_PREFS[dtype_class], "_attn_bwd_dq": A._DQ_PREFS[dtype_class],
               "_attn_bwd_onepass": A._ONEPASS_PREFS[dtype_class]}
    return {kernel: C._fitted_candidates(list(dict.fromkeys(cfgs)), kernel, C.FIT_BLOCK, C.FIT_BLOCK)
            for kernel, cfgs in configs.items()}


def spill_table(capabilities: Iterable[int] = (80, 90), workers: int = 2) -> tuple[set, list]:
    """Regenerates `spill_table.PRUNED`: every config of every preference list (per kernel, dtype
    class, head blocks and bias kind) whose default variant spills, serialises wgmma (C7515) or fails
    on some capability.
    Every config is compiled, not just those up to the heuristic's pick, so that
    `attention.candidate_configs` (the configs a tuner times) are all spill-free. bf16 stands for the
    16-bit class (fp16 compiles to the same register allocation). Returns (the table, the rows of
    compiles that failed)."""
    from . import attention as A
    from . import varlen

    jobs = []
    for dtype_name in ("bfloat16", "float32"):
        dtype_class = "fp32" if dtype_name == "float32" else "16bit"
        for kernel, cfgs in spill_table_configs(dtype_class).items():
            for cfg, blocks, kind in itertools.product(cfgs, A.HEAD_BLOCKS, A.BIAS_KINDS):
                jobs.append((kernel, cfg, dtype_name, blocks, kind, tuple(capabilities)))
        for kernel, cfgs in varlen.spill_table_configs(dtype_class).items():  # no bias: kind "none" only
            for cfg, blocks in itertools.product(cfgs, A.HEAD_BLOCKS):
                jobs.append((kernel, cfg, dtype_name, blocks, "none", tuple(capabilities)))
    with _compile_pool(workers) as pool:
        results = list(pool.map(_check_config, jobs))
    return {key for keys, _ in results for key in keys}, [row for _, rows in results for row in rows]


@contextlib.contextmanager
def _compile_pool(workers: int):
    """Spawned workers that compile instead of interpret: TRITON_INTERPRET=0 in the environment
    they inherit and again in their initializer (before they import the kernels)."""
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_worker_init) as pool:
            yield pool
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def format_report(rows: list[dict]) -> str:
    """A plain-text table, one line per compile, and a summary. ``ser``: wgmma serialised (C7515);
    ``loop``: the main loop's tensor-core / all instructions; ``ld``: global loads by width."""
    lines = [f"{'kernel':<22} {'cap':>3} {'dtype':<5} {'M':>4} {'N':>4} {'D':>4} {'Dv':>4} {'w':>2} {'s':>2} "
             f"{'regs':>5} {'spill':>6} {'smem KiB':>9} {'ser':>3} {'loop mma/all':>12} {'ld':<14} variant / status"]
    for r in rows:
        c = r["config"]
        status = c.get("variant", "") if r["ok"] else f"FAILED {r['error']}"
        smem = "-" if r["shared_mem_bytes"] is None else f"{r['shared_mem_bytes'] / 1024:.1f}"
        loop = f"{_num(r.get('loop_mma'))}/{_num(r.get('loop_instructions'))}"
        loads = " ".join(f"{w}:{n}" for w, n in (r.get("loads") or {}).items()) or "-"
        lines.append(f"{r['kernel']:<22} {r['capability']:>3} {c['dtype']:<5} {c.get('BLOCK_M', '-'):>4} "
                     f"{c.get('BLOCK_N', '-'):>4} {c.get('BLOCK_D', '-'):>4} {c.get('BLOCK_DV', '-'):>4} "
                     f"{c['num_warps']:>2} {c['num_stages']:>2} {_num(r['registers']):>5} {_num(r['spills']):>6} "
                     f"{smem:>9} {'YES' if r.get('wgmma_serialized') else '-':>3} {loop:>12} {loads:<14} {status}")
    lines.append(summary(rows))
    return "\n".join(lines)


def check_failures(rows: list[dict]) -> list[str]:
    """What ``--check`` fails on, one line per compile: a failed compile, any spill, serialised wgmma."""
    bad = []
    for r in rows:
        what = [f"failed: {r['error']}"] if not r["ok"] else []
        if r["ok"] and r["spills"]:
            what.append(f"{r['spills']} bytes of spills")
        if r.get("wgmma_serialized"):
            what.append("wgmma serialised (C7515)")
        if what:
            c = r["config"] if isinstance(r.get("config"), dict) else {"variant": str(r.get("config", ""))}
            tile = f"{c.get('BLOCK_M', '-')}x{c.get('BLOCK_N', '-')} d{c.get('BLOCK_D', '-')}x{c.get('BLOCK_DV', '-')}"
            bad.append(f"{r['kernel']} sm_{r['capability']} {c.get('dtype', '-')} {tile} w{c.get('num_warps', '-')} "
                       f"s{c.get('num_stages', '-')} "
                       f"{c.get('variant', '')}: {'; '.join(what)}")
    return bad


def _num(x) -> str:
    return "-" if x is None else str(x)


def summary(rows: list[dict]) -> str:
    ok = [r for r in rows if r["ok"]]
    failed = len(rows) - len(ok)
    spilled = [r for r in ok if r["spills"]]
    serialized = [r for r in ok if r.get("wgmma_serialized")]
    max_regs = max((r["registers"] for r in ok), default=0)
    max_smem = max((r["shared_mem_bytes"] for r in ok), default=0)
    return (f"{len(ok)} compiled, {failed} failed; max registers {max_regs}, "
            f"max shared memory {max_smem / 1024:.1f} KiB, {len(spilled)} with spills, "
            f"{len(serialized)} with serialised wgmma (C7515)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--capabilities", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--full", action="store_true", help="all bias subsets x EVEN_* variants (slow)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any failed compile, any spill or any serialised wgmma (C7515)")
    parser.add_argument("--spill-table", action="store_true",
                        help="print spill_table.PRUNED regenerated from the preference lists, then exit")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.spill_table:
        pruned, errors = spill_table(args.capabilities, args.workers)
        print("PRUNED = frozenset({")
        for kernel, cfg, cls, blocks, kind, cap in sorted(pruned):
            print(f"    ({kernel!r}, Config{tuple(cfg)}, {cls!r}, {blocks}, {kind!r}, {cap}),")
        print("})")
        print(f"# {len(pruned)} entries, {time.perf_counter() - start:.0f} s")
        for row in errors:
            print(f"# FAILED {row['kernel']} {row['config']} sm_{row['capability']}: {row['error']}")
        return 1 if errors else 0
    rows = compile_report(args.capabilities, full=args.full, workers=args.workers)
    print(format_report(rows))
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check:
        bad = check_failures(rows)
        for line in bad:
            print(f"CHECK {line}")
        print(f"check: {len(bad)} of {len(rows)} compiles fail it")
        return 1 if bad else 0
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
