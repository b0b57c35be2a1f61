"""Attention test cases generated from what each backend declares (after xformers' fmha tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastvit.attention import DenseBias, RelPosBias
from fastvit.check import fp32_copy, make_case_inputs  # noqa: F401  (fp32_copy re-exported for the tests)

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (B, H, Nq, Nk, D, Dv): vision-awkward sizes (1, 49, 50, 197), head dims 8..80, Nq != Nk, Dv != D.
SHAPES = [
    (2, 3, 1, 1, 8, 8),
    (2, 3, 49, 49, 32, 32),
    (1, 2, 50, 50, 48, 48),
    (1, 2, 197, 197, 64, 64),
    (2, 2, 16, 50, 80, 80),      # reduced KV is Nq > Nk; here Nq < Nk (subsampled queries)
    (2, 2, 49, 196, 16, 64),     # LeViT attention-subsample: key dim 16, value dim 64
    (2, 2, 1, 50, 32, 32),       # class attention
    (1, 2, 64, 16, 32, 32),      # reduced KV (CvT / Twins GSA)
]
BIAS_KINDS = ["none", "relpos", "dense", "dense_bcast", "padding", "relpos+padding"]


@dataclass(frozen=True)
class Case:
    backend: str
    device: str
    dtype: torch.dtype
    shape: tuple
    bias: str

    @property
    def id(self) -> str:
        B, H, Nq, Nk, D, Dv = self.shape
        n = f"N{Nq}" if Nq == Nk else f"Nq{Nq}-Nk{Nk}"
        dv = "" if Dv == D else f"-Dv{Dv}"
        return f"{self.backend}-{self.device}-{DTYPE_NAMES[self.dtype]}-B{B}-H{H}-{n}-D{D}{dv}-{self.bias}"


def make_inputs(case: Case, *, requires_grad: bool = True, seed: int = 0):
    """q, k, v and the bias descriptors for a case (the same generator `fastvit check` uses)."""
    return make_case_inputs(case, requires_grad=requires_grad, seed=seed)


def trainable(q, k, v, bias) -> list:
    out = [q, k, v]
    for b in bias:
        if isinstance(b, RelPosBias):
            out.append(b.table)
        elif isinstance(b, DenseBias):
            out.append(b.tensor)
    return out


def generate(backends: dict, device: str = "cpu") -> list:
    """Every case a backend declares it supports on ``device``."""
    from fastvit.attention.bias import DenseBias as _D
    from fastvit.attention.bias import KeyPaddingMask as _K
    from fastvit.attention.bias import RelPosBias as _R

    kinds_needed = {"none": (), "relpos": (_R,), "dense": (_D,), "dense_bcast": (_D,), "padding": (_K,),
                    "relpos+padding": (_R, _K)}
    cases = []
    for name, backend in backends.items():
        if device not in backend.devices:
            continue
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            # The reference's fp32 path is the oracle itself; its low-precision paths are tested.
            if dtype not in backend.dtypes or (name == "reference" and dtype == torch.float32):
                continue
            for shape in SHAPES:
                if backend.max_head_dim is not None and max(shape[4], shape[5]) > backend.max_head_dim:
                    continue
                for bias in BIAS_KINDS:
                    if not all(issubclass(k, backend.bias_types) for k in kinds_needed[bias]):
                        continue
                    cases.append(Case(name, device, dtype, shape, bias))
    return cases
