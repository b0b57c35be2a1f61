"""fastvit.runtime.tune_cpu_allocator: applied on glibc, a reason elsewhere, recorded by the bench."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from fastvit import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter: the tuning changes the whole process."""
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning needs Linux with glibc")
def test_tuning_applies_on_glibc_and_is_reported():
    out = _python(
        "from fastvit.runtime import tune_cpu_allocator, cpu_allocator_tuning\n"
        "before = cpu_allocator_tuning()\n"
        "after = tune_cpu_allocator(mmap_threshold=64 << 20, trim_threshold=128 << 20)\n"
        "import torch\n"
        "x = torch.randn(4 << 20)\n"  # 16 MiB: served from the kept heap now, and still correct
        "assert float((x * 2 - x - x).abs().max()) == 0.0\n"
        "print(before.applied, after.applied, after.mmap_threshold, cpu_allocator_tuning() == after)\n"
    )
    assert out.split() == ["False", "True", str(64 << 20), "True"]


def test_without_glibc_it_reports_why_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    state = runtime.tune_cpu_allocator()
    assert not state.applied
    assert "glibc" in state.reason
    assert runtime.cpu_allocator_tuning() == state


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": 0}, {"trim_threshold": -5}, {"mmap_threshold": 2 ** 31},
                                    {"trim_threshold": 1.5}])
def test_bad_thresholds_raise(kwargs):
    with pytest.raises(ValueError, match="threshold must be a positive int"):
        runtime.tune_cpu_allocator(**kwargs)


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning needs Linux with glibc")
def test_bench_records_the_tuning(tmp_path):
    path = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "fastvit", "bench", "--quick", "--no-attention", "--models",
                    "vit_tiny_patch16_224", "--no-timm", "--no-vit-pytorch", "--tune-allocator", "--json", str(path)],
                   check=True, capture_output=True, text=True)
    doc = json.loads(path.read_text())
    assert doc["cpu_allocator"]["applied"] is True
    assert doc["config"]["tune_allocator"] is True
