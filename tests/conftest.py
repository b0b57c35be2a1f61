import os
import sys

import pytest
import torch

# Without CUDA the Triton kernels run in the interpreter; this must be set before fastvit.kernels
# is first imported (it decides at import whether @triton.jit compiles or interprets).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _isolate_backend_selection():
    """A test that sets a global backend must not leak it into the next test."""
    import fastvit

    yield
    fastvit.set_backend(None)


def pytest_report_header(config):
    import fastvit

    return f"fastvit {fastvit.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
