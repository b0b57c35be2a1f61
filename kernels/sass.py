"""What a compiled kernel's machine code says: ptxas's performance notices and the SASS's main loop.

Without a GPU the tensor cores' verdict is still visible in the code ptxas emits:

- ``ptxas -arch=<sm> -v`` on the PTX prints, besides registers and spills, performance notices such
  as C7515 ("wgmma.mma_async instructions are serialized due to non wgmma instructions defining
  accumulator registers of a wgmma between start and end of the pipeline stage"): each tensor-core
  group then waits for the previous one to retire. The AOT check treats it as a failure.
- ``cuobjdump -sass`` on the cubin gives the instructions. A loop is a backward branch (``BRA`` to a
  lower address); the main loop is the one holding the most tensor-core instructions (``HGMMA`` on
  sm_90a, ``HMMA`` on sm_80). Its size, its tensor-core count and the width of the kernel's global
  loads (``LDG.E.128`` / ``LDGSTS...128`` 128-bit, narrower ones, or the TMA's ``UTMALDG``) are what
  the static model and the review read.

Both tools ship in the triton wheel (``triton/backends/nvidia/bin``); ptxas takes tens of
milliseconds per kernel, so the report runs it on every variant.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Optional

__all__ = ["ptxas_notices", "parse_notices", "sass_stats", "machine_code", "SERIALIZED_WGMMA"]

SERIALIZED_WGMMA = "C7515"
_ARCH = {80: "sm_80", 90: "sm_90a"}
# "/*0c60*/   @!P3 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;"
_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_MMA = ("HGMMA", "HMMA")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_notices(ptx: str, capability: int) -> list[str]:
    """ptxas's warnings and performance notices for ``ptx`` on ``capability`` (80 or 90), one per line
    (the register and spill lines of ``-v`` are left out: the report reads those from the cubin)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w", encoding="utf-8") as f:
            f.write(ptx)
        done = subprocess.run([_tool("ptxas"), f"-arch={_ARCH[capability]}", "-v", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip().splitlines()[-1] if text.strip() else done.returncode}")
    return parse_notices(text)


def parse_notices(text: str) -> list[str]:
    """The warnings and numbered notices (``(C7515) Potential Performance Loss: ...``) of ptxas's output."""
    return [line.split(":", 1)[1].strip() if ":" in line else line.strip() for line in text.splitlines()
            if "warning" in line.lower() or "Performance Loss" in line or re.search(r"\(C\d{4}\)", line)]


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INSTRUCTION.finditer(sass)]


def _load_width(op: str) -> Optional[str]:
    """``"128"``, ``"64"``, ``"32"``, ``"16"``, ``"8"`` or ``"tma"`` for a global load, else None."""
    if op.startswith("UTMALDG"):
        return "tma"
    if not (op.startswith("LDG.") or op.startswith("LDGSTS.")) or op == "LDGDEPBAR":
        return None
    for width in ("128", "64"):
        if op.endswith("." + width) or f".{width}." in op:
            return width
    if ".U16" in op or ".S16" in op:
        return "16"
    if ".U8" in op or ".S8" in op:
        return "8"
    return "32"


def sass_stats(sass: str) -> dict:
    """Counts from ``cuobjdump -sass`` text: instructions, tensor-core instructions, global loads by
    width, and the main loop: the backward branch's range holding the most tensor-core instructions,
    the innermost of equals (a loop nest whose outer body adds no tensor-core instruction, as the
    one-pass backward's key loop around its query loop, runs its inner loop per tile)."""
    code = _instructions(sass)
    ops = [op for _, op, _ in code]
    mma = sum(op.startswith(_MMA) for op in ops)
    loads = Counter(w for w in map(_load_width, ops) if w is not None)
    loops = []
    for addr, op, rest in code:
        if op.startswith("BRA"):
            target = _BRANCH_TARGET.search(rest)
            if target and int(target.group(1), 16) < addr:
                start = int(target.group(1), 16)
                body = [o for a, o, _ in code if start <= a <= addr]
                loops.append((sum(o.startswith(_MMA) for o in body), len(body), start, addr))
    main = max(loops, key=lambda loop: (loop[0], -loop[1]), default=None)
    return {"instructions": len(code), "mma": mma, "loads": dict(sorted(loads.items())),
            "loops": len(loops),
            "loop_instructions": main[1] if main else None, "loop_mma": main[0] if main else None,
            "loop_mma_share": round(main[0] / main[1], 4) if main and main[1] else None}


def machine_code(ptx: str, cubin: bytes, capability: int) -> dict:
    """The report's machine-code fields of one compiled kernel: ptxas notices, whether wgmma is
    serialised (sm_90a), and `sass_stats` of the cubin."""
    notices = ptxas_notices(ptx, capability)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    return {"ptxas_notices": notices, "wgmma_serialized": any(SERIALIZED_WGMMA in n for n in notices),
            **sass_stats(sass)}
