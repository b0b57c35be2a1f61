"""The triton import shared by the kernel files: this package imports (and defines its kernels as
plain functions) without triton; ``TRITON_IMPORT_ERROR`` then says why the launchers cannot run."""
from __future__ import annotations

from typing import Optional

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
    TRITON_VERSION: str = triton.__version__
except ImportError as _e:  # the references and the capability checks still work without triton
    TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"
    TRITON_VERSION = ""

    class _TritonStub:
        """Lets the kernel files import without triton: ``@triton.jit`` returns the function."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _TritonStub()

__all__ = ["triton", "tl", "TRITON_IMPORT_ERROR", "TRITON_VERSION"]
