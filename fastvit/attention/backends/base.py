"""What every attention backend declares (after xformers' ``ops/fmha``).

A backend is a class with its capabilities as class attributes and one question to answer:
``not_supported_reasons(inputs) -> list[str]``, plain sentences a user can act on. An empty list
means it can serve the call. A backend whose library is missing is unavailable with a reason,
never an import error.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch

from ..bias import DenseBias, KeyBias, KeyPaddingMask, RelPosBias
from ..inputs import AttnInputs, AttnOutput, dtype_name

__all__ = ["Backend", "dtype_name"]



class Backend:
    """Base class: capabilities and the generic checks derived from them."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    devices: ClassVar[tuple] = ("cpu", "cuda")
    dtypes: ClassVar[tuple] = (torch.float32, torch.float16, torch.bfloat16)
    max_head_dim: ClassVar[Optional[int]] = None
    min_head_dim: ClassVar[int] = 1
    min_head_dim_by_device: ClassVar[dict] = {}  # device type -> a stricter minimum there
    bias_types: ClassVar[tuple] = (RelPosBias, DenseBias, KeyBias, KeyPaddingMask)
    supports_backward: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = True
    supports_probs: ClassVar[bool] = False  # return_probs (full maps) and head mixing
    supports_cls_probs: ClassVar[bool] = False
    supports_window: ClassVar[bool] = False  # window=Window(...) (shifted / dilated windows of a grid)
    supports_packed: ClassVar[bool] = False  # packed=Packed(...) (variable-length sequences, no padding)
    supports_packed_bias: ClassVar[bool] = True  # with supports_packed: biases over the packed tokens too
    # Bias gradients bitwise reproducible run to run off the CPU. Under torch.use_deterministic_algorithms
    # a backend that says False refuses calls whose bias takes a gradient (CPU backwards are serial).
    deterministic: ClassVar[bool] = True
    # (atol, rtol) against the reference on fp32 copies, per input dtype.
    tolerances: ClassVar[dict] = {
        torch.float32: (2e-5, 2e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1.6e-2, 1.6e-2),
    }

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """Whether the backend can run at all in this process, and if not, why."""
        return True, ""

    @classmethod
    def not_supported_reasons(cls, inp: AttnInputs) -> list[str]:
        ok, why = cls.availability()
        if not ok:
            return [why]
        reasons = []
        if inp.device_type not in cls.devices:
            reasons.append(f"device {inp.device_type} is not supported (supports {', '.join(cls.devices)})")
        if inp.dtype not in cls.dtypes:
            names = ", ".join(dtype_name(d) for d in cls.dtypes)
            reasons.append(f"dtype {dtype_name(inp.dtype)} is not supported (supports {names})")
        widest = max(inp.head_dim, inp.value_dim)
        if cls.max_head_dim is not None and widest > cls.max_head_dim:
            reasons.append(f"head_dim={widest} > {cls.max_head_dim}")
        least = cls.min_head_dim_on(inp.device_type)
        if min(inp.head_dim, inp.value_dim) < least:
            reasons.append(f"head_dim={inp.head_dim}, value head dim={inp.value_dim}: {cls.name} on "
                           f"{inp.device_type} needs both >= {least}")
        for b in inp.bias:
            if not isinstance(b, cls.bias_types):
                reasons.append(f"{type(b).__name__} is not supported")
        if inp.window is not None and not cls.supports_window:
            reasons.append(f"windowed attention ({inp.window.describe()}) is not supported")
        if inp.packed is not None and not cls.supports_packed:
            reasons.append(f"packed variable-length sequences ({inp.packed.describe()}) are not supported by "
                           f"{cls.name} yet")
        if inp.dropout_p > 0 and not cls.supports_dropout:
            reasons.append("attention dropout is not supported")
        if inp.return_probs and not cls.supports_probs:
            reasons.append(f"return_probs needs the full probabilities; {cls.name} never materialises them")
        if inp.head_mix is not None and not cls.supports_probs:
            reasons.append(f"head mixing (talking heads / re-attention) needs materialised probabilities; "
                           f"{cls.name} never materialises them")
        if inp.return_cls_probs and not (cls.supports_cls_probs or cls.supports_probs):
            reasons.append(f"return_cls_probs needs the probabilities; {cls.name} never returns them")
        if (not cls.deterministic and inp.device_type != "cpu" and torch.are_deterministic_algorithms_enabled()
                and inp.bias_needs_grad):
            reasons.append(f"deterministic algorithms are enabled and a bias tensor requires grad: {cls.name} "
                           "accumulates bias gradients with atomic adds; detach the bias or use the triton or "
                           "reference backend")
        if inp.needs_grad and not cls.supports_backward:
            reasons.append("backward is not supported and an input requires grad")
        reasons.extend(cls.extra_reasons(inp))
        return reasons

    @classmethod
    def min_head_dim_on(cls, device_type: str) -> int:
        return cls.min_head_dim_by_device.get(device_type, cls.min_head_dim)

    @classmethod
    def extra_reasons(cls, inp: AttnInputs) -> list[str]:
        """Backend-specific refusals on top of the declared capabilities."""
        return []

    @classmethod
    def forward(cls, inp: AttnInputs) -> AttnOutput:
        raise NotImplementedError

    @classmethod
    def runner(cls, inp: AttnInputs) -> Callable:
        """A function ``run(q, k, v, bias, head_mix)`` serving every later call with ``inp``'s signature
        (``plan.py``), returning what ``attend`` returns: the output, or the ``AttnOutput`` when extra
        outputs were asked for. It must hold no tensor of ``inp``.

        This default rebuilds the inputs and calls ``forward`` (looked up per call, so a patched
        ``forward`` takes effect); a backend overrides it where a signature lets it skip work.
        """
        static, extras = inp.static_fields(), inp.return_probs or inp.return_cls_probs

        def run(q, k, v, bias, head_mix):
            result = cls.forward(AttnInputs.of_call(q, k, v, bias, head_mix, static))
            return result if extras else result.out

        return run
