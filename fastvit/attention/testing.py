"""One source of attention test cases: ``fastvit check``, the test suite, the kernel tests'
shapes and ``benchmarks/gpu_check.py`` draw shapes, bias kinds, inputs and comparisons from here.

A case is (backend, device, dtype, shape ``(B, H, Nq, Nk, D, Dv)``, bias kind); its id reads like
``sdpa-cpu-bf16-B2-H3-N49-D32-relpos`` (``Nq16-Nk50`` when the lengths differ, ``-Dv64`` when the
value width differs). Inputs are drawn on the CPU from a seeded generator and moved to the device;
the reference runs on detached fp32 copies (``fp32_copy``) with TF32 off (``no_tf32``). Tolerances
are the backends' own (``Backend.tolerances[dtype]``).

A bias kind is ``"none"`` or parts joined by ``+`` (``BIAS_PARTS``): every check runs ``BIAS_KINDS``;
the kernel tests combine more parts (``"relpos+dense_bcast_all+padding"``).
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .backends import get_backend
from .bias import DenseBias, KeyBias, KeyPaddingMask, RelPosBias
from .inputs import DTYPES, dtype_name
from .packed import Packed
from .window import Window

__all__ = [
    "DTYPES", "SHAPES", "QUICK_SHAPES", "CUDA_SHAPES", "BIAS_KINDS", "WINDOW_SHAPES", "QUICK_WINDOW_SHAPES",
    "CUDA_WINDOW_SHAPES", "WINDOW_BIAS_KINDS", "PACKED_SHAPES", "PACKED_BIAS_KINDS", "CheckCase", "device_dtypes",
    "parse_dtypes",
    "declares", "generate_cases", "make_case_inputs", "trainable", "fp32_copy", "compare", "grad_scale",
    "no_tf32",
    "BIAS_PARTS", "bias_parts",
]

# (B, H, Nq, Nk, D, Dv): vision-awkward sizes. N = 1, 49 (7x7 window), 50 (7x7 + CLS), 197 (ViT/16 at
# 224 px), 577 (ViT/16 at 384 px); D = 8..80; Nq != Nk both ways; Dv != D; Nk = 0.
SHAPES = [
    (2, 3, 1, 1, 8, 8),
    (2, 3, 49, 49, 32, 32),
    (2, 2, 50, 50, 48, 48),
    (2, 2, 50, 50, 80, 80),
    (1, 2, 197, 197, 64, 64),
    (2, 2, 1, 50, 32, 32),       # class attention (CaiT): one query over all tokens
    (2, 2, 64, 16, 32, 32),      # reduced KV (CvT, Twins GSA): fewer keys than queries
    (2, 2, 16, 50, 64, 64),      # subsampled queries: more keys than queries
    (2, 2, 49, 196, 16, 64),     # LeViT attention-subsample: key width 16, value width 64
    (2, 2, 16, 0, 32, 32),       # no keys at all (an empty context): zeros and zero gradients, never an error
    (1, 2, 577, 577, 64, 64),
]
# ``--quick``: every awkward feature, no sequence above 64 keys (fast under TRITON_INTERPRET=1 too).
QUICK_SHAPES = [s for s in SHAPES if max(s[2], s[3]) <= 64]
# Added on CUDA only (seconds there, minutes in the CPU's interpreter): several key blocks with a
# partial last one (785 = 28^2 + 1, ViT/16 at 448 px), and ViT-B's 12 heads at a batch of 4.
CUDA_SHAPES = [
    (1, 2, 785, 785, 64, 64),
    (4, 12, 197, 197, 64, 64),
]

# Windowed calls, (B, H, D, Dv, Window): a non-square grid cut into non-square windows; Swin's 7x7
# windows (49 tokens, padded to a 64 tile) with a shift; a shift on one axis only; dilated windows as
# CrossFormer's long distance and MaxViT's grid attention use them; windows of 100 tokens (several key
# blocks in a fused kernel).
WINDOW_SHAPES = [
    (2, 2, 16, 16, Window(grid=(6, 8), size=(3, 4))),
    (2, 3, 32, 32, Window(grid=(14, 14), size=(7, 7), shift=(3, 3))),
    (1, 2, 16, 16, Window(grid=(8, 8), size=(4, 4), shift=(0, 2))),
    (2, 2, 16, 32, Window(grid=(8, 12), size=(2, 3), dilation=(4, 4))),
    (1, 2, 32, 32, Window(grid=(12, 12), size=(4, 4), dilation=(3, 3))),
    (1, 2, 32, 32, Window(grid=(20, 10), size=(10, 10))),
]
QUICK_WINDOW_SHAPES = [s for s in WINDOW_SHAPES if s[4].tokens <= 16]
# CUDA only: Swin-T's first stage (56x56 tokens, 7x7 windows, shift 3, 3 heads of 32) at a batch of 2.
CUDA_WINDOW_SHAPES = [(2, 3, 32, 32, Window(grid=(56, 56), size=(7, 7), shift=(3, 3)))]
# Window biases broadcast over the windows: "dense" is per window [num_windows, H, n, n], "dense_bcast"
# one [H, n, n] for all (CrossFormer's dynamic position bias). Key padding cannot combine with a window.
WINDOW_BIAS_KINDS = ("none", "relpos", "dense", "dense_bcast")

# Packed variable-length calls, (H, D, Dv, Packed): one sequence; many short ones; one long among short
# ones (several query blocks, lengths that are no block multiples); one query per sequence over its
# own keys (attention pooling); Nq != Nk per sequence both ways.
PACKED_SHAPES = [
    (2, 32, 32, Packed([37])),
    (2, 16, 16, Packed([3, 1, 5, 2, 16, 7])),
    (2, 64, 64, Packed([4, 150, 2, 9])),
    (2, 32, 32, Packed([1, 1, 1], [50, 7, 64])),
    (2, 24, 32, Packed([20, 9, 33], [33, 4, 70])),
]
# A packed call's biases are over the packed tokens (each sequence reads its diagonal block); key
# padding cannot combine with packing.
PACKED_BIAS_KINDS = ("none", "relpos", "dense_bcast", "keybias")

# "padding" masks ~30% of the keys and, with B > 1, every key of the last sample: those rows must give
# zeros (not NaN) and zero gradients.
BIAS_KINDS = ("none", "relpos", "dense", "dense_bcast", "keybias", "padding", "relpos+padding")
# The dense parts differ in the leading dims of their [B, H, Nq, Nk] tensor: one map per sample and
# head, one per head for the whole batch, one per sample for all heads, one for everything.
_DENSE_LEADING = {"dense": "BH", "dense_bcast": "1H", "dense_bcast_heads": "B1", "dense_bcast_all": "11"}
# part -> the descriptor it adds, in the order make_case_inputs draws them.
# "keybias" is a per-key term [B, Nk] (token merging's log-size), "keybias_heads" one per head [B, H, Nk].
BIAS_PARTS = {"relpos": RelPosBias, **dict.fromkeys(_DENSE_LEADING, DenseBias), "keybias": KeyBias,
              "keybias_heads": KeyBias, "padding": KeyPaddingMask}


def bias_parts(kind: str) -> tuple:
    """The parts of a bias kind in ``BIAS_PARTS`` order: ``"padding+relpos"`` -> ``("relpos", "padding")``."""
    parts = () if kind == "none" else tuple(kind.split("+"))
    unknown = [p for p in parts if p not in BIAS_PARTS]
    if unknown:
        raise ValueError(f"unknown bias part {unknown[0]!r} in {kind!r}; parts: {', '.join(BIAS_PARTS)}")
    return tuple(p for p in BIAS_PARTS if p in parts)


@dataclass(frozen=True)
class CheckCase:
    """One backend-vs-reference comparison."""

    backend: str
    device: str
    dtype: torch.dtype
    shape: tuple  # (B, H, Nq, Nk, D, Dv)
    bias: str = "none"
    window: Optional[Window] = None  # a windowed call (Nq = Nk = the grid's H*W)
    packed: Optional[Packed] = None  # a packed call (B = 1, Nq = sum(lengths), Nk = sum(kv_lengths))

    @property
    def id(self) -> str:
        B, H, Nq, Nk, D, Dv = self.shape
        n = f"N{Nq}" if Nq == Nk else f"Nq{Nq}-Nk{Nk}"
        dv = "" if Dv == D else f"-Dv{Dv}"
        win = "" if self.window is None else f"-{self.window.describe()}"
        win += "" if self.packed is None else f"-{self.packed.describe()}"
        tail = "" if self.bias == "none" else f"-{self.bias}"
        return f"{self.backend}-{self.device}-{dtype_name(self.dtype)}-B{B}-H{H}-{n}-D{D}{dv}{win}{tail}"

    @property
    def layout(self) -> dict:
        """The case's layout arguments of ``attend`` / ``make_inputs``: ``window=`` and ``packed=``."""
        return {"window": self.window, "packed": self.packed}

    @classmethod
    def packed_case(cls, backend: str, device: str, dtype: torch.dtype, packed_shape: tuple, bias: str = "none"):
        """A case from a ``PACKED_SHAPES`` entry ``(H, D, Dv, Packed)``."""
        H, D, Dv, packed = packed_shape
        return cls(backend, device, dtype, (1, H, packed.total, packed.kv_total, D, Dv), bias, packed=packed)

    @classmethod
    def windowed(cls, backend: str, device: str, dtype: torch.dtype, window_shape: tuple, bias: str = "none"):
        """A case from a ``WINDOW_SHAPES`` entry ``(B, H, D, Dv, Window)``."""
        B, H, D, Dv, window = window_shape
        N = window.seq_len
        return cls(backend, device, dtype, (B, H, N, N, D, Dv), bias, window)


def device_dtypes(device: str) -> list:
    """The dtypes worth checking on ``device``: fp32 always, bf16 / fp16 where the device has them."""
    dtypes = [torch.float32]
    if device == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        dtypes.append(torch.float16)
    else:  # the CPU runs bf16 and fp16 matmul / softmax in torch >= 2.1
        dtypes += [torch.bfloat16, torch.float16]
    return dtypes


def parse_dtypes(names: Optional[Iterable[str]]) -> Optional[list]:
    if names is None:
        return None
    out = []
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
        out.append(DTYPES[name])
    return out


def declares(case: CheckCase) -> bool:
    """Whether the case's backend declares it can serve it (device, dtype, head dims, bias kinds):
    a declared case that the backend then refuses is a bug in the declaration."""
    backend = get_backend(case.backend)
    B, H, Nq, Nk, D, Dv = case.shape
    return (case.device in backend.devices and case.dtype in backend.dtypes
            and (backend.max_head_dim is None or max(D, Dv) <= backend.max_head_dim)
            and min(D, Dv) >= backend.min_head_dim_on(case.device)
            and all(issubclass(BIAS_PARTS[part], backend.bias_types) for part in bias_parts(case.bias))
            and (case.window is None or backend.supports_window)
            and (case.packed is None or (backend.supports_packed
                                         and (case.bias == "none" or backend.supports_packed_bias))))


def generate_cases(backends: Iterable[str], device: str = "cpu", dtypes: Optional[Sequence] = None,
                   patterns: Optional[Sequence[str]] = None, quick: bool = False,
                   declared_only: bool = False) -> list:
    """Every (backend, dtype, shape, bias) case, in a stable order.

    Cases the backend will refuse are generated too: ``run_case`` reports them as skips with the
    backend's reason, so a refusal is visible rather than silently missing.

    Args:
        backends: backend names (``reference`` is the oracle and is left out).
        device: ``"cpu"`` or ``"cuda"`` (CUDA adds ``CUDA_SHAPES``).
        dtypes: torch dtypes; default ``device_dtypes(device)``.
        patterns: glob patterns on the case id; a case is kept if it matches any of them.
        quick: only sequences of at most 64 keys.
        declared_only: only the cases each backend declares it serves (``declares``): the test suite
            asserts those pass.
    """
    dtypes = list(dtypes) if dtypes is not None else device_dtypes(device)
    cuda = device.startswith("cuda")
    shapes = QUICK_SHAPES if quick else SHAPES + (CUDA_SHAPES if cuda else [])
    windows = QUICK_WINDOW_SHAPES if quick else WINDOW_SHAPES + (CUDA_WINDOW_SHAPES if cuda else [])
    cases = []
    for name in backends:
        if name == "reference":
            continue
        for dtype in dtypes:
            candidates = [CheckCase(name, device, dtype, shape, bias) for shape in shapes for bias in BIAS_KINDS]
            candidates += [CheckCase.windowed(name, device, dtype, window, bias)
                           for window in windows for bias in WINDOW_BIAS_KINDS]
            candidates += [CheckCase.packed_case(name, device, dtype, shape, bias)
                           for shape in PACKED_SHAPES if not quick or max(shape[3].max_len, shape[3].kv_max_len) <= 64
                           for bias in PACKED_BIAS_KINDS]
            for case in candidates:
                if patterns and not any(fnmatch.fnmatchcase(case.id, p) for p in patterns):
                    continue
                if declared_only and not declares(case):
                    continue
                cases.append(case)
    return cases


def make_case_inputs(case: CheckCase, *, requires_grad: bool = True, seed: int = 0):
    """``q, k, v, bias`` for a case: drawn on the CPU from a seeded generator, moved to the device.

    The relative-position index and the padding mask are fixed; tables and dense biases are trainable.
    """
    g = torch.Generator().manual_seed(seed)
    B, H, Nq, Nk, D, Dv = case.shape

    def rand(*size):
        t = torch.randn(*size, generator=g).to(device=case.device, dtype=case.dtype)
        return t.requires_grad_(requires_grad)

    q, k, v = rand(B, H, Nq, D), rand(B, H, Nk, D), rand(B, H, Nk, Dv)
    if case.window is not None:
        return q, k, v, _window_bias(case, rand, g)
    parts = bias_parts(case.bias)
    bias = []
    if "relpos" in parts:
        T = 2 * max(Nq, Nk) + 1
        table = rand(T, H)
        index = torch.randint(0, T, (Nq, Nk), generator=g).to(case.device)
        bias.append(RelPosBias(table, index))
    for part in parts:
        if part in _DENSE_LEADING:
            per_sample, per_head = (c != "1" for c in _DENSE_LEADING[part])
            bias.append(DenseBias(rand(B if per_sample else 1, H if per_head else 1, Nq, Nk)))
    if "keybias" in parts:
        bias.append(KeyBias(rand(B, Nk)))
    if "keybias_heads" in parts:
        bias.append(KeyBias(rand(B, H, Nk)))
    if "padding" in parts:
        mask = torch.rand(B, Nk, generator=g) > 0.3
        mask[:, :1] = True  # (no column at all when Nk = 0)
        if B > 1:
            mask[-1] = False  # a sample with no valid key at all: zeros, never NaN
        bias.append(KeyPaddingMask(mask.to(case.device)))
    return q, k, v, tuple(bias)


def _window_bias(case: CheckCase, rand, g: torch.Generator) -> tuple:
    """A windowed case's biases: a window-local relative index, per-window or shared dense biases."""
    window, H = case.window, case.shape[1]
    n = window.tokens
    bias = []
    if "relpos" in case.bias:
        T = (2 * window.size[0] - 1) * (2 * window.size[1] - 1)  # Swin's table: every relative offset
        bias.append(RelPosBias(rand(T, H), torch.randint(0, T, (n, n), generator=g).to(case.device)))
    if case.bias == "dense":
        bias.append(DenseBias(rand(window.num_windows, H, n, n)))
    elif case.bias == "dense_bcast":
        bias.append(DenseBias(rand(H, n, n)))
    return tuple(bias)


def trainable(q, k, v, bias) -> list:
    """``(name, tensor)`` of every input whose gradient is compared."""
    out = [("q", q), ("k", k), ("v", v)]
    for b in bias:
        if isinstance(b, RelPosBias):
            out.append(("rel_table", b.table))
        elif isinstance(b, DenseBias):
            out.append(("dense_bias", b.tensor))
        elif isinstance(b, KeyBias):
            out.append(("key_bias", b.tensor))
    return out


def fp32_copy(q, k, v, bias):
    """Detached fp32 leaf copies of every float tensor (the reference runs on these)."""

    def cp(t):
        return t.detach().float().requires_grad_(t.requires_grad)

    new_bias = []
    for b in bias:
        if isinstance(b, RelPosBias):
            new_bias.append(RelPosBias(cp(b.table), b.index))
        elif isinstance(b, (DenseBias, KeyBias)):
            new_bias.append(type(b)(cp(b.tensor)))
        else:
            new_bias.append(b)
    return cp(q), cp(k), cp(v), tuple(new_bias)


def grad_scale(expected_grad: torch.Tensor) -> float:
    """How much to widen a gradient's atol: gradients sum over Nq or Nk terms, so they are compared
    relative to the reference gradient's magnitude (at least 1; 1 for an empty gradient)."""
    return max(1.0, float(expected_grad.abs().amax())) if expected_grad.numel() else 1.0


def compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> dict:
    """Max abs error, its index, the fraction of elements outside ``atol + rtol * |expected|``.

    NaN or inf in ``actual`` where ``expected`` is finite counts as an infinite error.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return {"ok": False, "max_abs_err": float("inf"), "index": None, "failed_fraction": 1.0,
                "reason": f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"}
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    err = (a - e).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    bad = err > atol + rtol * e.abs()
    if err.numel() == 0:
        return {"ok": True, "max_abs_err": 0.0, "index": None, "failed_fraction": 0.0, "reason": ""}
    flat = int(torch.argmax(err))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    return {"ok": not bool(bad.any()), "max_abs_err": float(err.max()), "index": index,
            "failed_fraction": float(bad.double().mean()), "reason": ""}


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full-precision fp32 matmuls for the reference (TF32 off), restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])


