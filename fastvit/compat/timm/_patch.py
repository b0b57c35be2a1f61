"""The class swap behind ``patch_timm``: a table from timm classes to fastvit subclasses.

A patched module keeps its object, parameters, buffers and state_dict keys; only ``__class__``
changes, to a subclass of the exact timm class (so ``isinstance`` holds, and pickling / deepcopy
find the subclass by its import path). A subclass's ``forward`` builds q, k, v as timm does and
calls ``attend()``; call arguments it has no mapping for go to timm's own ``forward``
(``fallback``), counted per module so the summary can say so.

TorchScript: ``attend()``'s dispatch (descriptors, plans, backend objects) is Python that TorchScript
cannot compile, so each method a fastvit subclass overrides starts with
``if torch.jit.is_scripting(): return self._timm_<method>(...)``. TorchScript compiles only that
branch (``is_scripting()`` is a compile-time True there and the code after the ``return`` is never
compiled): a scripted patched model runs timm's own computation, the eager model fastvit's.
``_timm_<method>`` is timm's function under another name, set by ``@patches``: TorchScript compiles a
called method under its ``__name__`` on the module's class, where ``forward`` is taken already (calling
``TimmClass.forward(self, ...)`` fails with "Can't redefine method: forward"). Nothing is swapped or
copied at scripting time (no ``__prepare_scriptable__``), so scripting never touches the eager model.
"""

from __future__ import annotations

import inspect
import types
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["Patched", "patches", "refuses", "PATCHES", "REFUSED", "KINDS"]

PATCHES: dict = {}  # timm class -> fastvit subclass
REFUSED: dict = {}  # timm class -> the reason it is left as timm's
KINDS = ("attention", "block", "model", "linear", "mlp")  # "linear" / "mlp" only with patch_timm(..., linear=True)

FALLBACKS = "_fastvit_fallbacks"  # instance attribute: {reason: calls}
CACHE = "_fastvit_cache"  # instance attribute: derived tensors (``Patched.derived``)


class Patched:
    """Mixin of every fastvit subclass of a timm module.

    Class attributes set by ``@patches``: ``timm_class`` (the class it replaces) and ``kind``.
    """

    timm_class: type = None
    kind: str = "attention"
    __jit_ignored_attributes__ = [FALLBACKS, CACHE]  # Python-only state, never reached by scripted code

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        """Whether the patch has anything to do for this instance (False: skipped, not reported)."""
        return True

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        """Why this module instance cannot be patched (None: it can); the summary reports it as refused.
        Checked once, at patch time."""
        return None

    @classmethod
    def adopt(cls, module: nn.Module) -> None:
        """Called once ``module`` has become a ``cls``: a model-level patch may swap the classes of the
        submodules it drives here (they are patched before ``patch_timm`` reaches them)."""

    def attn_dropout(self) -> float:
        """timm's probability dropout as ``attend``'s ``dropout_p`` (off in eval)."""
        return self.attn_drop.p if self.training else 0.0

    def fallback(self, reason: str, *args, _method: str = "forward", **kwargs):
        """Run timm's own ``forward`` (or ``_method``) for a call fastvit has no mapping for; count it."""
        self.count_fallback(reason)
        return getattr(self.timm_class, _method)(self, *args, **kwargs)

    def count_fallback(self, reason: str) -> None:
        """Count a call served by a slower path than this patch's best, for ``patch_summary``."""
        if not torch.compiler.is_compiling():
            counts = self.__dict__.setdefault(FALLBACKS, {})
            counts[reason] = counts.get(reason, 0) + 1

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
        for name in _overridden(cls, timm_class):
            setattr(cls, f"_timm_{name}", _renamed(getattr(timm_class, name), f"_timm_{name}"))
        # TorchScript types a module's attributes by the annotations of the first annotated class it meets
        # (here Patched's own): show it the timm class's (LeViT's ``attention_bias_cache: Dict[str, Tensor]``).
        cls.__annotations__ = _annotations(timm_class)
        # and it reads the first __jit_ignored_attributes__ it finds: ours, and those of the classes below
        cls.__jit_ignored_attributes__ = sorted({a for k in cls.__mro__ for a in vars(k).get(
            "__jit_ignored_attributes__", ())})
        PATCHES[timm_class] = cls
        _register_notrace(cls)
        return cls

    return register


def _overridden(cls: type, timm_class: type) -> list:
    """The timm methods that fastvit's side of ``cls`` (its ``Patched`` classes) overrides."""
    ours = {name for k in cls.__mro__ if issubclass(k, Patched) and k is not Patched for name in vars(k)}
    return sorted(name for name in ours if not name.startswith("__")
                  and isinstance(getattr(timm_class, name, None), types.FunctionType)
                  and getattr(timm_class, name) is not getattr(nn.Module, name, None))


def _annotations(timm_class: type) -> dict:
    """The attribute annotations TorchScript reads for an unpatched ``timm_class`` module."""
    for k in timm_class.__mro__:
        found = inspect.get_annotations(k) if hasattr(inspect, "get_annotations") else vars(k).get("__annotations__")
        if found:
            return dict(found)
    return {}


def _renamed(fn: types.FunctionType, name: str) -> types.FunctionType:
    """``fn`` (a timm method: its code, globals and defaults) under the name ``name``, for TorchScript."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__annotations__ = fn.__kwdefaults__, dict(fn.__annotations__)
    copy.__module__, copy.__doc__ = fn.__module__, fn.__doc__
    copy.__qualname__ = f"{fn.__qualname__.rpartition('.')[0]}.{name}"
    return copy


def refuses(timm_class: type, reason: str) -> None:
    """Declare a timm class that is left as timm's, with the reason the summary shows."""
    REFUSED[timm_class] = reason


def _register_notrace(cls: type) -> None:
    # torch.fx (timm's feature extraction) cannot trace attend()'s input checks, nor the CPU fast
    # path of fastvit's Linear; as leaves of timm's tracer they are called, not traced.
    from timm.layers import register_notrace_module

    register_notrace_module(cls)
