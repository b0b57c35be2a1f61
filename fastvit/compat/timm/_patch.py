"""The class swap behind ``patch_timm``: a table from timm classes to fastvit subclasses.

A patched module keeps its object, parameters, buffers and state_dict keys; only ``__class__``
changes, to a subclass of the exact timm class (so ``isinstance`` holds, and pickling / deepcopy
find the subclass by its import path). A subclass's ``forward`` builds q, k, v as timm does and
calls ``attend()``; call arguments it has no mapping for go to timm's own ``forward``
(``fallback``), counted per module so the summary can say so.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["Patched", "patches", "refuses", "PATCHES", "REFUSED", "KINDS"]

PATCHES: dict = {}  # timm class -> fastvit subclass
REFUSED: dict = {}  # timm class -> the reason it is left as timm's
KINDS = ("attention", "block", "linear", "mlp")  # "linear" / "mlp" only with patch_timm(..., linear=True)

FALLBACKS = "_fastvit_fallbacks"  # instance attribute: {reason: calls}
CACHE = "_fastvit_cache"  # instance attribute: derived tensors (``Patched.derived``)


class Patched:
    """Mixin of every fastvit subclass of a timm module.

    Class attributes set by ``@patches``: ``timm_class`` (the class it replaces) and ``kind``.
    """

    timm_class: type = None
    kind: str = "attention"

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        """Whether the patch has anything to do for this instance (False: skipped, not reported)."""
        return True

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        """Why this module instance cannot be patched (None: it can); the summary reports it as refused.
        Checked once, at patch time."""
        return None

    def attn_dropout(self) -> float:
        """timm's probability dropout as ``attend``'s ``dropout_p`` (off in eval)."""
        return self.attn_drop.p if self.training else 0.0

    def fallback(self, reason: str, *args, _method: str = "forward", **kwargs):
        """Run timm's own ``forward`` (or ``_method``) for a call fastvit has no mapping for; count it."""
        if not torch.compiler.is_compiling():
            counts = self.__dict__.setdefault(FALLBACKS, {})
            counts[reason] = counts.get(reason, 0) + 1
        return getattr(self.timm_class, _method)(self, *args, **kwargs)

    def derived(self, key: str, sources: tuple, build: Callable[[], Tensor]) -> Tensor:
        """A tensor derived from buffers (an index), kept on the module until a source changes
        (identity, device, in-place version); never pickled."""
        stamp = tuple((id(t), t.device, -1 if t.is_inference() else t._version) for t in sources)
        cache = self.__dict__.setdefault(CACHE, {})
        hit = cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = cache[key] = (stamp, build())
        return hit[1]

    def __getstate__(self):
        state = super().__getstate__()  # a copy of __dict__
        state.pop(CACHE, None)
        return state


def patches(timm_class: type, kind: str = "attention"):
    """Class decorator: the decorated ``Patched`` subclass replaces ``timm_class`` (exact type)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def register(cls: type) -> type:
        if not (issubclass(cls, Patched) and issubclass(cls, timm_class)):
            raise TypeError(f"{cls.__name__} must subclass Patched and {timm_class.__name__}")
        if timm_class in PATCHES:
            raise ValueError(f"{timm_class.__module__}.{timm_class.__qualname__} is already patched by "
                             f"{PATCHES[timm_class].__module__}.{PATCHES[timm_class].__qualname__}")
        cls.timm_class, cls.kind = timm_class, kind
        PATCHES[timm_class] = cls
        _register_notrace(cls)
        return cls

    return register


def refuses(timm_class: type, reason: str) -> None:
    """Declare a timm class that is left as timm's, with the reason the summary shows."""
    REFUSED[timm_class] = reason


def _register_notrace(cls: type) -> None:
    # torch.fx (timm's feature extraction) cannot trace attend()'s input checks, nor the CPU fast
    # path of fastvit's Linear; as leaves of timm's tracer they are called, not traced.
    from timm.layers import register_notrace_module

    register_notrace_module(cls)
