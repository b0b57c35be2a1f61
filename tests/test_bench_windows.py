"""The windowed benchmark group (``fastvit bench --windows``): shapes named after models, the einops
contender (the models' own window cut) against every backend, rows and refusals. Nothing here asserts
a timing."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close

from fastvit import cli
from fastvit.attention import BACKENDS, attend
from fastvit.tools import contenders as bench_contenders
from fastvit.tools import runner, schema, shapes


@pytest.mark.parametrize("shape", shapes.WINDOW_SHAPES, ids=lambda s: s.name)
def test_einops_contender_matches_attend_with_the_window(shape):
    dims = shape.dims("cpu", quick=True)
    window = shape.window_for(quick=True)
    assert window.seq_len == dims[2] == dims[3]
    q, k, v, make_bias = shapes.attention_inputs(dims, shape.bias, "cpu", torch.float32, window=window)
    bias = make_bias()
    expected = attend(q, k, v, bias=bias, window=window, backend="reference")
    out = bench_contenders.einops_window_attention(q, k, v, window, () if bias is None else (bias,), dims[4] ** -0.5)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"{shape.name} einops vs attend(window=...)")


@pytest.mark.parametrize("shape", shapes.WINDOW_SHAPES, ids=lambda s: s.name)
def test_window_contenders_run_forward_and_backward(shape):
    contenders, dims = bench_contenders.window_contenders(shape, device="cpu", dtype=torch.float32, mode="fwd+bwd",
                                                          backends=["reference", "sdpa", "auto"], quick=True)
    by_name = {c.name: c for c in contenders}
    assert list(by_name) == ["reference", "sdpa", "einops", "auto"]
    for name in ("reference", "einops", "auto"):
        out = by_name[name].fn()
        assert tuple(out.shape) == (dims[0], dims[1], dims[2], dims[5]) and not torch.isnan(out).any()


def test_full_size_window_shapes_are_the_models():
    by_name = {s.name: s for s in shapes.WINDOW_SHAPES}
    assert {"swin_t_stage1", "swin_t_stage2", "swin_t_stage3", "swin_t_stage4", "maxvit_t_block", "maxvit_t_grid",
            "crossformer_s_short", "crossformer_s_long", "twins_svt_s_lsa", "nest_t_block"} == set(by_name)
    swin = by_name["swin_t_stage1"]
    assert swin.dims("cuda") == (64, 3, 3136, 3136, 32, 32) and swin.bias == "relpos"
    assert swin.window.describe() == "win7x7-grid56x56-shift3x3"
    assert [by_name[f"swin_t_stage{i}"].heads for i in (1, 2, 3, 4)] == [3, 6, 12, 24]
    assert by_name["crossformer_s_long"].window.dilation == (8, 8) and by_name["crossformer_s_long"].bias == "dense"
    assert by_name["maxvit_t_grid"].window.describe() == "win7x7-grid56x56-dil8x8"
    assert by_name["nest_t_block"].window.size == (14, 14)
    # Swin's full-size stages are sized for a GPU: refused on the CPU with the reason, quick runs everywhere
    assert "not for cpu" in swin.skip_reason("cpu") and swin.skip_reason("cpu", quick=True) is None
    assert swin.skip_reason("cuda") is None and by_name["twins_svt_s_lsa"].skip_reason("cpu") is None


def test_a_shape_not_sized_for_the_device_lists_every_contender_as_skipped():
    shape = next(s for s in shapes.WINDOW_SHAPES if s.name == "swin_t_stage1")
    contenders, _ = bench_contenders.window_contenders(shape, device="cpu", dtype=torch.float32)
    assert {c.name for c in contenders} == set(BACKENDS) | {"einops", "auto"}
    assert all(c.skip_reason and "batch 64 on cuda" in c.skip_reason for c in contenders)


def test_windowed_flops_count_the_keys_of_a_window():
    dims = (2, 3, 3136, 3136, 32, 32)
    assert shapes.attention_flops(dims, keys_per_query=49) == 2 * 2 * 3 * 3136 * 49 * 64
    assert shapes.attention_bytes(dims, torch.bfloat16) == 2 * 4 * 2 * 3 * 3136 * 32  # q, k, v, o


def test_peak_hbm_bandwidth_by_device_name(monkeypatch):
    assert shapes.peak_gbps("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, gbps in (("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H200", 4800.0), ("NVIDIA H100 PCIe", 2000.0),
                       ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_, n=name: n)
        assert shapes.peak_gbps("cuda") == gbps, name


def test_window_groups_are_planned_only_when_asked_for():
    assert not any(s.window is not None for s in shapes.ATTENTION_SHAPES)
    default = runner.plan(runner.BenchConfig(device="cpu", quick=True, models=[]))
    assert {g.name for g in default} == {s.name for s in shapes.ATTENTION_SHAPES}
    groups = runner.plan(runner.BenchConfig(device="cpu", quick=True, models=[], shapes=[], windows=["swin*", "nest*"],
                                            backward=True))
    assert [(g.name, g.mode) for g in groups][:2] == [("swin_t_stage1", "fwd"), ("swin_t_stage1", "fwd+bwd")]
    assert {g.name for g in groups} == {"swin_t_stage1", "swin_t_stage2", "swin_t_stage3", "swin_t_stage4",
                                        "nest_t_block"}
    assert len(runner.plan(runner.BenchConfig(device="cpu", models=[], shapes=[], windows=["all"]))) == len(
        shapes.WINDOW_SHAPES)
    with pytest.raises(ValueError, match="no windowed shape matches"):
        runner.plan(runner.BenchConfig(device="cpu", models=[], windows=["no_such_window"]))


def test_bench_windows_end_to_end(capsys, tmp_path):
    path = tmp_path / "windows.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--no-attention", "--no-models", "--no-memory",
                   "--windows", "swin_t_stage1,crossformer_s_long", "--backward", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(path.read_text())
    assert schema.validate_document(doc) == []
    rows = doc["results"]
    assert {(r["name"], r["mode"]) for r in rows} == {(n, m) for n in ("swin_t_stage1", "crossformer_s_long")
                                                       for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["kind"] == "attention" and r["window"]
        if r["status"] != "ok":
            assert r["reason"], f"{r['name']} {r['contender']} was not run and says nothing"
    by = {(r["name"], r["mode"], r["contender"]): r for r in rows}
    einops = by[("swin_t_stage1", "fwd", "einops")]
    assert einops["status"] == "ok" and einops["x_einops"] == pytest.approx(1.0)
    assert einops["window"] == "win4x4-grid8x8-shift2x2" and einops["served_by"] == "sdpa"
    assert by[("crossformer_s_long", "fwd+bwd", "reference")]["status"] == "ok"
    # a backend that does not declare supports_window keeps its row, with the reason
    for name, backend in BACKENDS.items():
        row = by[("swin_t_stage1", "fwd", name)]
        if not backend.supports_window and backend.availability()[0]:
            assert row["status"] == "skipped" and "windowed attention" in row["reason"]
    assert "win4x4-grid8x8-shift2x2" in out and "x einops" in out


def test_bench_unknown_window_shape_exits_2(capsys):
    assert cli.main(["bench", "--quick", "--windows", "no_such_window"]) == 2
