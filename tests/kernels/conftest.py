"""Kernel tests run on the CPU under the Triton interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before `@triton.jit` runs, i.e. before fastvit.kernels.attention is
imported: this conftest is loaded before the test modules of this directory are imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    _SKIP_REASON = None
except ImportError as e:  # pragma: no cover - triton ships with the dev install on Linux
    _SKIP_REASON = f"triton is not importable ({e}); the kernel tests need it"


def pytest_collection_modifyitems(config, items):
    if _SKIP_REASON is None:
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=_SKIP_REASON))


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernels run: CUDA when present, else the CPU under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    from fastvit.kernels.attention import KERNELS

    if any(type(k).__name__ != "InterpretedFunction" for k in KERNELS.values()):
        pytest.skip("fastvit.kernels was imported before TRITON_INTERPRET=1 was set and there is no CUDA "
                    "device: set TRITON_INTERPRET=1 in the environment")
    return "cpu"
