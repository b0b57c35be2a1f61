"""benchmarks/gpu_check.py's bookkeeping: streamed test outcomes, pytest summaries, target ratios, and a
part that overruns its limit. (CI also runs the whole orchestration: `make gpu-check-dry-run`.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_streamed_records_keep_failures_with_their_messages(tmp_path):
    """The record plugin in a real pytest run: a pass, a failure with its assertion text, a skip."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert 1 == 2, 'max abs err 3.0e-01 at (0, 1)'\n"
        "def test_skipped():\n    pytest.skip('needs vit-pytorch')\n")
    record = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "benchmarks"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_record", "--record-to", str(record),
                           "-p", "no:cacheprovider", str(tmp_path / "test_sample.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = gpu_check.read_records(str(record))
    assert got["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    (failure,) = got["failures"]
    assert failure["nodeid"].endswith("test_bad") and "max abs err 3.0e-01 at (0, 1)" in failure["message"]
    assert any("needs vit-pytorch" in reason for reason in got["skip_reasons"])
    assert gpu_check.pytest_summary(proc.stdout)["failed"] == 1


def test_pytest_summary_reads_the_last_counts_line():
    out = "collected\n...\n=== 3 failed, 120 passed, 4 skipped, 1 error in 80.1s ===\n"
    assert gpu_check.pytest_summary(out) == {"failed": 3, "passed": 120, "skipped": 4, "error": 1,
                                             "line": "3 failed, 120 passed, 4 skipped, 1 error in 80.1s"}


def _att(name, backend, ms, mode="fwd"):
    return {"kind": "attention", "name": name, "backend": backend, "mode": mode, "dtype": "bf16", "status": "ok",
            "median_ms": ms}


def test_targets_are_ratios_of_the_measured_medians():
    parts = {"bench_attention": {"result": {"results": [
        _att("vit_b16_224", "triton", 1.0), _att("vit_b16_224", "sdpa", 1.2), _att("vit_b16_224", "reference", 3.0),
        _att("vit_s16_224", "triton", 2.0), _att("ats_vit_s_cls_probs", "triton", 2.3)]}},
        "bench_vit_b16": {"result": {"results": [
            {"kind": "model", "name": "vit_base_patch16_224", "contender": "fastvit[auto] bf16", "mode": "fwd",
             "status": "ok", "median_ms": 50.0},
            {"kind": "model", "name": "vit_base_patch16_224", "contender": "timm bf16", "mode": "fwd",
             "status": "ok", "median_ms": 55.0}]}}}
    by_target = {t["target"].split(":")[0]: t for t in gpu_check.targets(parts)}
    sdpa = by_target["ViT-B attention (N=197, D=64) fwd"]
    assert sdpa["ratio"] == pytest.approx(1.2) and sdpa["met"] is True
    assert by_target["ViT-B attention fwd"]["ratio"] == pytest.approx(3.0) and by_target["ViT-B attention fwd"][
        "met"] is False
    cls = by_target["CLS probabilities"]
    assert cls["overhead"] == pytest.approx(0.15) and cls["met"] is False
    assert by_target["ViT-B/16 end to end, bf16, batch 128"]["ratio"] == pytest.approx(1.1)
    flex = by_target["LeViT relative-bias attention fwd"]
    assert flex["met"] is None and flex["reason"] == "not measured"


def test_a_part_past_its_limit_is_interrupted_and_recorded(tmp_path):
    script = tmp_path / "slow.py"
    out = tmp_path / "partial.json"
    script.write_text("import json, time, sys\n"
                      f"json.dump({{'rows': 1}}, open({str(out)!r}, 'w'))\n"
                      "print('started', flush=True)\n"
                      "time.sleep(60)\n")
    record = gpu_check.run_part([sys.executable, str(script)], timeout=3, json_path=str(out))
    assert record["status"] == "timeout" and record["wall_s"] < 30
    assert "started" in record["output_tail"] and record["result"] == {"rows": 1}


def test_tuned_table_path_matches_the_kernels_lookup():
    kattn = pytest.importorskip("fastvit.kernels.attention")
    name = "NVIDIA H100 80GB HBM3"
    assert os.path.basename(gpu_check.tuned_table_path(name)) == os.path.basename(kattn.tuned_path(name))


def test_timm_patch_targets_compare_patched_with_timm_eager():
    from fastvit.tools.timm_models import TIMM_BENCH_MODELS

    assert set(gpu_check.TIMM_PATCH_GOALS) <= {m.name for m in TIMM_BENCH_MODELS}
    rows = [{"kind": "timm", "name": "swin_tiny_patch4_window7_224", "contender": contender, "mode": "fwd",
             "status": "ok", "median_ms": ms} for contender, ms in (("timm bf16", 13.0), ("patched bf16", 10.0))]
    by_target = {t["target"]: t for t in gpu_check.targets({"bench_timm_patch": {"result": {"results": rows}}})}
    swin = by_target["timm swin_tiny_patch4_window7_224 patched in place, bf16: >= 1.3x timm eager"]
    assert swin["ratio"] == pytest.approx(1.3) and swin["met"] is True
    assert by_target["timm levit_256 patched in place, bf16: >= 1.3x timm eager"]["reason"] == "not measured"


def _win(contender, ms, mode="fwd", gbps=None, peak_gbps=None):
    return {"kind": "attention", "name": gpu_check.WINDOW_TARGET_SHAPE, "contender": contender, "backend": contender,
            "mode": mode, "dtype": "bf16", "status": "ok", "median_ms": ms, "gbps": gbps, "peak_gbps": peak_gbps}


def test_window_targets_compare_triton_with_the_einops_cut_and_the_hbm_bandwidth():
    parts = {"bench_windows": {"result": {"results": [
        _win("triton", 1.0, gbps=2400.0, peak_gbps=3350.0), _win("einops", 2.5), _win("sdpa", 2.0),
        _win("triton", 3.0, "fwd+bwd"), _win("einops", 4.5, "fwd+bwd")]}}}
    by_target = {t["target"].split(":")[0]: t for t in gpu_check.targets(parts)}
    fwd = by_target["7x7 windows with bias and shift (Swin-T stage 1) fwd"]
    assert fwd["ratio"] == pytest.approx(2.5) and fwd["met"] is True
    bwd = by_target["7x7 windows with bias and shift fwd+bwd"]
    assert bwd["ratio"] == pytest.approx(1.5) and bwd["met"] is False
    hbm = next(t for t in gpu_check.targets(parts) if "HBM" in t["target"])
    assert hbm["ratio"] == pytest.approx(2400 / 3350, abs=1e-3) and hbm["met"] is True
    no_peak = {"bench_windows": {"result": {"results": [_win("triton", 1.0, gbps=12.0)]}}}
    hbm = next(t for t in gpu_check.targets(no_peak) if "HBM" in t["target"])
    assert hbm["met"] is None and "no nominal HBM bandwidth" in hbm["reason"]
    assert next(t for t in gpu_check.targets({}) if "HBM" in t["target"])["reason"] == "not measured"


def test_the_windowed_bench_part_runs_the_targets_shape_first():
    from fastvit.tools.shapes import WINDOW_SHAPES

    assert WINDOW_SHAPES[0].name == gpu_check.WINDOW_TARGET_SHAPE
    assert gpu_check.QUICK_WINDOW_SHAPES.split(",")[0] == gpu_check.WINDOW_TARGET_SHAPE
    assert "bench_windows" in gpu_check.SHARES and sum(gpu_check.SHARES.values()) == gpu_check.TOTAL_BUDGET_S


def test_graph_targets_need_every_capture_to_replay_eagers_logits():
    row = lambda impl, batch, status, x=None, **extra: {"impl": impl, "batch": batch, "mode": "cuda_graph",
                                                         "status": status, **({"x_eager": x} if x else {}), **extra}
    eager = {"impl": "fastvit", "batch": 1, "mode": "eager", "status": "ok", "ms": 2.0}
    parts = {"graphs": {"result": {"results": [
        eager, row("fastvit", 1, "ok", 3.5), row("fastvit", 8, "ok", 1.4),
        row("timm", 1, "ok", 2.0), row("timm", 8, "mismatch", 1.1, max_abs_diff_vs_eager=0.9)]}}}
    fast, timm = gpu_check._graph_targets(parts)
    assert fast["met"] is True and fast["ratio"] == 1.4 and fast["by_batch"] == {"1": 3.5, "8": 1.4}
    assert timm["met"] is False and timm["ratio"] == 2.0
    skipped = {"graphs": {"result": {"results": [row("fastvit", 1, "skipped", reason="no CUDA device")]}}}
    fast, timm = gpu_check._graph_targets(skipped)
    assert fast["met"] is None and fast["reason"] == "no CUDA device"
    assert timm["met"] is None and timm["reason"] == "not measured"
    assert any("CUDA graph" in t["target"] for t in gpu_check.targets(parts))
