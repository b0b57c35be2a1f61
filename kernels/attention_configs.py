"""Config choice of the attention family: head blocks, preference lists, the spill table's pruning,
tuned tables (``kernels/tuned/<device>.json``), forced configs, and the launch plan of a shape."""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import warnings
from typing import NamedTuple, Optional

import torch

from .configs import Config
from .spill_table import SPILL_CAPABILITIES, pruned_for
from .triton_compat import TRITON_VERSION

PRUNED = pruned_for(TRITON_VERSION)  # the spill table of the triton in use

# The forward's launch specs per key (kernels/attention.py `_fwd_spec`), forgotten with the tuned tables.
_FWD_SPECS: dict = {}  # launch key -> (Config, constexprs, head blocks); see _fwd_spec


# Head blocks: (BLOCK_D, BLOCK_DV). D and Dv are padded to a power of two >= 16 (tl.dot needs 16),
# and a pair that is not listed is widened to (max, max): that keeps the variant count (and the AOT
# report) bounded. LeViT is why a D != Dv pair exists: (32, 64) is vit-pytorch's default. The paper's
# (16, 64) runs as (64, 64): masked loads read no padding from memory, the wasted QK^T columns cost
# compute only, and LeViT's small heads are memory-bound.
HEAD_BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (32, 64))
_DTYPE_CODES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# The kernels whose configs are chosen per shape (and may be tuned); the CLS-row and preprocess
# kernels have one fixed config each.
TUNABLE_KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")

# Bias kinds, which select both the compiled variant and the config:
#   "none":   no bias;
#   "dense":  a dense bias tile read per logit (a dense bias, a relative-position table expanded
#             once per call, see REL_BIAS_PRECOMPUTE_MAX_LOGITS) and/or key padding;
#   "gather": the relative-position table gathered in-kernel from ``[H, T]`` (large Nq * Nk).
BIAS_KINDS = ("none", "dense", "gather")

# A relative-position table is expanded once per call to a ``[1, H, Nq, Nk]`` bias in the compute
# dtype (a torch gather) and read like a dense bias when ``Nq * Nk`` is at most this: the kernels
# then read one coalesced 16-bit tile per logit instead of an int32 index tile plus a dependent,
# uncoalesced table gather, and the biased kernels hold one pointer tile fewer (item: register
# pressure). Above it (``2**18`` logits = N of 512; 12 heads: 6 MB of bf16), the table is gathered
# in-kernel from its ``[H, T]`` transpose. A tuned table may refine it (``"rel_bias_precompute_max_logits"``).
REL_BIAS_PRECOMPUTE_MAX_LOGITS = 1 << 18


# The bias gradients (rel_table, dense_bias) are bitwise reproducible run to run: no atomics, fixed
# reduction orders (see the module docstring). The triton backend reads this flag.
DETERMINISTIC_BIAS_GRADS = True

# Preference lists, tried in order; the first that `keep()` accepts is launched (unless a tuned
# table or `forced_configs` says otherwise). Keys: the kernel, the dtype class (fp32 tiles take twice
# the registers, and its IEEE matmuls run on CUDA cores) and, for the forward, a query bucket
# ("short": Nq <= 128, "long") -- so each (kernel, dtype, head blocks, bias kind) launches at most
# two forward configs and one per backward kernel, plus the tiles fitted to short sequences
# (`fit_config`: class attention's one query runs in a 16-row tile). 8-warp entries are the
# fallbacks for biased calls: half the registers per thread for the same tile.
_FWD_PREFS = {
    ("16bit", "short"): (Config(64, 64, 4, 2), Config(64, 64, 8, 2), Config(64, 32, 4, 2), Config(64, 32, 8, 2),
                         Config(32, 32, 4, 2)),
    ("16bit", "long"): (Config(128, 64, 4, 3), Config(128, 64, 8, 3), Config(64, 64, 4, 2), Config(64, 64, 8, 2),
                        Config(64, 32, 4, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 2)),
    ("fp32", "short"): (Config(32, 32, 4, 2), Config(32, 32, 8, 2), Config(16, 32, 4, 2), Config(16, 16, 4, 2),
                        Config(16, 16, 4, 1)),
    ("fp32", "long"): (Config(64, 32, 4, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 2), Config(32, 32, 8, 2),
                       Config(16, 32, 4, 2), Config(16, 16, 4, 2), Config(16, 16, 4, 1)),
}
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per step; dQ: BLOCK_M queries per program.
# The 8-warp, 1-stage entries keep 64 keys per dK/dV program and 64 queries per dQ program where
# sm_80 (mma.sync) spills the larger ones with a bias (sm_90a's wgmma fits 64x64 with 4 warps).
_DKDV_PREFS = {"16bit": (Config(64, 64, 4, 2), Config(64, 64, 8, 2), Config(32, 64, 4, 2), Config(32, 64, 8, 1),
                         Config(32, 32, 4, 2)),
               "fp32": (Config(32, 32, 4, 2), Config(32, 32, 8, 2), Config(16, 32, 4, 2), Config(16, 16, 4, 1))}
_DQ_PREFS = {"16bit": (Config(64, 64, 4, 2), Config(64, 64, 8, 2), Config(64, 32, 4, 2), Config(64, 32, 8, 1),
                       Config(32, 32, 4, 2), Config(32, 32, 8, 1)),
             "fp32": (Config(32, 32, 4, 2), Config(32, 32, 8, 2), Config(32, 16, 4, 2), Config(16, 16, 2, 1),
                      Config(16, 16, 4, 1))}


# The one-pass backward (kernels/attention_bwd_onepass.py): BLOCK_N keys per outer iteration, BLOCK_M
# queries per inner step, one program per (batch, head). It holds the dK/dV kernel's tiles plus a
# [BLOCK_M, BLOCK_D] fp32 dQ product per step, so 4 warps spill where dK/dV's do not: 8 warps first
# (sm_90a: 64 x 64 at up to 253 registers, no spills), then smaller tiles (sm_80 with a bias).
_ONEPASS_PREFS = {"16bit": (Config(64, 64, 8, 2), Config(64, 64, 8, 1), Config(32, 64, 8, 1), Config(32, 64, 4, 1),
                            Config(32, 32, 4, 1)),
                  "fp32": (Config(32, 32, 8, 2), Config(32, 32, 8, 1), Config(16, 32, 8, 1), Config(16, 32, 4, 1),
                           Config(16, 16, 4, 1))}


def onepass_max_n(block_d: int) -> int:
    """The longest Nq and Nk the one-pass backward serves at head block ``block_d``: 256, and 128 at
    ``BLOCK_D = 128``.

    The bound is the dQ accumulator's size: each program owns an fp32 ``[Nq_pad, BLOCK_D]`` scratch
    that it reads and writes once per key block, which must stay in L2 for every resident program
    (at most 64 KiB each: 132 SMs x 2 programs x 64 KiB = 17 MB of an H100's 50 MB; ``Nq_pad *
    BLOCK_D <= 2**14``), and the parallelism: one program per (batch, head) does ``Nk / BLOCK_N``
    times the serial work of a three-pass dK/dV program, so for long sequences (few, long programs)
    the three-pass grid wins. Both give 256 tokens up to head dim 64 (ViT at 224 px: 197; Swin
    windows: 49; LeViT: 196, 49, 16) and 128 at head dim 128."""
    return min(256, (1 << 14) // block_d)


# Which backward the launcher runs: "auto" (the one-pass kernel where `onepass_max_n` and the spill
# table allow, else the three passes), or one of them by name (tests, timing). See `backward_path`.
BACKWARD_PATHS = ("auto", "onepass", "threepass")
_BWD_PATH: contextvars.ContextVar = contextvars.ContextVar("fastvit_kernels_backward_path", default="auto")


@contextlib.contextmanager
def backward_path(path: str):
    """Makes `attention_bwd` run ``"onepass"`` (raises ValueError for a call it cannot serve),
    ``"threepass"`` or ``"auto"`` (the default) inside the block."""
    if path not in BACKWARD_PATHS:
        raise ValueError(f"backward path {path!r}: expected one of {BACKWARD_PATHS}")
    token = _BWD_PATH.set(path)
    try:
        yield
    finally:
        _BWD_PATH.reset(token)


def _pick_onepass_config(nq: int, nk: int, head_blocks: tuple[int, int], dtype: torch.dtype, kind: str,
                         capability=None) -> Optional[Config]:
    """The one-pass backward's config for this call, or None when the three passes run: the sequence
    is longer than `onepass_max_n`, or every config of its preference list is in the spill table for
    this capability, or `backward_path("threepass")` is active, or `forced_configs` names a kernel of
    the three passes (timing it)."""
    path = _BWD_PATH.get()
    forced = _FORCED.get() or {}
    if path == "threepass" or (path == "auto" and ("_attn_bwd_dkdv" in forced or "_attn_bwd_dq" in forced)):
        return None
    limit = onepass_max_n(max(head_blocks))
    cfg = _kept_pick(_ONEPASS_PREFS[_dtype_class(dtype)], "_attn_bwd_onepass", dtype, head_blocks, kind, capability,
                     nq, nk)
    if nq > limit or nk > limit or cfg is None:
        if path == "onepass":
            why = (f"Nq={nq}, Nk={nk} > {limit}" if nq > limit or nk > limit
                   else "every config of its preference list spills or serialises wgmma here")
            raise ValueError(f"the one-pass backward cannot serve this call: {why}")
        return None
    return cfg


def _cls_config(block_d: int) -> Config:
    """The CLS-row kernel holds a (BLOCK_N, BLOCK_D) fp32 tile of K: 64 keys spill at BLOCK_D=128."""
    return Config(1, 64 if block_d <= 64 else 32, 4, 1)  # block_m is unused: one query row


_PREPROCESS_CONFIG = Config(64, 1, 4, 1)  # block_n is unused

# The spill table (`PRUNED`, generated data in kernels/spill_table.py): configs whose variant spills or
# fails to compile for sm_80 / sm_90a are skipped by `keep()`.


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


_ALLOW_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: bool(torch.backends.cuda.matmul.allow_tf32))


def _tf32(dtype: torch.dtype) -> bool:
    """fp32 inputs multiply in TF32 when torch allows it for matmuls (as cuBLAS would)."""
    return dtype == torch.float32 and bool(_ALLOW_TF32())


def _head_blocks(d: int, dv: int) -> tuple[int, int]:
    blocks = (max(16, triton_next_power_of_2(d)), max(16, triton_next_power_of_2(dv)))
    if blocks not in HEAD_BLOCKS:
        widest = max(blocks)
        blocks = (widest, widest)
    return blocks


def triton_next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _m_bucket(nq: int) -> str:
    return "short" if nq <= 128 else "long"


def _bias_kind(biased, nq: int, nk: int) -> str:
    """A bias kind from ``biased``: a kind by name, or a bool. True means what a relative-position
    table (or a dense bias) of this size runs as: "dense" up to the precompute threshold, "gather" above."""
    if isinstance(biased, str):
        if biased not in BIAS_KINDS:
            raise ValueError(f"biased={biased!r}: expected a bool or one of {BIAS_KINDS}")
        return biased
    if not biased:
        return "none"
    return "dense" if nq * nk <= rel_bias_precompute_max_logits() else "gather"


def _spill_caps(capability) -> tuple:
    """The spill-table capabilities that apply to a device capability ((major, minor), 80/90 or None)."""
    if capability is None:
        return SPILL_CAPABILITIES
    major = capability[0] if isinstance(capability, tuple) else int(capability) // 10
    return (90,) if major >= 9 else (80,)


def keep(cfg: Config, kernel: str, dtype: torch.dtype, head_blocks: tuple[int, int], biased,
         capability=None) -> bool:
    """Whether ``cfg`` may be launched for this kernel, dtype, head blocks and bias kind (``biased``: a
    kind, or a bool = "dense"/"none") on ``capability`` ((major, minor), or None: every capability):
    not in the spill table (``PRUNED``, from the AOT report)."""
    kind = biased if isinstance(biased, str) else ("dense" if biased else "none")
    key = (kernel, cfg, _dtype_class(dtype), tuple(head_blocks), kind)
    return not any(key + (cap,) in PRUNED for cap in _spill_caps(capability))


def _prefs(kernel: str, dtype: torch.dtype, nq: int) -> tuple:
    cls = _dtype_class(dtype)
    if kernel == "_attn_fwd":
        return _FWD_PREFS[(cls, _m_bucket(nq))]
    if kernel == "_attn_bwd_dkdv":
        return _DKDV_PREFS[cls]
    if kernel == "_attn_bwd_dq":
        return _DQ_PREFS[cls]
    raise ValueError(f"unknown kernel {kernel!r}: expected one of {TUNABLE_KERNELS}")


# Tiles that fit short sequences. A preference list's tiles are sized for ViT lengths; a side of at
# most FIT_BLOCK tokens (LeViT's last stage: 16 queries and keys; class attention: 1 query) runs in a
# FIT_BLOCK-wide tile instead, so a 16 x 16 attention does 16 x 16 work, not 64 x 64 (6% useful).
# Only the forward and the one-pass backward are fitted: they serve every short sequence (the three
# passes run only where a side exceeds `onepass_max_n`). Warps shrink with the tile (2 for 16 x 16:
# ptxas spills the one pass with 1 or 4 there), and a single key block has nothing to pipeline (one
# stage). A shape tries every config fitted to it, then fitted to its query side alone, then as
# listed (`_fitted_candidates`). Rarer shapes keep their list's tiles, as one more variant per config
# is not worth its compiles: sides of 17 to 32, and a short key side under a long query side.
FIT_BLOCK = 16
FITTED_KERNELS = ("_attn_fwd", "_attn_bwd_onepass")


def fit_config(cfg: Config, nq: int, nk: int) -> Config:
    """``cfg`` with at most `FIT_BLOCK` queries in a `FIT_BLOCK`-row tile (block_m), and then at most
    `FIT_BLOCK` keys in a `FIT_BLOCK`-wide one (block_n), in both fitted kernels; ``cfg`` itself otherwise."""
    block_m = FIT_BLOCK if nq <= FIT_BLOCK < cfg.block_m else cfg.block_m
    block_n = FIT_BLOCK if nq <= FIT_BLOCK and nk <= FIT_BLOCK < cfg.block_n else cfg.block_n
    if (block_m, block_n) == (cfg.block_m, cfg.block_n):
        return cfg
    warps = min(cfg.num_warps, max(2, block_m * block_n // 256))  # 16 x 64: 4 warps; 16 x 16: 2
    return Config(block_m, block_n, warps, 1 if block_n != cfg.block_n else cfg.num_stages)


def _fitted_candidates(prefs, kernel, nq=None, nk=None) -> list:
    """``prefs`` in the order a shape tries them: for a fitted kernel, every config fitted to
    ``nq`` x ``nk`` first, then fitted to the query side alone, then as listed."""
    if kernel not in FITTED_KERNELS or nq is None:
        return list(prefs)
    return list(dict.fromkeys([fit_config(c, nq, nk) for c in prefs] + [fit_config(c, nq, 1 << 30) for c in prefs]
                              + list(prefs)))


def _kept_pick(prefs, kernel, dtype, head_blocks, kind, capability=None, nq=None, nk=None) -> Optional[Config]:
    """The first of `_fitted_candidates` that the spill table keeps, or None."""
    return next((cfg for cfg in _fitted_candidates(prefs, kernel, nq, nk)
                 if keep(cfg, kernel, dtype, head_blocks, kind, capability)), None)


def _first_kept(prefs, kernel, dtype, head_blocks, kind, capability=None, nq=None, nk=None) -> Config:
    cfg = _kept_pick(prefs, kernel, dtype, head_blocks, kind, capability, nq, nk)
    return prefs[-1] if cfg is None else cfg  # the smallest tile is the last resort (in the report all the same)


# ---- tuned tables and forced configs ---------------------------------------------------------------
#
# A tuned table is a JSON file ``kernels/tuned/<device-slug>.json`` (``tuned_path``), written by
# ``fastvit tune`` on a GPU:
#
#     {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
#      "rel_bias_precompute_max_logits": 262144,                       (optional)
#      "entries": {"<tune_key>": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3,
#                                 "ms": 0.021}, ...}}
#
# ``tune_key`` buckets a call: kernel, dtype class ("16bit", "fp32" IEEE, "tf32"), head blocks, bias
# kind, and Nq and Nk rounded up to a power of two in [16, 8192] (e.g.
# ``_attn_fwd|16bit|d64x64|none|m256|n256`` for ViT-B/16). "ms" is informational. A launch looks its
# key up; no file or no entry means the heuristic above. A file that cannot be read or parsed is
# ignored with a warning (training must not stop over a stale tuning file); `load_tuned` called
# directly raises ValueError instead.

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
_TUNED_CACHE: dict = {}  # torch.device -> its table, or None (no table, or a bad one)
_FORCED: contextvars.ContextVar = contextvars.ContextVar("fastvit_kernels_forced_configs", default=None)


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def tuned_path(device=None) -> str:
    """The tuned-table path of ``device``: a device name, a ``torch.device``/index (CUDA: its name
    from ``torch.cuda.get_device_name``), or None (the current CUDA device, else "cpu")."""
    if isinstance(device, str) and not device.startswith(("cuda", "cpu")):
        name = device
    else:
        dev = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        if isinstance(device, int):
            dev = torch.device("cuda", device)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return os.path.join(TUNED_DIR, device_slug(name) + ".json")


def _pow2_bucket(n: int) -> int:
    return min(8192, max(16, triton_next_power_of_2(n)))


def tune_key(kernel: str, nq: int, nk: int, d: int, dv: int, dtype: torch.dtype, biased) -> str:
    """The tuned-table key of a call (``biased``: a bool or a bias kind, see `BIAS_KINDS`)."""
    if kernel not in TUNABLE_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {TUNABLE_KERNELS}")
    cls = "tf32" if _tf32(dtype) else _dtype_class(dtype)
    bd, bdv = _head_blocks(d, dv)
    return f"{kernel}|{cls}|d{bd}x{bdv}|{_bias_kind(biased, nq, nk)}|m{_pow2_bucket(nq)}|n{_pow2_bucket(nk)}"


_POW2_BLOCKS = (16, 32, 64, 128, 256)


def _parse_config(key: str, entry) -> Config:
    if not isinstance(entry, dict):
        raise ValueError(f"entry {key!r} must be an object, got {type(entry).__name__}")
    try:
        cfg = Config(*(int(entry[f]) for f in Config._fields))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"entry {key!r} needs integer {', '.join(Config._fields)}: {e}") from None
    if (cfg.block_m not in _POW2_BLOCKS or cfg.block_n not in _POW2_BLOCKS or cfg.num_warps not in (1, 2, 4, 8, 16)
            or not 1 <= cfg.num_stages <= 8):
        raise ValueError(f"entry {key!r}: {cfg} is not a valid config (blocks 16..256, powers of two)")
    return cfg


def load_tuned(path: Optional[str] = None) -> dict:
    """Reads a tuned table (default: this process's device, `tuned_path()`).

    Returns:
        ``{"device", "triton", "rel_bias_precompute_max_logits" (or None), "entries": {key: Config}}``;
        an empty table when the file does not exist.

    Raises:
        ValueError: the file is not valid JSON or not in the documented format.
    """
    path = tuned_path() if path is None else path
    if not os.path.exists(path):
        return {"device": None, "triton": None, "rel_bias_precompute_max_logits": None, "entries": {}}
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tuned table {path}: cannot read it as JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict):
        raise ValueError(f"tuned table {path}: expected an object with an \"entries\" object")
    threshold = raw.get("rel_bias_precompute_max_logits")
    if threshold is not None and (not isinstance(threshold, int) or threshold < 0):
        raise ValueError(f"tuned table {path}: rel_bias_precompute_max_logits must be a non-negative int")
    entries = {}
    for key, entry in raw["entries"].items():
        if key.split("|")[0] not in TUNABLE_KERNELS:
            raise ValueError(f"tuned table {path}: key {key!r} does not start with one of {TUNABLE_KERNELS}")
        try:
            entries[key] = _parse_config(key, entry)
        except ValueError as e:
            raise ValueError(f"tuned table {path}: {e}") from None
    return {"device": raw.get("device"), "triton": raw.get("triton"),
            "rel_bias_precompute_max_logits": threshold, "entries": entries}


def _tuned_table(device: torch.device) -> Optional[dict]:
    """The tuned table of ``device``, read once per process and device (no file system access per call;
    ``reload_tuned()`` forgets it); None when absent or bad (warned once)."""
    try:
        return _TUNED_CACHE[device]
    except KeyError:
        pass
    path = tuned_path(device)
    table = None
    if os.path.exists(path):
        try:
            table = load_tuned(path)
        except ValueError as e:
            warnings.warn(f"{e}; ignoring it and using the built-in configs", RuntimeWarning, stacklevel=3)
    _TUNED_CACHE[device] = table
    return table


def reload_tuned() -> None:
    """Read the tuned tables again at the next launch (``fastvit tune`` calls this after writing one)."""
    _TUNED_CACHE.clear()
    _FWD_SPECS.clear()


def rel_bias_precompute_max_logits(device: Optional[torch.device] = None) -> int:
    """The precompute threshold in use: the tuned table's, else `REL_BIAS_PRECOMPUTE_MAX_LOGITS`."""
    table = _tuned_table(device) if device is not None else None
    if table is not None and table["rel_bias_precompute_max_logits"] is not None:
        return table["rel_bias_precompute_max_logits"]
    return REL_BIAS_PRECOMPUTE_MAX_LOGITS


@contextlib.contextmanager
def forced_configs(configs: dict):
    """Makes the launchers use the given configs, e.g. ``{"_attn_fwd": Config(128, 64, 4, 3)}``
    (for timing candidates); kernels not named keep their usual choice. Not checked against the
    spill table: pass configs from `candidate_configs`."""
    for kernel, cfg in configs.items():
        if kernel not in TUNABLE_KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: expected one of {TUNABLE_KERNELS}")
        if not isinstance(cfg, Config):
            raise ValueError(f"{kernel}: expected a Config, got {cfg!r}")
    token = _FORCED.set({**(_FORCED.get() or {}), **configs})
    try:
        yield
    finally:
        _FORCED.reset(token)


def candidate_configs(kernel: str, nq: int, nk: int, d: int, dv: int, dtype: torch.dtype, biased,
                      capability=None) -> list[Config]:
    """Every config worth timing for this call: the kernel's preference lists (both query buckets
    for the forward) without the ones the spill table prunes for ``capability`` ((major, minor);
    default: the current CUDA device's, else every capability); the heuristic's pick comes first."""
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    blocks = _head_blocks(d, dv)
    kind = _bias_kind(biased, nq, nk)
    picked = _first_kept(_prefs(kernel, dtype, nq), kernel, dtype, blocks, kind, capability, nq, nk)
    lists = ([_FWD_PREFS[(_dtype_class(dtype), b)] for b in ("short", "long")] if kernel == "_attn_fwd"
             else [_prefs(kernel, dtype, nq)])
    out = [picked]
    for prefs in lists:
        out += [c for c in _fitted_candidates(prefs, kernel, nq, nk)
                if c not in out and keep(c, kernel, dtype, blocks, kind, capability)]
    return out


def _pick_config(kernel: str, nq: int, nk: int, head_blocks: tuple[int, int], dtype: torch.dtype, kind: str,
                 device: Optional[torch.device], use_tuned: bool = True, capability=None) -> Config:
    """Forced config > tuned table entry (CUDA, or the CPU table under the interpreter) > heuristic
    (the first config of the preference list that the spill table keeps for the device's capability)."""
    forced = (_FORCED.get() or {}).get(kernel)
    if forced is not None:
        return forced
    if use_tuned and device is not None:
        table = _tuned_table(device)
        if table is not None:
            d, dv = head_blocks
            cfg = table["entries"].get(tune_key(kernel, nq, nk, d, dv, dtype, kind))
            if cfg is not None:
                return cfg
    if capability is None and device is not None:
        capability = _capability(device)
    return _first_kept(_prefs(kernel, dtype, nq), kernel, dtype, head_blocks, kind, capability, nq, nk)


def _pick_fwd_config(nq: int, nk: int, head_blocks: tuple[int, int], dtype: torch.dtype,
                     capability: Optional[tuple[int, int]] = None, biased=False,
                     device: Optional[torch.device] = None) -> Config:
    """The forward config, by query bucket, dtype class, head blocks and bias kind."""
    return _pick_config("_attn_fwd", nq, nk, head_blocks, dtype, _bias_kind(biased, nq, nk), device,
                        capability=capability)


def _pick_bwd_configs(nq: int, nk: int, head_blocks: tuple[int, int], dtype: torch.dtype,
                      capability: Optional[tuple[int, int]] = None, biased=False,
                      device: Optional[torch.device] = None) -> tuple[Config, Config]:
    """(dK/dV config, dQ config)."""
    kind = _bias_kind(biased, nq, nk)
    return (_pick_config("_attn_bwd_dkdv", nq, nk, head_blocks, dtype, kind, device, capability=capability),
            _pick_config("_attn_bwd_dq", nq, nk, head_blocks, dtype, kind, device, capability=capability))


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


# ---- tile work: how much of each launch is useful ------------------------------------------------
#
# A program owns BLOCK rows of its own axis (queries for the forward and dQ, keys for dK/dV) and loops
# over the other axis in tiles; padding rows and columns are computed and thrown away. The useful
# fraction of a launch is the work its tiles need (Nq * Nk logits) over the work they do (padded rows
# x padded columns): the static model (`fastvit kernels --model`) reads it, and item 4 of the tile
# rules is "at least 80% at ViT lengths, no program with under 25% useful rows".

class TileWork(NamedTuple):
    """One launch's tiling: programs per (batch, head), rows and columns its tiles cover (padding
    included), the useful fraction of that work, and the useful-row fraction of its emptiest program."""

    programs: int
    rows: int
    cols: int
    useful: float
    min_program_rows: float


def _axis(n: int, block: int, tail_block: Optional[int] = None) -> tuple[int, int, float]:
    """(tiles, covered length, useful fraction of the last tile) of ``n`` in ``block`` tiles; a partial
    last tile is ``tail_block`` wide when given (a narrower tile for the remainder)."""
    full, rem = divmod(n, block)
    if rem == 0:
        return full, n, 1.0
    last = tail_block or block
    return full + 1, full * block + last, rem / last


def tile_work(kernel: str, nq: int, nk: int, cfg: Config) -> TileWork:
    """The tiling of one launch of ``kernel`` (``_attn_fwd``, ``_attn_bwd_dq``, ``_attn_bwd_dkdv``,
    ``_attn_bwd_onepass``) at ``nq`` x ``nk`` with ``cfg``, as the launchers run it. The one-pass
    backward's rows are keys (its outer loop) and its one program per (batch, head) covers them all:
    ``min_program_rows`` is then the useful fraction of its last key tile."""
    if kernel in ("_attn_fwd", "_attn_bwd_dq"):
        programs, rows, last = _axis(nq, cfg.block_m)
        _, cols, _ = _axis(nk, cfg.block_n)
    elif kernel in ("_attn_bwd_dkdv", "_attn_bwd_onepass"):
        programs, rows, last = _axis(nk, cfg.block_n)
        _, cols, _ = _axis(nq, cfg.block_m)
        if kernel == "_attn_bwd_onepass":  # one program per (batch, head) over every key and query tile
            programs = 1
    else:
        raise ValueError(f"tile_work: unknown kernel {kernel!r}")
    return TileWork(programs, rows, cols, round(nq * nk / (rows * cols), 4), round(last, 4))
