"""Attention calls shaped like the layers of real models (``vit_b16_224``, ``levit_256_stage2``, ...),
their inputs, FLOP and byte counts, and the devices' nominal peaks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fastvit.attention import DenseBias, KeyPaddingMask, RelPosBias, Window


@dataclass(frozen=True)
class AttentionShape:
    """An attention call shaped like the layer of a real model.

    Args:
        name: ``<model>_<where>``.
        heads, nq, nk, head_dim, value_dim: the call's sizes (``value_dim`` defaults to ``head_dim``).
        bias: ``"none"``, ``"relpos"`` (a ``[T, H]`` table gathered by a 2-D relative index; with a
            window, Swin's window-local table and index), ``"dense"`` (a trainable ``DenseBias``;
            with a window ``[H, n, n]``, CrossFormer's dynamic position bias) or ``"padding"`` (a
            key-padding mask, as after adaptive token sampling).
        batch: batch size per device type; a device type it does not list does not run the shape
            at full size (its groups are skipped with the reason; ``--quick`` runs everywhere).
        quick: ``(B, H, Nq, Nk, D, Dv)`` for ``--quick`` runs and tests.
        source: where the shape comes from.
        cls_probs: the call also returns the CLS row's probabilities (adaptive token sampling).
        window: windowed attention (``attend(..., window=...)``) on the raster tokens of its grid;
            ``Nq = Nk = H*W`` and each query attends to ``window.tokens`` keys.
        quick_window: the window of the ``quick`` size.
    """

    name: str
    heads: int
    nq: int
    nk: int
    head_dim: int
    value_dim: Optional[int] = None
    bias: str = "none"
    batch: tuple = (("cpu", 8), ("cuda", 64))
    quick: tuple = (1, 2, 16, 16, 16, 16)
    source: str = ""
    cls_probs: bool = False
    window: Optional[Window] = None
    quick_window: Optional[Window] = None

    def dims(self, device: str, quick: bool = False, batch_size: Optional[int] = None) -> tuple:
        """``(B, H, Nq, Nk, D, Dv)`` for a device."""
        if quick:
            B, H, Nq, Nk, D, Dv = self.quick
        else:
            per_device = dict(self.batch)
            B = per_device.get(torch.device(device).type, next(iter(per_device.values())))
            H, Nq, Nk, D, Dv = self.heads, self.nq, self.nk, self.head_dim, self.value_dim or self.head_dim
        return (batch_size or B, H, Nq, Nk, D, Dv)

    def window_for(self, quick: bool = False) -> Optional[Window]:
        """The window of the full or the ``quick`` size (None: global attention)."""
        return self.quick_window if quick else self.window

    def keys_per_query(self, dims: tuple, quick: bool = False) -> int:
        """Keys each query attends to: ``Nk``, or the window's tokens."""
        window = self.window_for(quick)
        return dims[3] if window is None else window.tokens

    def skip_reason(self, device: str, quick: bool = False) -> Optional[str]:
        """Why the shape does not run on ``device`` at this size (None: it runs)."""
        kind = torch.device(device).type
        if quick or kind in dict(self.batch):
            return None
        sizes = ", ".join(f"batch {b} on {d}" for d, b in self.batch)
        return (f"{self.name} is sized for {sizes}, not for {kind} (--quick runs it at a tiny size); "
                f"{self.source.split(':')[0]}")


ATTENTION_SHAPES = [
    AttentionShape("vit_s16_224", 6, 197, 197, 64, batch=(("cpu", 8), ("cuda", 64)),
                   quick=(2, 2, 17, 17, 16, 16), source="ViT-S/16 at 224 px: 196 patches + CLS, 6 heads of 64"),
    AttentionShape("vit_b16_224", 12, 197, 197, 64, batch=(("cpu", 8), ("cuda", 64)),
                   quick=(1, 3, 17, 17, 16, 16), source="ViT-B/16 at 224 px: 12 heads of 64"),
    AttentionShape("vit_l16_384", 16, 577, 577, 64, batch=(("cpu", 2), ("cuda", 32)),
                   quick=(1, 2, 33, 33, 16, 16), source="ViT-L/16 at 384 px: 576 patches + CLS, 16 heads of 64"),
    AttentionShape("levit_256_stage1", 4, 196, 196, 32, 64, bias="relpos", batch=(("cpu", 8), ("cuda", 256)),
                   quick=(2, 2, 16, 16, 8, 16),
                   source="LeViT-256 stage 1: 14x14 map, 4 heads, key dim 32, value dim 64, trainable "
                          "relative-position table [196, 4] gathered by |dy|*14+|dx|"),
    AttentionShape("levit_256_stage2", 6, 49, 49, 32, 64, bias="relpos", batch=(("cpu", 32), ("cuda", 256)),
                   quick=(2, 2, 16, 16, 8, 16),
                   source="LeViT-256 stage 2: 7x7 map, 6 heads, key dim 32, value dim 64, trainable "
                          "relative-position table [49, 6] gathered by |dy|*7+|dx|"),
    AttentionShape("levit_256_stage3", 8, 16, 16, 32, 64, bias="relpos", batch=(("cpu", 32), ("cuda", 256)),
                   quick=(2, 2, 16, 16, 8, 16),
                   source="LeViT-256 stage 3: 4x4 map, 8 heads, key dim 32, value dim 64, trainable "
                          "relative-position table [16, 8] gathered by |dy|*4+|dx|"),
    AttentionShape("cvt_13_stage1", 1, 3136, 784, 64, batch=(("cpu", 2), ("cuda", 64)),
                   quick=(1, 1, 64, 16, 16, 16),
                   source="CvT-13 stage 1: 56x56 queries, keys/values from a stride-2 conv projection (28x28)"),
    AttentionShape("twins_svt_s_gsa_stage1", 2, 3136, 49, 32, batch=(("cpu", 2), ("cuda", 64)),
                   quick=(1, 2, 64, 4, 16, 16),
                   source="Twins-SVT-S stage 1 global sub-sampled attention: 56x56 queries, 7x7 keys"),
    AttentionShape("ats_vit_s_cls_probs", 6, 197, 197, 64, batch=(("cpu", 8), ("cuda", 64)), cls_probs=True,
                   quick=(2, 2, 17, 17, 16, 16),
                   source="ATS-ViT-S sampling layer: the vit_s16_224 call plus the CLS row's probabilities "
                          "(compare with vit_s16_224 for the cost of the extra output)"),
    AttentionShape("ats_keypad", 6, 129, 129, 64, bias="padding", batch=(("cpu", 8), ("cuda", 64)),
                   quick=(2, 2, 17, 17, 16, 16),
                   source="ATS-ViT-S after token sampling: 128 tokens + CLS, 6 heads, per-image key padding"),
    AttentionShape("vit_b16_1024", 12, 4096, 4096, 64, batch=(("cpu", 1), ("cuda", 4)),
                   quick=(1, 2, 64, 64, 16, 16), source="ViT-B/16 at 1024 px: 4096 tokens, 12 heads of 64"),
]


def _windowed(name: str, heads: int, head_dim: int, bias: str, window: Window, quick_window: Window, source: str,
              batch: tuple = (("cpu", 2), ("cuda", 64))) -> AttentionShape:
    n, nq = window.seq_len, quick_window.seq_len
    return AttentionShape(name, heads, n, n, head_dim, bias=bias, batch=batch, quick=(1, 2, nq, nq, 16, 16),
                          source=source, window=window, quick_window=quick_window)


_SWIN_BATCH = (("cuda", 64),)  # the full-size Swin-T stages are a GPU benchmark (the target shape)
_QUICK_SHIFTED = Window(grid=(8, 8), size=(4, 4), shift=(2, 2))
_QUICK_PLAIN = Window(grid=(8, 8), size=(4, 4))
_QUICK_DILATED = Window(grid=(8, 8), size=(4, 4), dilation=(2, 2))

# Windowed attention (``fastvit bench --windows``), each at the first stage of its model at 224 px unless
# named otherwise. Contenders: every backend through attend(..., window=...), plus "einops" (the windows cut
# the way the models did before Window: roll, rearrange, expanded mask, SDPA, rearrange back, roll back).
WINDOW_SHAPES = [
    _windowed("swin_t_stage1", 3, 32, "relpos", Window(grid=(56, 56), size=(7, 7), shift=(3, 3)), _QUICK_SHIFTED,
              "Swin-T stage 1 (shifted block): 56x56 tokens, 7x7 windows shifted by 3, 3 heads of 32, relative "
              "table [169, 3]", batch=_SWIN_BATCH),
    _windowed("swin_t_stage2", 6, 32, "relpos", Window(grid=(28, 28), size=(7, 7), shift=(3, 3)), _QUICK_SHIFTED,
              "Swin-T stage 2 (shifted block): 28x28 tokens, 7x7 windows shifted by 3, 6 heads of 32",
              batch=_SWIN_BATCH),
    _windowed("swin_t_stage3", 12, 32, "relpos", Window(grid=(14, 14), size=(7, 7), shift=(3, 3)), _QUICK_SHIFTED,
              "Swin-T stage 3 (shifted block): 14x14 tokens, 7x7 windows shifted by 3, 12 heads of 32",
              batch=_SWIN_BATCH),
    _windowed("swin_t_stage4", 24, 32, "relpos", Window(grid=(7, 7), size=(7, 7)), Window(grid=(4, 4), size=(4, 4)),
              "Swin-T stage 4: 7x7 tokens, one 7x7 window (no shift: the window covers the map), 24 heads of 32",
              batch=_SWIN_BATCH),
    _windowed("maxvit_t_block", 2, 32, "relpos", Window(grid=(56, 56), size=(7, 7)), _QUICK_PLAIN,
              "MaxViT-T stage 1 block attention: 56x56 tokens, 7x7 windows, 2 heads of 32, relative table"),
    _windowed("maxvit_t_grid", 2, 32, "relpos", Window(grid=(56, 56), size=(7, 7), dilation=(8, 8)), _QUICK_DILATED,
              "MaxViT-T stage 1 grid attention: 56x56 tokens, a 7x7 grid (tokens 8 apart), 2 heads of 32"),
    _windowed("crossformer_s_short", 3, 32, "dense", Window(grid=(56, 56), size=(7, 7)), _QUICK_PLAIN,
              "CrossFormer-S stage 1 short distance: 56x56 tokens, 7x7 groups, 3 heads of 32, dynamic position "
              "bias [3, 49, 49]"),
    _windowed("crossformer_s_long", 3, 32, "dense", Window(grid=(56, 56), size=(7, 7), dilation=(8, 8)),
              _QUICK_DILATED, "CrossFormer-S stage 1 long distance: 56x56 tokens, interval 8 (7x7 groups of "
              "tokens 8 apart), 3 heads of 32, dynamic position bias [3, 49, 49]"),
    _windowed("twins_svt_s_lsa", 2, 32, "none", Window(grid=(56, 56), size=(7, 7)), _QUICK_PLAIN,
              "Twins-SVT-S stage 1 locally-grouped attention: 56x56 tokens, 7x7 windows, 2 heads of 32"),
    _windowed("nest_t_block", 3, 32, "none", Window(grid=(56, 56), size=(14, 14)), _QUICK_PLAIN,
              "NesT-T (the seed README's) bottom level: 56x56 tokens in 4x4 blocks of 14x14, 3 heads of 32"),
]


def _relpos_index(nq: int, nk: int, device: str) -> tuple:
    """A LeViT-style index ``|dy| * w + |dx|`` for square maps, and the table length it needs."""
    side_q, side_k = math.isqrt(nq), math.isqrt(nk)
    if side_q * side_q == nq and side_k * side_k == nk and side_q == side_k:
        ys, xs = torch.meshgrid(torch.arange(side_q), torch.arange(side_q), indexing="ij")
        pts = torch.stack((ys.flatten(), xs.flatten()), dim=-1)  # (n, 2)
        rel = (pts[:, None, :] - pts[None, :, :]).abs()  # (nq, nk, 2)
        return (rel[..., 0] * side_q + rel[..., 1]).to(device), side_q * side_q
    g = torch.Generator().manual_seed(1)
    T = 2 * max(nq, nk) + 1
    return torch.randint(0, T, (nq, nk), generator=g).to(device), T


def attention_inputs(dims: tuple, bias: str, device: str, dtype: torch.dtype, *, requires_grad: bool = False,
                     seed: int = 0, window: Optional[Window] = None) -> tuple:
    """``(q, k, v, make_bias)`` for a shape; ``make_bias()`` builds the call's bias descriptors fresh,
    as a model does on every forward (the descriptors are cheap; their tensors are fixed). With a
    ``window``, the biases are window-local (``[n, n]`` positions)."""
    B, H, Nq, Nk, D, Dv = dims
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    q, k, v = rand(B, H, Nq, D), rand(B, H, Nk, D), rand(B, H, Nk, Dv)
    if window is not None and bias == "relpos":
        from fastvit.layers import window_relative_position_index

        (wh, ww), index = window.size, window_relative_position_index(window.size).to(device)
        table = rand((2 * wh - 1) * (2 * ww - 1), H)
        return q, k, v, (lambda: RelPosBias(table, index))
    if bias == "dense":
        n = window.tokens if window is not None else None
        dense = rand(H, n, n) if n is not None else rand(1, H, Nq, Nk)
        return q, k, v, (lambda: DenseBias(dense))
    if bias == "relpos":
        index, T = _relpos_index(Nq, Nk, device)
        table = rand(T, H)
        return q, k, v, (lambda: RelPosBias(table, index))
    if bias == "padding":
        # Image i keeps a different number of tokens, as adaptive token sampling leaves them.
        keep = torch.linspace(Nk, max(1, Nk // 2), B).round().long()
        mask = (torch.arange(Nk)[None, :] < keep[:, None]).to(device)
        return q, k, v, (lambda: KeyPaddingMask(mask))
    if bias != "none":
        raise ValueError(f"unknown bias kind {bias!r}")
    return q, k, v, (lambda: None)


def attention_flops(dims: tuple, mode: str = "fwd", keys_per_query: Optional[int] = None) -> float:
    """Matmul FLOPs: ``2*B*H*Nq*Nk*(D + Dv)`` forward; backward counts 2.5x that (FlashAttention's
    convention: five matmuls against two). ``keys_per_query`` replaces ``Nk`` (a window's tokens)."""
    B, H, Nq, Nk, D, Dv = dims
    fwd = 2.0 * B * H * Nq * (keys_per_query or Nk) * (D + Dv)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def attention_bytes(dims: tuple, dtype: torch.dtype, mode: str = "fwd") -> float:
    """The minimal HBM traffic: read q, k, v and write o (backward: read q, k, v, o, dO, write dq, dk, dv)."""
    B, H, Nq, Nk, D, Dv = dims
    size = torch.finfo(dtype).bits // 8
    q, k, v, o = B * H * Nq * D, B * H * Nk * D, B * H * Nk * Dv, B * H * Nq * Dv
    fwd = q + k + v + o
    bwd = 2 * (q + k + v) + 2 * o
    return float(size * (fwd + (bwd if mode == "fwd+bwd" else 0)))


# Nominal dense tensor-core peaks (TFLOP/s, datasheet, no sparsity) for the "% of peak" column, by a
# substring of torch.cuda.get_device_name(). 16-bit = bf16/fp16 tensor cores; fp32 = plain CUDA-core FMA
# (fastvit's fp32 path; TF32 when torch.backends.cuda.matmul.allow_tf32 is set is not counted here).
PEAK_TFLOPS = (
    ("H200", {"16bit": 989.4, "fp32": 66.9}),
    ("H100 PCIe", {"16bit": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"16bit": 835.0, "fp32": 60.0}),
    ("H100", {"16bit": 989.4, "fp32": 66.9}),
    ("A100", {"16bit": 312.0, "fp32": 19.5}),
    ("L40S", {"16bit": 362.1, "fp32": 91.6}),
    ("A10G", {"16bit": 70.0, "fp32": 31.2}),
    ("RTX 4090", {"16bit": 165.2, "fp32": 82.6}),
)


# Nominal HBM bandwidth (GB/s, datasheet) for the "% of HBM" column of memory-bound calls (windowed
# attention: q, k, v and o each cross HBM once), by a substring of torch.cuda.get_device_name().
PEAK_HBM_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
)


def peak_gbps(device: str) -> Optional[float]:
    """The device's nominal HBM bandwidth in GB/s (None on the CPU and unknown GPUs)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((gbps for key, gbps in PEAK_HBM_GBPS if key in name), None)


def peak_tflops(device: str, dtype: torch.dtype) -> Optional[float]:
    """The device's nominal dense peak for matmuls in ``dtype`` (None on the CPU and unknown GPUs)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks["fp32" if dtype == torch.float32 else "16bit"]
    return None


