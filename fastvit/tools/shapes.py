"""Attention calls shaped like the layers of real models (``vit_b16_224``, ``levit_256_stage2``, ...),
their inputs, FLOP and byte counts, and the devices' nominal peaks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fastvit.attention import KeyPaddingMask, RelPosBias


@dataclass(frozen=True)
class AttentionShape:
    """An attention call shaped like the layer of a real model.

    Args:
        name: ``<model>_<where>``.
        heads, nq, nk, head_dim, value_dim: the call's sizes (``value_dim`` defaults to ``head_dim``).
        bias: ``"none"``, ``"relpos"`` (a ``[T, H]`` table gathered by a 2-D relative index) or
            ``"padding"`` (a key-padding mask, as after adaptive token sampling).
        batch: batch size per device type (a CPU gets a smaller one).
        quick: ``(B, H, Nq, Nk, D, Dv)`` for ``--quick`` runs and tests.
        source: where the shape comes from.
        cls_probs: the call also returns the CLS row's probabilities (adaptive token sampling).
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

    def dims(self, device: str, quick: bool = False, batch_size: Optional[int] = None) -> tuple:
        """``(B, H, Nq, Nk, D, Dv)`` for a device."""
        if quick:
            B, H, Nq, Nk, D, Dv = self.quick
        else:
            per_device = dict(self.batch)
            B = per_device.get(torch.device(device).type, per_device["cpu"])
            H, Nq, Nk, D, Dv = self.heads, self.nq, self.nk, self.head_dim, self.value_dim or self.head_dim
        return (batch_size or B, H, Nq, Nk, D, Dv)


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
                     seed: int = 0) -> tuple:
    """``(q, k, v, make_bias)`` for a shape; ``make_bias()`` builds the call's bias descriptors fresh,
    as a model does on every forward (the descriptors are cheap; their tensors are fixed)."""
    B, H, Nq, Nk, D, Dv = dims
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    q, k, v = rand(B, H, Nq, D), rand(B, H, Nk, D), rand(B, H, Nk, Dv)
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


def attention_flops(dims: tuple, mode: str = "fwd") -> float:
    """Matmul FLOPs: ``2*B*H*Nq*Nk*(D + Dv)`` forward; backward counts 2.5x that (FlashAttention's
    convention: five matmuls against two)."""
    B, H, Nq, Nk, D, Dv = dims
    fwd = 2.0 * B * H * Nq * Nk * (D + Dv)
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


def peak_tflops(device: str, dtype: torch.dtype) -> Optional[float]:
    """The device's nominal dense peak for matmuls in ``dtype`` (None on the CPU and unknown GPUs)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks["fp32" if dtype == torch.float32 else "16bit"]
    return None


