"""Every variant the launchers can launch, as compile specs for the ahead-of-time report.

A variant is a (kernel, config, dtype, head blocks) with its constexpr switches (bias kind,
EVEN_* masks, STORE_DS, TF32) and the run-time specialisation Triton would give a typical ViT call
(``divisible_by_16``). ``iter_compile_specs()`` lists the ones the heuristics pick (the default AOT
report); ``full=True`` every specialisation; ``include_pruned=True`` every config of the preference
lists (to regenerate ``spill_table.py``).
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator, Optional

import torch

from . import attention_configs as _configs
from .attention import (
    _DKDV_PREFS,
    _DQ_PREFS,
    _DTYPE_CODES,
    _FWD_PREFS,
    _ONEPASS_PREFS,
    _PREPROCESS_CONFIG,
    BIAS_KINDS,
    HEAD_BLOCKS,
    KERNELS,
    SPILL_CAPABILITIES,
    SUPPORTED_DTYPES,
    _cls_config,
    _dtype_class,
    load_tuned,
    tl,
)
from .configs import CompileSpec, Config

__all__ = ["kernel_signature", "divisible_by_16", "tile_spec", "iter_compile_specs", "REPORT_DTYPES"]



# Pointer arguments by name -> element type; "in" is the input dtype. Other non-constexpr arguments
# are i32, except the two scales.
_POINTER_TYPES = {
    "Q": "in", "K": "in", "V": "in", "Out": "in", "DOut": "in", "DQ": "in", "DK": "in", "DV": "in",
    "Probs": "in", "DenseBias": "in", "Bias": "in", "Lse": "fp32", "Lse2": "fp32", "Delta": "fp32", "DS": "fp32",
    "DQAcc": "fp32", "RelTable": "fp32", "RelIndex": "i32", "KeyPad": "u8",
    "CuQ": "i32", "CuK": "i32", "QBlocks": "i32", "KBlocks": "i32",  # the variable-length family's layout
}
_FLOAT_ARGS = ("qk_scale", "inv_scale", "scale")



def _kernel_params(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) for each parameter, from the Python signature of the jit function."""
    import inspect

    fn = getattr(kernel, "fn", kernel)
    params = []
    for name, p in inspect.signature(fn).parameters.items():
        ann = p.annotation
        params.append((name, ann is tl.constexpr or "constexpr" in str(ann)))
    return params


def kernel_signature(kernel, dtype: torch.dtype) -> dict:
    """The ``triton.compile`` signature of ``kernel`` for inputs of ``dtype``."""
    code = _DTYPE_CODES[dtype]
    sig = {}
    for name, is_constexpr in _kernel_params(kernel):
        if is_constexpr:
            sig[name] = "constexpr"
        elif name in _POINTER_TYPES:
            t = _POINTER_TYPES[name]
            sig[name] = "*" + (code if t == "in" else t)
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


# How triton specialises a call at run time, mirrored ahead of time so that the report compiles the
# code the launchers really run: an integer argument divisible by 16 gets a divisibility hint (and 1
# becomes a constant), which is what lets the compiler vectorise and pipeline loads. Each report row
# is the specialisation of a typical ViT-family call with that row's switches:
#   - pointers (torch allocations are aligned), the strides of q, k, v, out and their gradients
#     (multiples of a head dim of 16, 32, 48, 64, 80, ...), D and Dv: divisible by 16;
#   - Nq divisible only in EVEN_M variants, Nk only in EVEN_N ones (N = 197 or 49 is not);
#   - the bias row strides (Nk: stride_im, stride_dm, stride_pb) follow Nk; the head stride of a dense
#     bias (Nq * Nk) is divisible when either is; the batch stride is 0 (the expanded table, broadcast);
#   - the dS buffer is padded to block multiples: its strides are always divisible, and so is the
#     padded query count of the one-pass backward's scratch (Nq_pad);
#   - the table's row stride (T) and H are not (T = 169, H = 12).
# Calls with other strides (a head dim of 8 or 24, a strided bias) compile another specialisation at
# run time; ``Nq = 1`` (class attention) makes Nq a constant in another one.
_ALIGNED_STRIDE_PREFIXES = ("stride_q", "stride_k", "stride_v", "stride_o", "stride_do", "stride_dq", "stride_dk",
                            "stride_dv", "stride_s")


def divisible_by_16(kernel, constexprs: Optional[dict] = None, aligned_bias: bool = False) -> list[str]:
    """The arguments the AOT compile of one variant (``constexprs``) declares divisible by 16;
    ``aligned_bias`` (or the BIAS_PADDED switch): the dense bias is the launcher's expanded table,
    whose rows are padded to 64 elements."""
    c = constexprs or {}
    even_m, even_n = bool(c.get("EVEN_M")), bool(c.get("EVEN_N"))
    aligned = aligned_bias or bool(c.get("BIAS_PADDED"))
    conditional = {"Nq": even_m, "Nk": even_n, "stride_im": even_n, "stride_dm": even_n or aligned,
                   "stride_pb": even_n, "stride_dh": even_m or even_n or aligned, "stride_db": True, "D": True,
                   "Dv": True, "Nq_pad": True}
    names = []
    for name, is_constexpr in _kernel_params(kernel):
        if is_constexpr:
            continue
        if name in _POINTER_TYPES or name.startswith(_ALIGNED_STRIDE_PREFIXES) or conditional.get(name, False):
            names.append(name)
    return names


_BIASES = ("HAS_REL", "HAS_DENSE", "HAS_PAD")
_EVENS = ("EVEN_M", "EVEN_N", "EVEN_D")
# The bias switches compiled for each kind by default: the variant with the most code of that kind.
_KIND_SWITCHES = {"none": (False, False, False), "dense": (False, True, True), "gather": (True, True, True)}


def _variants(biased, full: bool, even_plain: bool = True) -> list[dict]:
    """Bias and mask switches compiled for one config; ``biased``: a bias kind (or a bool: "dense"/"none").

    Default: the kind's variant with the most code and the split loop's masked tail on both sides
    (EVEN_M = EVEN_N = False: the ViT sizes 49, 50, 197 are never block multiples) with the head
    dim a block size (EVEN_D: D = 16, 32, 64, 128); with ``even_plain`` also the unbiased mask-free
    variant of aligned shapes. D = 48 or 80 (EVEN_D False) only adds masks to the q/k/v tile loads
    and stores; ``full`` compiles it, with every bias subset of the kind times every EVEN_* combination.
    """
    kind = biased if isinstance(biased, str) else ("dense" if biased else "none")
    if full:
        subsets = [s for s in itertools.product((False, True), repeat=3)
                   if (kind == "none" and not any(s)) or (kind == "gather" and s[0])
                   or (kind == "dense" and not s[0] and any(s))]
        evens = list(itertools.product((False, True), repeat=3))
    else:
        subsets = [_KIND_SWITCHES[kind]]
        evens = [(False, False, True)] + ([(True, True, True)] if even_plain and kind == "none" else [])
    return [dict(zip(_EVENS, e), **dict(zip(_BIASES, s))) for s in subsets for e in evens]


# The kernels that write dS (the bias gradient) when a bias takes one: STORE_DS is one of their switches.
_DS_KERNELS = ("_attn_bwd_dq", "_attn_bwd_onepass")


def _ds_variants(flags: dict, full: bool) -> list[dict]:
    """dQ (or the one-pass backward) stores dS when a bias takes a gradient (by default: the biased
    variant does)."""
    if not (flags["HAS_REL"] or flags["HAS_DENSE"]):
        return [dict(STORE_DS=False)]
    return [dict(STORE_DS=False), dict(STORE_DS=True)] if full else [dict(STORE_DS=True)]


def _onepass_bias_variants(flags: dict, extras: list, dtype: torch.dtype) -> list:
    """The one-pass backward's dense-bias row layouts: the launcher's expanded table (16-bit: rows
    padded, BIAS_PADDED, no column clamp) and a caller's dense bias (clamped columns), both launchable."""
    if not (flags["HAS_DENSE"] and not flags["HAS_REL"]):
        return extras
    if dtype == torch.float32:  # the launcher pads only 16-bit tables
        return [dict(e, BIAS_PADDED=False) for e in extras]
    return [dict(e, BIAS_PADDED=p) for e in extras for p in (True, False)]


def _may_read_padded_table(flags: dict, dtype: torch.dtype) -> bool:
    """A variant whose dense bias may be the launcher's expanded relative-position table with rows
    padded to 64 elements (16-bit only), so its row stride is aligned whatever Nk: a dense bias, no
    gathered table, uneven keys."""
    return dtype != torch.float32 and bool(flags["HAS_DENSE"]) and not flags["HAS_REL"] and not flags["EVEN_N"]


def _launchable(pref_lists, kernel, dtype, blocks, kind, include_pruned) -> dict:
    """``{config: capabilities}``: the configs the heuristic picks from each preference list (pairs of
    a list and the longest side it serves) on each spill-table capability and, for a fitted kernel,
    at each short side (or all of them, fitted too, for every capability), in order."""
    picked: dict = {}
    fit = _configs.FIT_BLOCK
    for prefs, length in pref_lists:
        # a fitted kernel picks per sequence length (`attention_configs.fit_config`): a pick per short
        # side, at the lengths this list serves (the forward's lists are per query bucket)
        shapes = [(None, None)] if kernel not in _configs.FITTED_KERNELS else [
            (nq, nk) for nq, nk in ((length, length), (fit, length), (fit, fit))
            if kernel != "_attn_fwd" or _configs._prefs(kernel, dtype, nq) is prefs]
        # None: no device capability known (the interpreter, `launch_plan` without one) picks a config
        # clean on every capability, which may be neither capability's own pick
        for cap, (nq, nk) in itertools.product((*SPILL_CAPABILITIES, None), shapes):
            caps = SPILL_CAPABILITIES if cap is None else (cap,)
            capability = None if cap is None else (cap // 10, 0)
            if include_pruned:  # every config, and each one fitted to the shape
                configs = _configs._fitted_candidates(prefs, kernel, nq, nk)
            else:
                cfg = _configs._kept_pick(prefs, kernel, dtype, blocks, kind, capability, nq, nk)
                # no clean config: the one pass gives way to the three passes; without a capability
                # only the interpreter launches the last resort
                if cfg is None and (kernel == "_attn_bwd_onepass" or cap is None):
                    continue
                configs = [prefs[-1] if cfg is None else cfg]
            for cfg in configs:
                picked.setdefault(cfg, [])
                picked[cfg] += [c for c in caps if c not in picked[cfg]]
    return picked


def _tuned_configs(kernel: str, dtype: torch.dtype, blocks: tuple[int, int], kind: str) -> list[Config]:
    """The configs that tuned tables under ``attention_configs.TUNED_DIR`` (read at call time) give this
    (kernel, dtype class, blocks, kind)."""
    import glob

    cls = _dtype_class(dtype)
    prefix = f"{kernel}|{cls}|d{blocks[0]}x{blocks[1]}|{kind}|"
    found = []
    for path in sorted(glob.glob(os.path.join(_configs.TUNED_DIR, "*.json"))):
        try:
            entries = load_tuned(path)["entries"]
        except ValueError:
            continue  # the launchers ignore it too (with a warning)
        found += [cfg for key, cfg in sorted(entries.items()) if key.startswith(prefix) and cfg not in found]
    return found


def tile_spec(kernel: str, cfg: Config, dtype: torch.dtype, blocks: tuple[int, int], switches: dict,
              tf32: bool = False) -> CompileSpec:
    """The spec of one of the tiled kernels (forward, dK/dV, dQ, one-pass backward) with the given switches
    (EVEN_*, HAS_*, STORE_DS)."""
    fn = KERNELS[kernel]
    if kernel == "_attn_bwd_onepass":  # by default dS summed over the batch in-kernel (a batch-free bias),
        switches = dict(switches)
        switches.setdefault("BATCH_SUM", bool(switches.get("STORE_DS")))
        # a dense bias without a gathered table: by default the launcher's expanded table (rows padded)
        switches.setdefault("BIAS_PADDED", bool(switches.get("HAS_DENSE")) and not switches.get("HAS_REL")
                            and dtype != torch.float32)
    return CompileSpec(kernel, cfg, kernel_signature(fn, dtype), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=blocks[0], BLOCK_DV=blocks[1], **switches,
        FP32_IEEE=dtype == torch.float32 and not tf32, UPCAST_DOT=False))


# The default report compiles bf16 for the 16-bit class: fp16 launches the same configs (one
# dtype class in the preference lists and the spill table) and compiles to the same register
# allocation but for rare exceptions, which `PRUNED` lists; ``full=True`` compiles fp16 too.
REPORT_DTYPES = (torch.float32, torch.bfloat16)


def iter_compile_specs(*, full: bool = False, include_pruned: bool = False, dtypes=None,
                       head_blocks=HEAD_BLOCKS) -> Iterator[CompileSpec]:
    """Every (kernel, config, signature, constexprs) the launchers may launch.

    By default: every (kernel, config, dtype class, head blocks) the launchers can launch -- over
    fp32 and bf16 (`REPORT_DTYPES`; ``dtypes`` overrides), head-block pairs, the three bias kinds
    ("none", "dense", "gather"), the config the heuristics pick for each query bucket on each
    capability (a spec's ``capabilities``) and any config a tuned table under ``kernels/tuned/`` names
    -- each with the switch variants of `_variants` (the split loop's masked tail compiled in; about
    210 specs, ~340 compiles for sm_80 + sm_90a). ``full=True`` lists every specialisation the
    launchers can launch: fp16 too, every bias subset and EVEN_* combination, and the TF32 variants of
    fp32 (several thousand compiles). ``include_pruned=True`` lists every config of the preference
    lists instead of the picked ones (to regenerate the spill table).
    """
    if dtypes is None:
        dtypes = SUPPORTED_DTYPES if full else REPORT_DTYPES

    for dtype, blocks in itertools.product(dtypes, head_blocks):
        cls = _dtype_class(dtype)
        sig = {name: kernel_signature(KERNELS[name], dtype) for name in ("_attn_cls_probs", "_attn_bwd_preprocess")}
        tf32s = (False, True) if full and dtype == torch.float32 else (False,)
        for kind in BIAS_KINDS:
            # (preference list, the longest side it serves)
            fwd_prefs = [(_FWD_PREFS[(cls, "short")], 128), (_FWD_PREFS[(cls, "long")], 256)]
            for kernel, pref_lists in (("_attn_fwd", fwd_prefs), ("_attn_bwd_dkdv", [(_DKDV_PREFS[cls], None)]),
                                       ("_attn_bwd_dq", [(_DQ_PREFS[cls], None)]),
                                       ("_attn_bwd_onepass", [(_ONEPASS_PREFS[cls], 256)])):
                configs = _launchable(pref_lists, kernel, dtype, blocks, kind, include_pruned)
                for cfg in _tuned_configs(kernel, dtype, blocks, kind):
                    configs[cfg] = list(SPILL_CAPABILITIES)  # a tuned config: compile it everywhere
                for cfg, caps in configs.items():
                    caps = () if len(caps) == len(SPILL_CAPABILITIES) else tuple(caps)
                    # the mask-free forward is the one aligned-shape variant worth its compile time
                    for flags in _variants(kind, full, even_plain=kernel == "_attn_fwd"):
                        extras = _ds_variants(flags, full) if kernel in _DS_KERNELS else [{}]
                        if kernel == "_attn_bwd_onepass":
                            if full:  # dS per batch element or summed
                                extras = [dict(e, BATCH_SUM=b) for e in extras
                                          for b in ((False, True) if e["STORE_DS"] else (False,))]
                            extras = _onepass_bias_variants(flags, extras, dtype)
                        for extra, tf32 in itertools.product(extras, tf32s):
                            spec = tile_spec(kernel, cfg, dtype, blocks, dict(flags, **extra), tf32=tf32)._replace(
                                capabilities=caps)
                            yield spec
                            if kernel == "_attn_fwd" and _may_read_padded_table(flags, dtype):  # aligned rows
                                yield spec._replace(divisible=tuple(divisible_by_16(KERNELS[kernel], spec.constexprs,
                                                                                    aligned_bias=True)))
            # The CLS-row and preprocess kernels see one head width: one set per distinct width.
            if blocks[0] == blocks[1]:
                for flags in _variants(kind, full, even_plain=False):
                    flags = {k: v for k, v in flags.items() if k != "EVEN_M"}
                    cls_cfg = _cls_config(blocks[0])
                    yield CompileSpec("_attn_cls_probs", cls_cfg, sig["_attn_cls_probs"],
                                      dict(BLOCK_N=cls_cfg.block_n, BLOCK_D=blocks[0], **flags))
        if blocks[0] == blocks[1]:
            evens = list(itertools.product((False, True), repeat=2)) if full else [(False, True), (True, True)]
            for even_m, even_d in evens:
                yield CompileSpec("_attn_bwd_preprocess", _PREPROCESS_CONFIG, sig["_attn_bwd_preprocess"],
                                  dict(BLOCK_M=_PREPROCESS_CONFIG.block_m, BLOCK_DV=blocks[1],
                                       EVEN_M=even_m, EVEN_D=even_d))


