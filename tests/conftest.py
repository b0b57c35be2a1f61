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
    """A test that sets a global backend must not leak it into the next test, nor the attention plans
    it built, nor the tuned tables read: tests patch backends' capabilities and forwards and point the
    tuned-table directory elsewhere (monkeypatch), which no real process does, and a plan chosen or a
    table read under a patch must not serve the next test. (Within a test, plans are in force:
    tests/attention/test_plans.py holds them to behaving exactly like the uncached path.)"""
    import fastvit
    from fastvit.attention import clear_plans, measured

    def forget():
        clear_plans()
        measured._CACHE.clear()  # dispatch orders read from a (patched) tuned table
        kernels = sys.modules.get("fastvit.kernels.attention")
        if kernels is not None:
            kernels.reload_tuned()

    forget()
    yield
    fastvit.set_backend(None)
    forget()


def pytest_report_header(config):
    import fastvit

    return f"fastvit {fastvit.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
