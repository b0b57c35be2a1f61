"""The environment a measurement ran in: device, versions, commit, CPU load."""

from __future__ import annotations

import datetime
import functools
import importlib
import importlib.metadata
import os
import platform
import subprocess
from typing import Optional, Sequence

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags(interesting: Sequence[str] = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16",
                                            "avx512_vnni", "avx512_fp16", "avx_vnni", "amx_tile",
                                            "amx_bf16", "amx_int8", "neon", "asimd", "sve")) -> list:
    """The CPU features that matter for GEMM speed (from /proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in interesting if flag in have]
    except OSError:
        pass
    return []


def device_name(device: str) -> str:
    """``torch.cuda.get_device_name`` on CUDA, the CPU model (/proc/cpuinfo) on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model_name()


def package_version(dist: str) -> Optional[str]:
    """The installed version of a distribution, or None (never imports it)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import fastvit

    return {
        "python": platform.python_version(),
        "fastvit": fastvit.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "xformers": package_version("xformers"),
        "timm": package_version("timm"),
        "vit-pytorch": package_version("vit-pytorch"),
        "einops": package_version("einops"),
    }


@functools.lru_cache(maxsize=1)
def git_info() -> dict:
    """The commit of the source tree fastvit is imported from (None outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"commit": commit, "dirty": dirty}


def cpu_pressure() -> Optional[float]:
    """Linux PSI: % of the last 10 s in which runnable tasks waited for a CPU (None where unavailable).

    On a shared machine this says how noisy a run was: ~0 is quiet, >50 means other processes held
    the cores and absolute times are inflated (ratios from one interleaved run still hold better).
    """
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return None


def environment(device: str) -> dict:
    """Where a run happened: the top-level fields of every results document."""
    env = {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "versions": versions(),
        "git_commit": git_info()["commit"],
        "git_dirty": git_info()["dirty"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu": cpu_model_name(), "cpu_flags": cpu_flags(),
                 "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                 "cpu_pressure_avg10": cpu_pressure()},
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env["cuda_device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                              "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
    return env


