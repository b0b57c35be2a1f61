"""`kernels/` is installed as `fastvit.kernels`: from the editable install and from a built wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import fastvit, fastvit.kernels, fastvit.kernels.attention as a; "
    "print(fastvit.__file__); print(fastvit.kernels.__file__); print(callable(a.attention))"
)


def run_probe(cwd: Path, extra_path: str = "") -> list:
    env = {"PYTHONPATH": extra_path, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_editable_install_maps_kernels_to_fastvit_kernels(tmp_path):
    fastvit_file, kernels_file, ok = run_probe(tmp_path)  # outside the repo: no accidental cwd import
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert Path(fastvit_file) == ROOT / "fastvit" / "__init__.py"
    assert ok == "True"


def test_built_wheel_contains_and_imports_fastvit_kernels(tmp_path):
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if build.returncode != 0:
        pytest.fail(f"wheel build failed:\n{build.stdout[-2000:]}\n{build.stderr[-2000:]}")
    (wheel,) = wheel_dir.glob("fastvit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastvit/kernels/__init__.py" in names and "fastvit/kernels/attention.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels must not be a top-level package"
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "fastvit").rglob("__init__.py")}
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (setup.py PACKAGES): {missing}"
    tuned = [p.name for p in (ROOT / "kernels" / "tuned").glob("*.json")]
    assert all(f"fastvit/kernels/tuned/{name}" in names for name in tuned), "tuned tables missing from the wheel"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    fastvit_file, kernels_file, ok = run_probe(tmp_path, extra_path=str(site))
    assert Path(kernels_file) == site / "fastvit" / "kernels" / "__init__.py"
    assert Path(fastvit_file) == site / "fastvit" / "__init__.py"
    assert ok == "True"
