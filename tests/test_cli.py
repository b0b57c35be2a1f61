"""The ``fastvit`` command line: info, check (incl. a deliberately broken backend), kernels, --help."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from helpers import backend_class, registered

from fastvit import cli
from fastvit.attention import BACKENDS
from fastvit.attention.inputs import AttnOutput
from fastvit.attention.reference import reference_attention
from fastvit.tools import kernels_report


@pytest.fixture
def temporary_backend():
    """Register backends for one test and always unregister them."""
    with contextlib.ExitStack() as stack:
        yield lambda backend: stack.enter_context(registered(backend))


def _off_by_a_bit(inp):
    """Off by 1e-2 on one output element: small enough to look plausible, large enough to fail."""
    out = reference_attention(inp).out
    bump = torch.zeros_like(out)
    bump.view(-1)[-1] = 1e-2
    return AttnOutput(out + bump)


def _explode(inp):
    raise RuntimeError("kernel exploded")


_Broken = backend_class("broken_for_test", _off_by_a_bit)
_Raises = backend_class("raises_for_test", _explode)
_NarrowHeads = backend_class("narrow_for_test", max_head_dim=16)  # correct; head dims above 16 are skips
_Missing = backend_class("missing_for_test",
                         availability=classmethod(lambda cls: (False, "libmissing is not installed")))


def test_python_m_fastvit_help():
    proc = subprocess.run([sys.executable, "-m", "fastvit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("info", "check", "bench", "kernels"):
        assert command in proc.stdout


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


def test_info_lists_every_backend_with_its_status(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and torch.__version__ in out
    for name, backend in BACKENDS.items():
        assert name in out
        ok, why = backend.availability()
        if not ok:
            assert why.split("(")[0].strip() in " ".join(out.split())
    assert "auto dispatch" in out
    assert "vit-pytorch" in out and "timm" in out


def test_check_passes_on_a_few_cases_and_writes_json(capsys, tmp_path):
    path = tmp_path / "check.json"
    rc = cli.main(["check", "--device", "cpu", "--backends", "sdpa", "--dtypes", "fp32,bf16",
                   "-k", "*-N49-D32*", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sdpa-cpu-bf16-B2-H3-N49-D32-relpos" in out
    doc = json.loads(path.read_text())
    assert doc["counts"]["fail"] == 0 and doc["counts"]["error"] == 0
    ids = {r["id"] for r in doc["results"]}
    assert ids == {f"sdpa-cpu-{dt}-B2-H3-N49-D32{b}" for dt in ("fp32", "bf16")
                   for b in ("", "-relpos", "-dense", "-dense_bcast", "-keybias", "-padding", "-relpos+padding")}
    # forward and the gradients of q, k, v and of the trainable table were compared
    relpos = next(r for r in doc["results"] if r["id"] == "sdpa-cpu-fp32-B2-H3-N49-D32-relpos")
    assert set(relpos["errors"]) == {"out", "dq", "dk", "dv", "drel_table"}
    keybias = next(r for r in doc["results"] if r["id"] == "sdpa-cpu-fp32-B2-H3-N49-D32-keybias")
    assert set(keybias["errors"]) == {"out", "dq", "dk", "dv", "dkey_bias"}


def test_check_fails_on_a_broken_backend(capsys, temporary_backend):
    temporary_backend(_Broken)
    rc = cli.main(["check", "--device", "cpu", "--backends", _Broken.name, "--dtypes", "fp32",
                   "-k", "*-N49-D32", "-k", "*-N50-D48-dense"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "fail" in out
    assert "broken_for_test-cpu-fp32-B2-H3-N49-D32" in out
    assert "0 passed" in out


def test_check_reports_a_raising_backend_as_error(capsys, temporary_backend):
    temporary_backend(_Raises)
    rc = cli.main(["check", "--device", "cpu", "--backends", _Raises.name, "--dtypes", "fp32", "-k", "*-N49-D32"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "kernel exploded" in out


def test_check_lists_refusals_as_skips_not_failures(capsys, temporary_backend):
    temporary_backend(_NarrowHeads)
    rc = cli.main(["check", "--device", "cpu", "--backends", _NarrowHeads.name, "--dtypes", "fp32", "--quick",
                   "-k", "*-D8", "-k", "*-D32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "skipped: head_dim=32 > 16" in out
    assert "narrow_for_test-cpu-fp32-B2-H3-N1-D8" in out


def test_check_skips_an_unavailable_backend_with_its_reason(capsys, temporary_backend):
    temporary_backend(_Missing)
    rc = cli.main(["check", "--device", "cpu", "--backends", f"{_Missing.name},sdpa", "--dtypes", "fp32",
                   "-k", "*-N1-D8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "skipped backend missing_for_test: libmissing is not installed" in out


def test_check_bad_usage_exits_2(capsys):
    assert cli.main(["check", "--backends", "no_such_backend"]) == 2
    assert cli.main(["check", "--dtypes", "fp8"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["check", "--device", "cuda"]) == 2
    assert "no_such_backend" in capsys.readouterr().err


_REPORT_OK = [
    {"kernel": "_attn_fwd", "config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}, "capability": 90,
     "registers": 168, "spills": 0, "shared_mem_bytes": 49152, "ok": True, "error": None},
    {"kernel": "_attn_bwd_dkdv", "config": "BLOCK_M=32 BLOCK_N=64", "capability": 80, "registers": 255,
     "spills": 16, "shared_mem_bytes": 65536, "ok": True, "error": None},
]


def test_kernels_prints_the_report_and_writes_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels_report, "load_compile_report", lambda: (lambda: list(_REPORT_OK)))
    path = tmp_path / "kernels.json"
    assert cli.main(["kernels", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "_attn_fwd" in out and "_attn_bwd_dkdv" in out and "BLOCK_M=64" in out
    assert "2 compiled, 0 failed" in out
    doc = json.loads(path.read_text())
    assert doc["failed"] == 0 and len(doc["results"]) == 2


def test_kernels_exits_nonzero_when_a_compile_failed(capsys, monkeypatch):
    failing = _REPORT_OK + [{"kernel": "_attn_bwd_dq", "config": {"BLOCK_M": 128}, "capability": 80,
                             "registers": None, "spills": None, "shared_mem_bytes": None, "ok": False,
                             "error": "out of resource: shared memory"}]
    monkeypatch.setattr(kernels_report, "load_compile_report", lambda: (lambda: failing))
    assert cli.main(["kernels"]) == 1
    out = capsys.readouterr().out
    assert "out of resource: shared memory" in out
    assert "1 failed" in out


def test_kernels_without_the_aot_module_exits_nonzero(capsys, monkeypatch):
    def missing():
        raise ImportError("No module named 'fastvit.kernels.aot'")

    monkeypatch.setattr(kernels_report, "load_compile_report", missing)
    assert cli.main(["kernels"]) == 1
    assert "fastvit.kernels.aot is not available" in capsys.readouterr().out


def test_kernels_check_fails_on_spills_and_serialised_wgmma(capsys, monkeypatch):
    clean = [dict(_REPORT_OK[0], wgmma_serialized=False, loop_mma=8, loop_instructions=300, loads={"128": 6})]
    monkeypatch.setattr(kernels_report, "load_compile_report", lambda: (lambda: list(clean)))
    assert cli.main(["kernels", "--check"]) == 0
    assert "check: 0 of 1 compiles fail it" in capsys.readouterr().out
    serialized = clean + [dict(clean[0], wgmma_serialized=True)]
    monkeypatch.setattr(kernels_report, "load_compile_report", lambda: (lambda: list(serialized)))
    assert cli.main(["kernels"]) == 0  # without --check only a failed compile fails
    capsys.readouterr()
    assert cli.main(["kernels", "--check"]) == 1
    out = capsys.readouterr().out
    assert "wgmma serialised (C7515)" in out and "check: 1 of 2 compiles fail it" in out
    monkeypatch.setattr(kernels_report, "load_compile_report", lambda: (lambda: list(_REPORT_OK)))  # 16 B spilled
    assert cli.main(["kernels", "--check"]) == 1
    assert "16 bytes of spills" in capsys.readouterr().out
