"""A static performance model of fastvit's attention kernels on an H100 SXM (``fastvit kernels --model``).

What it predicts, without a GPU: for each attention call of three training workloads (ViT-B/16,
Swin-T, LeViT-256; bf16), each kernel the launchers would launch (``kernels.attention.launch_plan``
and ``kernels.window_attention.window_plan`` on sm_90a), its time and its share of the tensor
cores' peak. It is a model, not a measurement: ``benchmarks/perf_model_check.py`` (the ``model``
part of ``benchmarks/gpu_check.py``) times the same calls on a GPU and prints the ratio, which is
what calibrates it.

The device (`H100_SXM`, one place): 989 TFLOP/s dense bf16, 3.35 TB/s HBM, 132 SMs at 1.83 GHz,
so 4096 tensor-core FLOP per cycle per SM; 4 warp schedulers per SM issuing 1 instruction per
cycle each; 16 ``exp2`` per cycle per SM (the MUFU rate); 3 us per kernel launch.

The model ("roofline plus issue"), per kernel launch:

- The launch's tiling comes from ``kernels.attention_configs.tile_work`` (programs per (batch, head),
  rows and columns covered with padding, the useful fraction); a program runs ``iterations`` of its
  main loop, one per tile of the other axis (the window kernels: one per window tile).
- Per iteration, in SM cycles:
  tensor-core time = issued MMA FLOPs of one tile (padded: ``2 * BLOCK_M * BLOCK_N * BLOCK_D`` per
  matmul with ``D``, ``BLOCK_DV`` with ``Dv``) / 4096;
  issue time = main-loop SASS instructions (``loop_instructions`` of ``kernels.aot.compile_spec`` for
  sm_90a) x warps / 4 schedulers;
  exp time = ``BLOCK_M * BLOCK_N`` / 16.
  The iteration takes ``max(tensor, issue, exp)``; when ptxas serialised the wgmma pipeline (C7515,
  ``wgmma_serialized``) the tensor cores wait for the other instructions: ``max(tensor + issue, exp)``.
- Compute time = ``ceil(programs / 132)`` waves x iterations x iteration time / 1.83 GHz (programs
  resident on one SM share its rates, so waves count programs per SM, not occupancy).
- Memory time = HBM bytes / 3.35 TB/s. Each tensor crosses HBM once: q, k, v (and dO, O) read once,
  outputs written once, ``lse`` / ``delta`` (fp32) written and read once, a batch-free bias read once
  (its re-reads by every batch element hit L2), dS (fp32, padded to the dQ tile) written when a bias
  takes a gradient; the one-pass backward's program-owned fp32 scratch (dQ accumulator, delta) is
  written back once (its re-reads and re-writes inside the program hit L2). Torch's work around the
  kernels (the bias gather before, the dS sums after) is not counted.
- Kernel time = ``max(compute, memory) + 3 us``. The backward's preprocess (``delta = rowsum(dO * O)``)
  has no matmul: memory time only.

FLOPs: a kernel's FLOPs are its matmuls at the true (unpadded) sizes; % of peak = FLOPs / time / 989
TFLOP/s. The forward does 2 matmuls (``QK^T``, ``PV``: ``2 B H Nq Nk (D + Dv)``); the backward's
totals count FlashAttention's 5 (``QK^T`` recomputed, ``dP = dO V^T``, ``dV``, ``dQ``, ``dK``:
``2 B H Nq Nk (3 D + 2 Dv)``, 2.5x the forward when ``D = Dv``): what the one-pass backward issues
(``N <= 256``); the three-pass FlashAttention-2 pair (dK/dV + dQ kernels) issues 7 (its rows show
their own 4 and 3).

Workloads (`WORKLOADS`): ViT-B/16 at 224 px, batch 64 (12 layers of 12 heads, N = 197, D = 64);
Swin-T at batch 64 (stages of 96/192/384/768 channels, 3/6/12/24 heads of 32, depths 2/2/6/2, token
grids 56/28/14/7, 7x7 windows with a relative-position bias, every other block shifted): its windows
run in the window kernel family with ``window_plan``'s configs (one 64x64 tile per 49-token window,
the fused one-tile backward); LeViT-256 at batch 128, whose calls are recorded from the model itself
(`levit_calls`: a batch-1 CPU forward of ``levit_256`` with ``attend`` hooked).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = ["Device", "H100_SXM", "AttentionCall", "Launch", "Workload", "WORKLOADS", "levit_calls",
           "attention_launches", "predict_launch", "model_workloads", "MODEL_TEXT"]


@dataclass(frozen=True)
class Device:
    """The constants of the model (one place)."""

    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bytes_per_s: float
    sms: int
    clock_hz: float
    schedulers_per_sm: int = 4  # warp schedulers, 1 instruction per cycle each
    exp_per_cycle_per_sm: int = 16  # MUFU ex2
    launch_s: float = 3e-6

    @property
    def tensor_flops_per_cycle_per_sm(self) -> float:
        return self.peak_flops / (self.sms * self.clock_hz)


H100_SXM = Device("H100 SXM (bf16)", peak_flops=989e12, hbm_bytes_per_s=3.35e12, sms=132, clock_hz=1.83e9)

MODEL_TEXT = ("roofline plus issue: per main-loop iteration max(padded MMA FLOPs / 4096 per SM-cycle, loop SASS "
              "instructions x warps / 4 schedulers, BLOCK_M*BLOCK_N exp2 / 16) cycles (tensor + issue when wgmma is "
              "serialised); compute = ceil(programs / 132) x iterations x that / 1.83 GHz; kernel = max(compute, "
              "HBM bytes / 3.35 TB/s) + 3 us. A model, not a measurement, until a GPU run calibrates it")

_BF16 = 2  # bytes per element of q, k, v, o and their gradients
_FP32 = 4


@dataclass(frozen=True)
class AttentionCall:
    """One attention call of a workload, ``count`` times per training step.

    ``bias``: "none" or "rel" (a relative-position table, trained: its gradient is computed).
    ``windows``: 0 for the attention family; else the call is ``batch * windows`` independent
    ``nq x nk`` attentions in the window kernel family (``shifted``: Swin's shifted windows)."""

    name: str
    batch: int
    heads: int
    nq: int
    nk: int
    d: int
    dv: int
    bias: str = "none"
    count: int = 1
    windows: int = 0
    shifted: bool = False

    @property
    def shape(self) -> str:
        win = f" x{self.windows}win{' shift' if self.shifted else ''}" if self.windows else ""
        dims = f"d{self.d}" if self.d == self.dv else f"d{self.d}/{self.dv}"
        return f"B{self.batch} H{self.heads} {self.nq}x{self.nk} {dims}{win}{' rel' if self.bias != 'none' else ''}"

    @property
    def instances(self) -> int:
        """Independent (batch, head[, window]) attentions."""
        return self.batch * self.heads * max(1, self.windows)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    calls: tuple


# ---- workloads ----------------------------------------------------------------------------------------

def vit_b16(batch: int = 64) -> Workload:
    return Workload("vit_b16_224", f"ViT-B/16, 224 px, batch {batch}: 12 layers, 12 heads of 64, N = 197",
                    (AttentionCall("layer", batch, 12, 197, 197, 64, 64, count=12),))


def swin_t(batch: int = 64) -> Workload:
    calls = []
    for stage, (dim, heads, depth, grid) in enumerate(zip((96, 192, 384, 768), (3, 6, 12, 24), (2, 2, 6, 2),
                                                          (56, 28, 14, 7)), start=1):
        windows = (grid // 7) ** 2
        shifts = depth // 2 if grid > 7 else 0  # a grid of one window is never shifted
        for shifted, count in ((False, depth - shifts), (True, shifts)):
            if count:
                calls.append(AttentionCall(f"stage{stage}{' shifted' if shifted else ''}", batch, heads, 49, 49,
                                           dim // heads, dim // heads, bias="rel", count=count, windows=windows,
                                           shifted=shifted))
    return Workload("swin_t_224", f"Swin-T, 224 px, batch {batch}: 7x7 windows, relative-position bias "
                                  "(window kernel family)", tuple(calls))


def levit_calls(batch: int = 128, model: str = "levit_256") -> tuple:
    """The attention calls of one forward of ``model``, recorded by hooking ``attend`` on a batch-1 CPU
    forward at 224 px (its ``q``, ``k``, ``v`` shapes and bias), with the batch scaled to ``batch``;
    identical calls are merged into one with a count."""
    from unittest import mock

    import fastvit
    from fastvit.attention import RelPosBias
    from fastvit.layers import attention as layer_attention

    seen: list = []
    real = layer_attention.attend

    def recording(q, k, v, **kwargs):
        bias = kwargs.get("bias")
        seen.append((q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3],
                     "rel" if isinstance(bias, RelPosBias) else ("none" if bias is None else "dense")))
        return real(q, k, v, **kwargs)

    net = fastvit.create_model(model).eval()
    size = getattr(net, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    with mock.patch.object(layer_attention, "attend", recording), torch.no_grad():
        net(torch.randn(1, 3, size, size))
    calls, index = [], {}
    for key in seen:
        if key in index:
            i = index[key]
            calls[i] = replace(calls[i], count=calls[i].count + 1)
            continue
        index[key] = len(calls)
        kind = "subsample" if key[1] != key[2] else f"N{key[1]}"
        calls.append(AttentionCall(kind, batch=batch, heads=key[0], nq=key[1], nk=key[2], d=key[3], dv=key[4],
                                   bias=key[5], count=1))
    return tuple(calls)


def levit_256(batch: int = 128) -> Workload:
    return Workload("levit_256_224", f"LeViT-256, 224 px, batch {batch}: calls recorded from the model",
                    levit_calls(batch))


WORKLOADS: dict[str, Callable[[], Workload]] = {"vit_b16_224": vit_b16, "swin_t_224": swin_t,
                                                 "levit_256_224": levit_256}


# ---- launches -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """One kernel launch of a call: its config and tiling, the work it issues and the bytes it moves.
    ``spec``: the compile spec of the variant it launches (None: no main loop is modelled)."""

    kernel: str
    config: tuple  # Config
    blocks: tuple
    programs: int
    iterations: int  # main-loop iterations per program
    mma_flops_per_iteration: int  # padded, issued
    exps_per_iteration: int
    flops: int  # the kernel's matmuls at the true sizes
    bytes: int
    useful: float  # tile_work's useful fraction
    spec: object = None


def _dtype():
    return torch.bfloat16


def _attention_switches(call: AttentionCall, cfg, blocks) -> dict:
    """The constexpr switches the attention launchers give this call (``attention.py``: ``_fwd_spec``,
    ``attention_bwd``): a relative-position table at these sizes is expanded to a dense bias unless it
    is over the precompute threshold (then gathered in-kernel)."""
    from fastvit.kernels.attention_configs import _bias_kind

    kind = _bias_kind(call.bias != "none", call.nq, call.nk)
    return dict(EVEN_M=call.nq % cfg.block_m == 0, EVEN_N=call.nk % cfg.block_n == 0,
                EVEN_D=(call.d, call.dv) == tuple(blocks), HAS_REL=kind == "gather", HAS_DENSE=kind == "dense",
                HAS_PAD=False)


def _io_bytes(call: AttentionCall, *, q=0, k=0, v=0, o=0) -> int:
    """bf16 bytes of ``q``/``k``/``v``/``o``-shaped tensors (counts of each) over every instance."""
    per = call.nq * call.d * q + call.nk * call.d * k + call.nk * call.dv * v + call.nq * call.dv * o
    return _BF16 * call.instances * per


def _bias_bytes(call: AttentionCall, n_pad: Optional[int] = None) -> int:
    """A batch-free bias read once: ``[1, H, Nq, Nk]`` bf16 (the window family pads it to its tile)."""
    if call.bias == "none":
        return 0
    rows, cols = (n_pad, n_pad) if n_pad else (call.nq, call.nk)
    return _BF16 * call.heads * rows * cols


def attention_launches(call: AttentionCall) -> dict:
    """``{"fwd": [Launch], "bwd": [Launch]}``: the kernels the launchers run for ``call`` on sm_90a."""
    return (_window_launches if call.windows else _family_launches)(call)


def _family_launches(call: AttentionCall) -> dict:
    from fastvit.kernels import variants
    from fastvit.kernels.attention import launch_plan
    from fastvit.kernels.attention_configs import tile_work

    plan = launch_plan(call.nq, call.nk, call.d, call.dv, _dtype(), biased=call.bias != "none", capability=(9, 0))
    bh, lse = call.batch * call.heads, _FP32 * call.batch * call.heads * call.nq
    biased = call.bias != "none"
    pair = 2 * call.instances * call.nq * call.nk

    def launch(kernel, iter_axis_block, mma_dims, flops_dims, nbytes, extra=None):
        cfg, blocks = plan[kernel]
        work = tile_work(kernel, call.nq, call.nk, cfg)
        switches = dict(_attention_switches(call, cfg, blocks), **(extra or {}))
        spec = variants.tile_spec(kernel, cfg, _dtype(), blocks, switches)
        bd, bdv = blocks
        return Launch(kernel, tuple(cfg), tuple(blocks), bh * work.programs,
                      math.ceil(work.cols / iter_axis_block(cfg)),
                      2 * cfg.block_m * cfg.block_n * (mma_dims[0] * bd + mma_dims[1] * bdv),
                      cfg.block_m * cfg.block_n, pair * (flops_dims[0] * call.d + flops_dims[1] * call.dv),
                      nbytes, work.useful, spec)

    fwd = launch("_attn_fwd", lambda c: c.block_n, (1, 1), (1, 1),
                 _io_bytes(call, q=1, k=1, v=1, o=1) + lse + _bias_bytes(call))
    if "_attn_bwd_onepass" in plan:
        return {"fwd": [fwd], "bwd": [_onepass_launch(call, plan, bh, lse, pair)]}
    pre_cfg, pre_blocks = plan["_attn_bwd_preprocess"]
    pre = Launch("_attn_bwd_preprocess", tuple(pre_cfg), tuple(pre_blocks), bh * math.ceil(call.nq / pre_cfg.block_m),
                 0, 0, 0, 0, _io_bytes(call, o=2) + lse, 1.0)
    qkv_do = _io_bytes(call, q=1, k=1, v=1, o=1) + 2 * lse + _bias_bytes(call)
    dkdv = launch("_attn_bwd_dkdv", lambda c: c.block_m, (2, 2), (2, 2), qkv_do + _io_bytes(call, k=1, v=1))
    cfg_q = plan["_attn_bwd_dq"][0]
    ds = (_FP32 * bh * math.ceil(call.nq / cfg_q.block_m) * cfg_q.block_m
          * math.ceil(call.nk / cfg_q.block_n) * cfg_q.block_n) if biased else 0
    dq = launch("_attn_bwd_dq", lambda c: c.block_n, (2, 1), (2, 1), qkv_do + _io_bytes(call, q=1) + ds,
                extra=dict(STORE_DS=biased))
    return {"fwd": [fwd], "bwd": [pre, dkdv, dq]}


def _onepass_launch(call: AttentionCall, plan: dict, bh: int, lse: int, pair: int) -> Launch:
    """The one-pass backward: one program per (batch, head) iterating over every (key tile, query
    tile) with five matmuls each (per head and 4 batch elements when dS is summed in-kernel). HBM:
    q, k, v, O, dO read and dq, dk, dv written once, lse read, dS (padded) written when a bias takes
    a gradient, and the program-owned fp32 scratch (dQ accumulator, delta, lse in log2 units)
    written back once: its reads and re-writes within the program hit L2 (at most 64 KiB per
    program; the resident programs of all SMs hold a few MB of the 50 MB L2)."""
    from fastvit.kernels import variants
    from fastvit.kernels.attention import BIAS_GRAD_BATCH_PER_PROGRAM
    from fastvit.kernels.attention_configs import tile_work

    cfg, blocks = plan["_attn_bwd_onepass"]
    work = tile_work("_attn_bwd_onepass", call.nq, call.nk, cfg)
    biased = call.bias != "none"
    bd, bdv = blocks
    spec = variants.tile_spec("_attn_bwd_onepass", cfg, _dtype(), blocks,
                              dict(_attention_switches(call, cfg, blocks), STORE_DS=biased, BATCH_SUM=biased))
    iterations = (work.rows // cfg.block_n) * (work.cols // cfg.block_m)
    # a batch-free bias (the workloads' relative-position tables): dS summed over 4 elements in-kernel
    per = BIAS_GRAD_BATCH_PER_PROGRAM if biased else 1
    programs = math.ceil(call.batch / per) * call.heads
    scratch = _FP32 * programs * work.cols * (bd + 2)  # dQ accumulator, delta and lse in log2 units
    ds = _FP32 * programs * work.rows * work.cols if biased else 0
    nbytes = _io_bytes(call, q=2, k=2, v=2, o=2) + lse + _bias_bytes(call) + scratch + ds
    return Launch("_attn_bwd_onepass", tuple(cfg), tuple(blocks), programs, per * iterations,
                  2 * cfg.block_m * cfg.block_n * (3 * bd + 2 * bdv), cfg.block_m * cfg.block_n,
                  pair * (3 * call.d + 2 * call.dv), nbytes, work.useful, spec)


def _window_spec(kernel: str, cfg, blocks, n: int, biased: bool, shifted: bool):
    """The window family's compile spec for this launch, taken from its own list of every variant
    (``window_attention.iter_compile_specs(full=True)``) so that its switches follow the launcher."""
    from fastvit.kernels import window_attention as W

    want = dict(BLOCK_D=blocks[0], BLOCK_DV=blocks[1], HAS_BIAS=biased, SHIFT=shifted, EVEN_N=n % cfg.block_n == 0)
    if kernel in ("_win_bwd_tile", "_win_bwd_dq"):
        want["STORE_DS"] = biased
    for spec in W.iter_compile_specs(full=True, dtypes=(_dtype(),)):
        c = spec.constexprs
        if spec.kernel == kernel and spec.config == cfg and all(c.get(k) == v for k, v in want.items()) \
                and c.get("dil_h") == 1:
            return spec
    return None


def _window_launches(call: AttentionCall) -> dict:
    from fastvit.kernels import window_attention as W
    from fastvit.kernels.attention_configs import tile_work

    n, biased = call.nq, call.bias != "none"
    plan = W.window_plan(n, call.d, call.dv, _dtype())
    tokens_lse = _FP32 * call.instances * n
    pair = 2 * call.instances * n * n
    cfg, blocks = plan["_win_fwd"]
    work = tile_work("_attn_fwd", n, n, cfg)  # a window tiles as one attention of n x n
    bd, bdv = blocks
    fwd = Launch("_win_fwd", tuple(cfg), tuple(blocks), call.instances * work.programs,
                 math.ceil(work.cols / cfg.block_n), 2 * cfg.block_m * cfg.block_n * (bd + bdv),
                 cfg.block_m * cfg.block_n, pair * (call.d + call.dv),
                 _io_bytes(call, q=1, k=1, v=1, o=1) + tokens_lse + _bias_bytes(call, W._tile(n)),
                 work.useful, _window_spec("_win_fwd", cfg, blocks, n, biased, call.shifted))
    if "_win_bwd_tile" not in plan:
        raise NotImplementedError(f"window size {n}: the multi-block window backward is not modelled")
    cfg, blocks = plan["_win_bwd_tile"]
    work = tile_work("_attn_fwd", n, n, cfg)  # one tile per window, as the forward
    slab = cfg.block_m * cfg.block_n
    per_program = W._batch_chunks(call.batch, call.heads, call.windows, slab * _FP32) if biased else 1
    chunks = math.ceil(call.batch / per_program)
    programs = chunks * call.heads * call.windows
    ds = _FP32 * chunks * call.windows * call.heads * slab if biased else 0
    bwd = Launch("_win_bwd_tile", tuple(cfg), tuple(blocks), programs, per_program,
                 2 * slab * (3 * bd + 2 * bdv), slab, pair * (3 * call.d + 2 * call.dv),
                 _io_bytes(call, q=2, k=2, v=2, o=3) + tokens_lse + _bias_bytes(call, W._tile(n)) + ds,
                 work.useful, _window_spec("_win_bwd_tile", cfg, blocks, n, biased, call.shifted))
    return {"fwd": [fwd], "bwd": [bwd]}


# ---- compiling and predicting -------------------------------------------------------------------------

_ROWS: dict = {}  # spec key -> sm_90a compile row (in-process cache)


def _spec_key(spec) -> tuple:
    return (spec.kernel, tuple(spec.config), tuple(sorted(spec.constexprs.items())))


def _compile(specs: list, progress: Optional[Callable[[dict], None]] = None, workers: int = 2) -> list:
    """sm_90a compile rows of ``specs`` (``kernels.aot.compile_report``: worker processes that compile
    whether or not this process runs the triton interpreter)."""
    from fastvit.kernels.aot import compile_report

    return compile_report((90,), progress, specs=specs, workers=workers)


def compile_rows(specs: Iterable, progress: Optional[Callable[[dict], None]] = None, workers: int = 2) -> dict:
    """``{spec key: row}`` for ``specs``, compiling only those not compiled before in this process."""
    todo, keys = [], []
    for spec in specs:
        key = _spec_key(spec)
        if key not in _ROWS and key not in keys:
            todo.append(spec)
            keys.append(key)
    if todo:
        for key, row in zip(keys, _compile(todo, progress, workers)):
            _ROWS[key] = row
    return _ROWS


def predict_launch(launch: Launch, row: Optional[dict], device: Device = H100_SXM) -> dict:
    """The model's prediction for one launch given its sm_90a compile row (see the module docstring)."""
    tensor = launch.mma_flops_per_iteration / device.tensor_flops_per_cycle_per_sm
    exp = launch.exps_per_iteration / device.exp_per_cycle_per_sm
    issue, serialized = 0.0, False
    if row is not None and launch.iterations:
        instructions = row.get("loop_instructions") if row.get("loop_mma") else None
        if instructions is None:  # no loop holds the matmuls: the kernel body is one iteration
            instructions = row.get("instructions") or 0
        issue = instructions * launch.config[2] / device.schedulers_per_sm
        serialized = bool(row.get("wgmma_serialized"))
    iteration = max(tensor + issue if serialized else max(tensor, issue), exp) if launch.iterations else 0.0
    waves = math.ceil(launch.programs / device.sms)
    compute_s = waves * launch.iterations * iteration / device.clock_hz
    memory_s = launch.bytes / device.hbm_bytes_per_s
    time_s = max(compute_s, memory_s) + device.launch_s
    limits = {"tensor": tensor, "issue": issue, "exp": exp}
    bound = "memory" if memory_s >= compute_s else ("tensor+issue" if serialized and tensor + issue >= exp
                                                    else max(limits, key=limits.get))
    return {"kernel": launch.kernel, "config": list(launch.config), "blocks": list(launch.blocks),
            "programs": launch.programs, "iterations": launch.iterations, "waves": waves,
            "flops": launch.flops, "bytes": launch.bytes, "useful": launch.useful,
            "loop_mma_share": None if row is None else row.get("loop_mma_share"),
            "loop_instructions": None if row is None else row.get("loop_instructions"),
            "wgmma_serialized": serialized, "compile_error": None if row is None or row.get("ok") else row.get("error"),
            "cycles_per_iteration": {k: round(v, 1) for k, v in limits.items()},
            "compute_us": compute_s * 1e6, "memory_us": memory_s * 1e6, "time_us": time_s * 1e6, "bound": bound,
            "pct_peak": 100.0 * launch.flops / time_s / device.peak_flops}


def _total(kind: str, calls: list, flops: int, device: Device) -> dict:
    time_us = sum(c[kind]["time_us"] * c["count"] for c in calls)
    return {"time_us": time_us, "flops": flops, "bytes": sum(c[kind]["bytes"] * c["count"] for c in calls),
            "pct_peak": 100.0 * flops / (time_us * 1e-6) / device.peak_flops if time_us else 0.0}


def model_workloads(names: Optional[Sequence[str]] = None, progress: Optional[Callable[[dict], None]] = None,
                    device: Device = H100_SXM, workers: int = 2,
                    on_plan: Optional[Callable[[int], None]] = None) -> dict:
    """The model's document for the named workloads (default: all of `WORKLOADS`).

    Args:
        names: keys of `WORKLOADS`.
        progress: called with each compile row as it completes.
        on_plan: called once with the number of variants that will be compiled.

    Returns:
        ``{"device", "model", "workloads": [{name, description, calls: [{..., "fwd": {...}, "bwd": {...},
        "kernels": [...]}], totals: {fwd, bwd, step}}]}``; times in us, FLOPs and bytes per call.
    """
    names = list(WORKLOADS) if not names else list(names)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}: expected {', '.join(WORKLOADS)}")
    workloads = [WORKLOADS[n]() for n in names]
    planned = [(w, [(call, attention_launches(call)) for call in w.calls]) for w in workloads]
    specs = [launch.spec for _, calls in planned for _, launches in calls for ls in launches.values()
             for launch in ls if launch.spec is not None]
    if on_plan is not None:
        on_plan(len({_spec_key(s) for s in specs} - set(_ROWS)))
    rows = compile_rows(specs, progress, workers)
    doc = {"schema_version": 1, "kind": "fastvit-perf-model", "device": asdict(device), "model": MODEL_TEXT,
           "workloads": []}
    for workload, calls in planned:
        entries = []
        for call, launches in calls:
            entry = {**asdict(call), "shape": call.shape, "kernels": []}
            for direction, ls in launches.items():
                preds = [dict(predict_launch(launch, rows.get(_spec_key(launch.spec)) if launch.spec else None,
                                             device), direction=direction) for launch in ls]
                entry["kernels"] += preds
                pair = 2 * call.instances * call.nq * call.nk
                flops = pair * (call.d + call.dv) if direction == "fwd" else pair * (3 * call.d + 2 * call.dv)
                time_us = sum(p["time_us"] for p in preds)
                entry[direction] = {"time_us": time_us, "flops": flops, "bytes": sum(p["bytes"] for p in preds),
                                    "pct_peak": 100.0 * flops / (time_us * 1e-6) / device.peak_flops}
            entries.append(entry)
        fwd_flops = sum(e["fwd"]["flops"] * e["count"] for e in entries)
        bwd_flops = sum(e["bwd"]["flops"] * e["count"] for e in entries)
        totals = {"fwd": _total("fwd", entries, fwd_flops, device), "bwd": _total("bwd", entries, bwd_flops, device)}
        step_us = totals["fwd"]["time_us"] + totals["bwd"]["time_us"]
        totals["step"] = {"time_us": step_us, "flops": fwd_flops + bwd_flops,
                          "bytes": totals["fwd"]["bytes"] + totals["bwd"]["bytes"],
                          "pct_peak": 100.0 * (fwd_flops + bwd_flops) / (step_us * 1e-6) / device.peak_flops}
        doc["workloads"].append({"name": workload.name, "description": workload.description, "calls": entries,
                                 "totals": totals})
    return doc
