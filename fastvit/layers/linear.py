"""``Linear``: ``nn.Linear`` with a CPU inference fast path (same parameters, same state_dict).

On a CPU, ViT inference is GEMM-bound (the MLP and projection GEMMs are ~90% of the time). oneDNN
runs these GEMMs 1.15-1.2x faster than the default path when the weight is reordered ("prepacked")
into its blocked layout once, instead of on every call, and it can fuse the exact GELU of the MLP
into the GEMM epilogue. ``Linear`` does both when nothing needs a gradient (``torch.no_grad`` /
``inference_mode``, or a frozen weight with an input that does not require grad):

- the prepacked weight is cached per compute dtype and rebuilt when the weight changes (its
  in-place version counter, storage or dtype), so optimizer steps and ``load_state_dict`` are seen;
- under CPU autocast (bf16) the weight is prepacked in bf16 and the output is bf16, as autocast's
  ``F.linear`` would give (on CPUs whose oneDNN has bf16 GEMMs: AVX512-BW/VL/DQ or AVX-NE-CONVERT;
  elsewhere bf16 keeps ``F.linear``);
- weights under ``PREPACK_MIN_WEIGHT`` elements (e.g. 128 x 128) keep ``F.linear``: oneDNN's ~25 us
  fixed cost per call loses to it there (measured: 0.3-0.9x at 16x32x64 .. 1024x64x128, 1.06x at
  512x256x256, 1.2-1.5x from 384 x 1000 up, whatever the batch);
- the cache holds one prepacked copy per compute dtype, so a model used both in fp32 and under
  bf16 autocast does not re-pack on every switch;
- training, CUDA, ``torch.compile`` (which does its own weight packing with freezing) and any other
  case use ``F.linear``. Results match ``F.linear`` to fp32 rounding (~1e-6);
- tracing and export (``torch.jit.trace``, ``torch.onnx.export`` legacy or dynamo, ``torch.export``,
  ``torch.fx``) use ``F.linear`` on the same weights: a traced graph must hold portable ops, not
  oneDNN's prepacked weight (legacy ONNX export failed on it with "Unsupported value kind: Tensor");
  ``torch.jit.script`` compiles ``forward`` as ``F.linear`` alone (``forward_act`` / ``forward_rows``
  are Python-only).

Set ``FASTVIT_CPU_PREPACK=0`` to turn the fast path off (benchmarks compare both). The cache costs one
extra copy of each weight while a model is used for inference on the CPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import tracing

__all__ = ["Linear", "prepack_enabled", "PREPACK_MIN_WEIGHT"]

_HAS_ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)
# oneDNN's bf16 GEMMs need AVX512-BW/VL/DQ (or AVX-NE-CONVERT); elsewhere (an AVX2-only CPU) bf16
# autocast keeps F.linear, which autocast runs in its own way.
_HAS_ONEDNN_BF16 = (_HAS_ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
                    and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
PREPACK_MIN_WEIGHT = 256 * 256  # in_features * out_features from which the oneDNN path pays off
_ACTIVATIONS = {None: ("none", ""), "gelu": ("gelu", "none")}  # oneDNN post-op name, algorithm ("none" = erf)


def prepack_enabled() -> bool:
    """Whether the oneDNN fast path may be used in this process (read at call time)."""
    return _HAS_ONEDNN_LINEAR and os.environ.get("FASTVIT_CPU_PREPACK", "1") != "0"


class Linear(nn.Linear):
    """Drop-in ``nn.Linear``; ``forward_act(x, "gelu")`` also applies an exact GELU (fused when possible)."""

    _packed: Optional[dict] = None  # (compute dtype, rows) -> (key, packed weight, bias in that dtype)
    __jit_ignored_attributes__ = ["_packed"]  # a Python-only cache: TorchScript cannot type it

    def reset_parameters(self) -> None:
        # A vit-pytorch classifier with num_classes=0 (legacy_num_classes_zero) has no rows to draw; nn.Linear's
        # init would warn about it and draws nothing either, so skipping keeps the random stream the same.
        if self.weight.numel():
            super().reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # the oneDNN cache is Python state: TorchScript gets nn.Linear's GEMM
            return F.linear(x, self.weight, self.bias)
        return self.forward_act(x, None)

    def forward_act(self, x: Tensor, activation: Optional[str] = None) -> Tensor:
        return self._forward(x, activation, None)

    def forward_rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Output features ``start:stop`` alone: ``F.linear(x, weight[start:stop], bias[start:stop])``.

        For a fused projection whose parts are needed for different tokens (ATS needs keys and values
        of every token but queries of the kept ones only). The slice gets its own prepacked copy.
        """
        if not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows {start}:{stop} are not a non-empty range of the {self.out_features} outputs")
        return self._forward(x, None, (start, stop))

    def _forward(self, x: Tensor, activation: Optional[str], rows: Optional[tuple]) -> Tensor:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        dtype = self._fast_path_dtype(x, rows)
        if dtype is None:
            weight, bias = self.weight, self.bias
            if rows is not None:
                weight = weight[rows[0]:rows[1]]
                bias = None if bias is None else bias[rows[0]:rows[1]]
            out = F.linear(x, weight, bias)
            return F.gelu(out) if activation == "gelu" else out
        weight, bias = self._prepacked(dtype, rows)
        post_op, algorithm = _ACTIVATIONS[activation]
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, post_op, [], algorithm)

    def _fast_path_dtype(self, x: Tensor, rows: Optional[tuple] = None) -> Optional[torch.dtype]:
        """The compute dtype of the oneDNN path, or None where ``F.linear`` must run."""
        if tracing():  # first: under torch.fx, ``x`` is a Proxy that cannot answer the checks below
            return None
        if x.device.type != "cpu" or self.weight.device.type != "cpu" or x.dim() < 2 or not prepack_enabled():
            return None
        out_features = self.out_features if rows is None else rows[1] - rows[0]
        if self.in_features * out_features < PREPACK_MIN_WEIGHT:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype not in (torch.float32, torch.bfloat16) or self.weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        if dtype == torch.bfloat16 and not _HAS_ONEDNN_BF16:
            return None
        return dtype

    def _prepacked(self, dtype: torch.dtype, rows: Optional[tuple] = None) -> tuple:
        w, b = self.weight, self.bias
        key = (dtype, w.dtype, w.data_ptr(), _version(w), None if b is None else _version(b))
        if self._packed is None:
            self._packed = {}
        cached = self._packed.get((dtype, rows))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                w, b = w.detach(), None if b is None else b.detach()
                if rows is not None:
                    w, b = w[rows[0]:rows[1]], None if b is None else b[rows[0]:rows[1]]
                packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous(), batch_size=None)
                bias = None if b is None else b.to(dtype).contiguous()
            cached = self._packed[(dtype, rows)] = (key, packed, bias)
        return cached[1], cached[2]

    def __getstate__(self):
        # The oneDNN copy is a cache: never pickle or deep-copy it.
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def _version(t: Tensor) -> int:
    """The in-place version counter; inference tensors (built under inference_mode) have none."""
    return -1 if t.is_inference() else t._version
