"""The static performance model (``fastvit.tools.perf_model``, ``fastvit kernels --model``): its counts
against hand-computed numbers, the workloads' shapes against the model code, the behaviour of the
roofline-plus-issue formula, and the command's output (with recorded compile rows: no compiling)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from fastvit import cli
from fastvit.tools import perf_model as P

VIT = P.AttentionCall("layer", 64, 12, 197, 197, 64, 64, count=12)


def _row(loop_instructions=500, serialized=False, mma=16):
    return {"ok": True, "error": None, "loop_mma": mma, "loop_instructions": loop_instructions,
            "loop_mma_share": round(mma / loop_instructions, 4), "instructions": 2000,
            "wgmma_serialized": serialized}


@pytest.fixture
def recorded_compiles(monkeypatch):
    """Compile rows recorded instead of compiled: every spec gets the same plausible sm_90a row."""
    monkeypatch.setattr(P, "_ROWS", {})
    seen = []

    def fake(specs, progress=None, workers=2):
        seen.extend(specs)
        rows = [dict(_row(), kernel=s.kernel) for s in specs]
        for row in rows:
            if progress:
                progress(row)
        return rows

    monkeypatch.setattr(P, "_compile", fake)
    return seen


def test_vit_forward_flops_and_bytes_match_hand_counts():
    fwd, = P.attention_launches(VIT)["fwd"]
    instances = 64 * 12
    assert fwd.flops == 2 * 2 * instances * 197 * 197 * 64  # QK^T and PV, 2 FLOP per multiply-add
    assert fwd.flops == 7_630_159_872
    # q, k, v read once and o written once in bf16, lse written in fp32; no bias
    assert fwd.bytes == 4 * 2 * instances * 197 * 64 + 4 * instances * 197 == 78_068_736


def test_vit_backward_launches_and_counts():
    from fastvit.kernels.attention import backward_path

    pair = 2 * 64 * 12 * 197 * 197
    onepass, = P.attention_launches(VIT)["bwd"]  # N = 197: the one-pass backward
    cfg = onepass.config
    assert onepass.kernel == "_attn_bwd_onepass" and onepass.programs == 64 * 12
    assert onepass.iterations == math.ceil(197 / cfg[1]) * math.ceil(197 / cfg[0])
    assert onepass.flops == pair * 5 * 64  # five matmuls per tile
    # q, k, v, O, dO read, dQ, dK, dV written, lse read, the fp32 scratch (dQ, delta, lse2; padded rows) once
    rows = math.ceil(197 / cfg[0]) * cfg[0]
    assert onepass.bytes == 2 * 64 * 12 * 197 * 64 * 8 + 4 * 64 * 12 * 197 + 4 * 64 * 12 * rows * (64 + 2)
    with backward_path("threepass"):
        pre, dkdv, dq = P.attention_launches(VIT)["bwd"]
    assert (pre.kernel, dkdv.kernel, dq.kernel) == ("_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")
    assert dkdv.flops == pair * 4 * 64 and dq.flops == pair * 3 * 64  # FlashAttention-2 issues 7 matmuls
    assert pre.flops == 0 and pre.bytes == 2 * 2 * 64 * 12 * 197 * 64 + 4 * 64 * 12 * 197
    # dK/dV reads q, k, v, dO, lse, delta and writes dK, dV
    assert dkdv.bytes == 2 * 64 * 12 * 197 * 64 * 6 + 8 * 64 * 12 * 197


def test_useful_fraction_comes_from_tile_work():
    from fastvit.kernels.attention import launch_plan
    from fastvit.kernels.attention_configs import tile_work

    fwd, = P.attention_launches(VIT)["fwd"]
    cfg = launch_plan(197, 197, 64, 64, __import__("torch").bfloat16, capability=(9, 0))["_attn_fwd"][0]
    assert fwd.useful == tile_work("_attn_fwd", 197, 197, cfg).useful < 1.0


def test_levit_calls_are_what_the_model_code_does():
    from fastvit.models import registry

    kw = registry.get_model_entry("levit_256").kwargs
    calls = P.levit_calls(batch=128)
    heads, key, value = kw["heads"], kw["dim_key"], kw["dim_value"]
    assert (heads, key, value, kw["depth"]) == ((4, 6, 8), 32, 64, (4, 4, 4))
    shapes = [(c.heads, c.nq, c.nk, c.count) for c in calls]
    # 3 stages of 4 blocks on 14x14, 7x7, 4x4 tokens; between them a shrinking block with twice the
    # heads of the stage before and queries from the stride-2 grid (Nq != Nk)
    assert shapes == [(heads[0], 196, 196, 4), (2 * heads[0], 49, 196, 1), (heads[1], 49, 49, 4),
                      (2 * heads[1], 16, 49, 1), (heads[2], 16, 16, 4)]
    assert all((c.d, c.dv, c.bias, c.batch) == (key, value, "rel", 128) for c in calls)


def test_swin_has_every_stage_and_shift():
    calls = P.swin_t().calls
    assert sum(c.count for c in calls) == 2 + 2 + 6 + 2
    assert {(c.heads, c.windows) for c in calls} == {(3, 64), (6, 16), (12, 4), (24, 1)}
    assert all(c.d == 32 and c.nq == 49 for c in calls)
    assert not any(c.shifted for c in calls if c.windows == 1)


def _launch(**kw):
    base = dict(kernel="_attn_fwd", config=(128, 64, 4, 3), blocks=(64, 64), programs=132, iterations=4,
                mma_flops_per_iteration=2 * 128 * 64 * 128, exps_per_iteration=128 * 64, flops=10**9,
                bytes=10**6, useful=1.0)
    base.update(kw)
    return P.Launch(**base)


def test_prediction_is_monotone_in_flops_and_bytes():
    times = [P.predict_launch(_launch(iterations=i), _row())["time_us"] for i in (1, 4, 16, 64)]
    assert times == sorted(times) and times[0] < times[-1]
    times = [P.predict_launch(_launch(bytes=b), _row())["time_us"] for b in (10**5, 10**7, 10**8, 10**9)]
    assert times == sorted(times) and times[0] < times[-1]


def test_prediction_switches_between_compute_and_memory_bound():
    small = P.predict_launch(_launch(bytes=10**3), _row())
    large = P.predict_launch(_launch(bytes=10**10), _row())
    assert small["bound"] in ("tensor", "issue", "exp") and large["bound"] == "memory"
    assert large["time_us"] == pytest.approx(10**10 / P.H100_SXM.hbm_bytes_per_s * 1e6 + 3.0)
    # compute-bound: exactly waves x iterations x the slowest of the three per-iteration limits
    c = P.predict_launch(_launch(bytes=10**3, programs=133, mma_flops_per_iteration=2 * 64 * 64 * 128),
                         _row(loop_instructions=100))
    assert c["waves"] == 2 and c["bound"] == "exp"
    assert c["compute_us"] == pytest.approx(2 * 4 * (128 * 64 / 16) / 1.83e9 * 1e6)


def test_serialised_wgmma_is_slower():
    launch = _launch(bytes=10**3)
    plain = P.predict_launch(launch, _row(loop_instructions=2000))
    serial = P.predict_launch(launch, _row(loop_instructions=2000, serialized=True))
    assert serial["time_us"] > plain["time_us"] and serial["wgmma_serialized"]


def test_model_document_totals(recorded_compiles):
    doc = P.model_workloads(["vit_b16_224"])
    w, = doc["workloads"]
    entry, = w["calls"]
    assert entry["bwd"]["flops"] == pytest.approx(2.5 * entry["fwd"]["flops"])  # 5 matmuls at D = Dv
    assert w["totals"]["fwd"]["time_us"] == pytest.approx(12 * entry["fwd"]["time_us"])
    assert {s.kernel for s in recorded_compiles} == {"_attn_fwd", "_attn_bwd_onepass"}
    P.model_workloads(["vit_b16_224"])  # compiled once per process
    assert len(recorded_compiles) == 2


def test_cli_model_prints_every_workload(recorded_compiles, capsys, tmp_path):
    path = tmp_path / "model.json"
    assert cli.main(["kernels", "--model", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    for name in ("ViT-B/16", "Swin-T", "LeViT-256", "forward total", "backward total", "_win_bwd_tile",
                 "a model, not a measurement"):
        assert name in text, name
    doc = json.loads(path.read_text())
    assert [w["name"] for w in doc["workloads"]] == list(P.WORKLOADS)
    assert all(w["totals"]["step"]["pct_peak"] > 0 for w in doc["workloads"])


def test_cli_model_refuses_an_unknown_workload(capsys):
    assert cli.main(["kernels", "--model", "--workloads", "vit_huge"]) == 2


def test_calls_are_frozen_records():
    assert dataclasses.replace(VIT, count=1).count == 1 and VIT.instances == 64 * 12
