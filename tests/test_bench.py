"""The benchmark tooling (fastvit/tools/), ``fastvit bench --quick`` end to end, and the check cases.

Nothing here asserts a timing: only that things were measured, recorded and reported.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import backend_class, registered

from fastvit import cli
from fastvit.attention import BACKENDS, DenseBias, KeyPaddingMask, RelPosBias, testing
from fastvit.models.registry import get_model_entry
from fastvit.tools import contenders as bench_contenders
from fastvit.tools import env as bench_env
from fastvit.tools import runner, schema, shapes, timing


def test_bench_quick_end_to_end_writes_a_valid_document(capsys, tmp_path):
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--models", "vit_small_patch16_224,levit_128s",
                   "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(path.read_text())
    assert schema.validate_document(doc) == []
    assert doc["schema_version"] == schema.SCHEMA_VERSION
    assert doc["device_type"] == "cpu" and doc["device"]
    for key in ("torch", "triton", "timm", "vit-pytorch"):
        assert key in doc["versions"]
    assert doc["versions"]["torch"] == torch.__version__
    assert "git_commit" in doc and doc["timestamp"]

    attention = [r for r in doc["results"] if r["kind"] == "attention"]
    assert {r["name"] for r in attention} == {s.name for s in shapes.ATTENTION_SHAPES}
    for name in {r["name"] for r in attention}:
        rows = {r["contender"]: r for r in attention if r["name"] == name}
        assert set(rows) == set(BACKENDS) | {"auto"}
        assert rows["reference"]["status"] == "ok" and rows["reference"]["x_reference"] == pytest.approx(1.0)
        assert rows["auto"]["status"] == "ok" and rows["auto"]["served_by"] in BACKENDS
        for backend, row in rows.items():
            if row["status"] != "ok":
                assert row["reason"], f"{name} {backend} was not run and says nothing"

    models = [r for r in doc["results"] if r["kind"] == "model"]
    assert {r["name"] for r in models} == {"vit_small_patch16_224", "levit_128s"}
    vit = {r["contender"]: r for r in models if r["name"] == "vit_small_patch16_224"}
    for contender in ("fastvit[auto] fp32", "fastvit[reference] fp32", "fastvit[sdpa] fp32", "vit-pytorch fp32",
                      "timm fp32"):
        assert vit[contender]["status"] == "ok", vit[contender]
        assert vit[contender]["img_per_s"] > 0
    assert vit["vit-pytorch fp32"]["x_vit_pytorch"] == pytest.approx(1.0)
    assert vit["fastvit[auto] fp32"]["x_timm"] is not None
    # the table and the headline summary were printed
    assert "vit_small_patch16_224" in out and "x vit-pytorch" in out and "x naive" in out


def test_default_plan_has_the_headline_model_every_backend_and_a_bf16_row():
    groups = runner.plan(runner.BenchConfig(device="cpu"))
    kinds = [g.kind for g in groups]
    assert kinds.index("model") == len(shapes.ATTENTION_SHAPES)  # attention first, one group per shape
    headline = next(g for g in groups if g.kind == "model")
    assert headline.name == bench_contenders.HEADLINE_MODEL
    assert headline.build.keywords["batch_size"] == 8
    assert headline.build.keywords["backends"] is None  # every registered backend + auto
    assert headline.build.keywords["extra_auto_dtypes"] == [torch.bfloat16]
    others = [g for g in groups if g.kind == "model"][1:]
    assert all(g.build.keywords["backends"] == ["auto"] for g in others)


def test_default_models_take_one_preset_per_vit_pytorch_architecture():
    names = bench_contenders.default_models()
    assert names[0] == bench_contenders.HEADLINE_MODEL
    families = [get_model_entry(n).vit_pytorch.split(":")[0] for n in names]
    assert len(families) == len(set(families))
    assert all(get_model_entry(n).vit_pytorch for n in names)


def test_select_models():
    assert bench_contenders.select_models(["vit_small_patch16_224"]) == ["vit_small_patch16_224"]
    assert "vit_base_patch16_224" in bench_contenders.select_models(["vit_*"])
    assert bench_contenders.select_models(None) == bench_contenders.default_models()
    with pytest.raises(ValueError, match="no registered model"):
        bench_contenders.select_models(["no_such_model*"])


def test_bench_bad_usage_exits_2(capsys):
    assert cli.main(["bench", "--quick", "--models", "no_such_model"]) == 2
    assert cli.main(["bench", "--quick", "--dtype", "fp8"]) == 2
    assert cli.main(["bench", "--quick", "--backends", "no_such_backend"]) == 2
    assert cli.main(["bench", "--quick", "--shapes", "no_such_shape"]) == 2


def test_time_interleaved_measures_everyone_and_records_errors():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1
        return torch.ones(64, 64) @ torch.ones(64, 64)

    def b():
        calls["b"] += 1
        return torch.ones(8).sum()

    def broken():
        raise RuntimeError("no kernel for you")

    contenders = [timing.Contender("a", a), timing.Contender("b", b), timing.Contender("broken", broken),
                  timing.Contender("skipped", skip_reason="refused: head_dim=512 > 256")]
    measured = timing.time_interleaved(contenders, "cpu", budget_s=0.05, min_samples=3, measure_memory=False)
    for name in ("a", "b"):
        m = measured[name]
        # how many samples fit depends on the machine's speed; at least one always does
        assert m.ok and len(m.samples) >= 1 and m.median > 0 and m.inner >= 1
        assert calls[name] >= len(m.samples) * m.inner
    assert not measured["broken"].ok and "no kernel for you" in measured["broken"].error
    assert measured["skipped"].error == "refused: head_dim=512 > 256"


def test_time_interleaved_takes_one_sample_when_one_call_exceeds_the_budget():
    import time

    measured = timing.time_interleaved([timing.Contender("slow", lambda: time.sleep(0.05))], "cpu", budget_s=0.01,
                                      min_samples=5, measure_memory=False)
    assert len(measured["slow"].samples) >= 1


def test_peak_memory_on_cpu_sees_torch_allocations():
    big = timing.peak_memory(lambda: torch.ones(8 * 2**20, dtype=torch.uint8).add_(1), "cpu")
    small = timing.peak_memory(lambda: torch.ones(16), "cpu")
    assert big is not None and small is not None
    assert big >= 8 * 2**20
    assert small < 2**20


def test_attention_contenders_list_refusals_with_reasons():
    with registered(backend_class("norelpos_for_test", bias_types=(DenseBias, KeyPaddingMask))) as no_rel_pos:
        shape = next(s for s in shapes.ATTENTION_SHAPES if s.bias == "relpos")
        contenders, dims = bench_contenders.attention_contenders(shape, device="cpu", dtype=torch.float32, quick=True)
        by_name = {c.name: c for c in contenders}
        assert "RelPosBias is not supported" in by_name[no_rel_pos.name].skip_reason
        assert by_name["reference"].skip_reason is None
        assert by_name["auto"].meta["served_by"] in BACKENDS
        by_name["reference"].fn()
        assert dims == shape.quick


@pytest.mark.parametrize("shape", shapes.ATTENTION_SHAPES, ids=lambda s: s.name)
def test_attention_shapes_build_valid_inputs_forward_and_backward(shape):
    contenders, dims = bench_contenders.attention_contenders(shape, device="cpu", dtype=torch.float32, mode="fwd+bwd",
                                                  backends=["reference"], quick=True)
    out = contenders[0].fn()
    assert tuple(out.shape) == (dims[0], dims[1], dims[2], dims[5])
    assert not torch.isnan(out).any()
    if shape.bias == "relpos":
        _, _, _, make_bias = shapes.attention_inputs(shape.quick, "relpos", "cpu", torch.float32)
        assert isinstance(make_bias(), RelPosBias)


def test_full_size_shapes_are_the_documented_ones():
    by_name = {s.name: s for s in shapes.ATTENTION_SHAPES}
    assert by_name["vit_s16_224"].dims("cpu") == (8, 6, 197, 197, 64, 64)
    assert by_name["vit_b16_1024"].dims("cpu") == (1, 12, 4096, 4096, 64, 64)
    assert by_name["twins_svt_s_gsa_stage1"].dims("cpu")[2:4] == (3136, 49)
    assert by_name["levit_256_stage2"].bias == "relpos" and by_name["ats_keypad"].bias == "padding"


def test_cls_probs_shape_asks_every_backend_for_the_cls_row():
    shape = next(s for s in shapes.ATTENTION_SHAPES if s.name == "ats_vit_s_cls_probs")
    plain = next(s for s in shapes.ATTENTION_SHAPES if s.name == "vit_s16_224")
    assert shape.cls_probs and shape.dims("cuda") == plain.dims("cuda"), "the overhead target compares these two"
    contenders, dims = bench_contenders.attention_contenders(shape, device="cpu", dtype=torch.float32, quick=True,
                                                  backends=["reference", "sdpa"])
    by_name = {c.name: c for c in contenders}
    assert "return_cls_probs" in by_name["sdpa"].skip_reason
    res = by_name["reference"].fn()
    assert tuple(res.cls_probs.shape) == (dims[0], dims[1], dims[3])


def test_peak_tflops_by_device_name(monkeypatch):
    assert shapes.peak_tflops("cpu", torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, bf16 in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_, n=name: n)
        assert shapes.peak_tflops("cuda", torch.bfloat16) == bf16, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    assert shapes.peak_tflops("cuda", torch.float32) == 66.9


def test_timm_compile_adds_a_compiled_timm_contender():
    pytest.importorskip("timm")
    contenders, _ = bench_contenders.model_contenders("vit_small_patch16_224", device="cpu", dtypes=[torch.float32],
                                           backends=["auto"], vit_pytorch=False, quick=True, timm_compile=True)
    by_name = {c.name: c for c in contenders}
    assert by_name["timm compiled fp32"].meta["compiled"] and by_name["timm compiled fp32"].skip_reason is None
    assert "timm compiled fp32" not in {c.name for c in bench_contenders.model_contenders(
        "vit_small_patch16_224", device="cpu", dtypes=[torch.float32], backends=["auto"], vit_pytorch=False,
        quick=True)[0]}


def test_attention_flops_and_bytes():
    dims = (2, 3, 10, 20, 8, 16)
    assert shapes.attention_flops(dims) == 2 * 2 * 3 * 10 * 20 * (8 + 16)
    assert shapes.attention_flops(dims, "fwd+bwd") == pytest.approx(3.5 * shapes.attention_flops(dims))
    assert shapes.attention_bytes(dims, torch.bfloat16) == 2 * 2 * 3 * (10 * 8 + 20 * 8 + 20 * 16 + 10 * 16)


def test_validate_document_finds_problems():
    assert any("schema_version" in p for p in schema.validate_document({}))
    good = {"schema_version": schema.SCHEMA_VERSION, "kind": "fastvit-bench", "device": "x", "device_type": "cpu",
            "dtype": ["fp32"], "versions": {"torch": "1", "triton": None, "timm": None, "vit-pytorch": None},
            "git_commit": None, "timestamp": "t", "config": {}, "results": []}
    assert schema.validate_document(good) == []
    bad_row = {"kind": "model", "name": "m", "mode": "fwd", "status": "error"}  # an error without a reason
    assert schema.validate_document({**good, "results": [bad_row]})


def test_environment_names_the_device_and_commit():
    env = bench_env.environment("cpu")
    assert env["device"] and env["device_type"] == "cpu"
    assert env["versions"]["torch"] == torch.__version__
    assert "git_commit" in env and "timestamp" in env


# ---- fastvit.attention.testing case generation (reused by tests and benchmarks/gpu_check.py) -----------------

def test_check_cases_cover_the_awkward_shapes():
    cases = testing.generate_cases(["sdpa"], "cpu", [torch.float32])
    shapes = {c.shape for c in cases}
    assert {s[2] for s in shapes} >= {1, 49, 50, 197}
    assert {s[4] for s in shapes} >= {8, 32, 48, 64, 80}
    assert any(s[2] != s[3] for s in shapes) and any(s[4] != s[5] for s in shapes)
    assert {c.bias for c in cases} == set(testing.BIAS_KINDS)
    ids = {c.id for c in cases}
    assert "sdpa-cpu-fp32-B2-H3-N49-D32-relpos" in ids
    assert "sdpa-cpu-fp32-B2-H2-Nq49-Nk196-D16-Dv64" in ids
    assert len(ids) == len(cases)


def test_check_padding_cases_include_a_fully_masked_sample():
    case = testing.CheckCase("sdpa", "cpu", torch.float32, (2, 3, 49, 49, 32, 32), "relpos+padding")
    q, k, v, bias = testing.make_case_inputs(case)
    mask = next(b for b in bias if isinstance(b, KeyPaddingMask)).mask
    assert not mask[-1].any() and mask[0].any()
    assert [name for name, _ in testing.trainable(q, k, v, bias)] == ["q", "k", "v", "rel_table"]


def test_check_bias_kinds_combine_parts():
    assert testing.bias_parts("none") == () and testing.bias_parts("padding+relpos") == ("relpos", "padding")
    with pytest.raises(ValueError, match="unknown bias part 'pad' in 'relpos\\+pad'"):
        testing.bias_parts("relpos+pad")
    kind = "padding+dense_bcast_all+dense+dense_bcast_heads+dense_bcast+relpos"
    case = testing.CheckCase("sdpa", "cpu", torch.float32, (2, 3, 5, 7, 8, 8), kind)
    q, k, v, bias = testing.make_case_inputs(case)
    assert [type(b) for b in bias] == [RelPosBias] + [DenseBias] * 4 + [KeyPaddingMask]
    assert [tuple(b.tensor.shape) for b in bias[1:5]] == [(2, 3, 5, 7), (1, 3, 5, 7), (2, 1, 5, 7), (1, 1, 5, 7)]
    assert testing.declares(case)


def test_check_filters_and_devices():
    cases = testing.generate_cases(["sdpa", "reference"], "cpu", None, ["*-N197-*"])
    assert cases and all("-N197-" in c.id for c in cases)
    assert all(c.backend == "sdpa" for c in cases)  # the reference is the oracle, never a candidate
    assert torch.float32 in testing.device_dtypes("cpu")
    quick = testing.generate_cases(["sdpa"], "cpu", quick=True)
    # Quick cases keep every query's keys at 64 or fewer: a windowed query sees only its window.
    assert all(max(c.shape[2], c.shape[3]) <= 64 for c in quick if c.window is None)
    assert all(c.window.tokens <= 64 for c in quick if c.window is not None) and any(c.window for c in quick)


def test_check_compare_reports_the_worst_element():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[1, 2] = 0.5
    res = testing.compare(actual, expected, atol=1e-3, rtol=0)
    assert not res["ok"] and res["index"] == (1, 2) and res["max_abs_err"] == pytest.approx(0.5)
    actual[0, 0] = float("nan")
    assert testing.compare(actual, expected, atol=1e-3, rtol=0)["max_abs_err"] == float("inf")
    assert testing.compare(expected, expected, atol=0, rtol=0)["ok"]


def test_a_tight_max_seconds_shrinks_group_budgets_but_still_measures():
    config = runner.BenchConfig(device="cpu", quick=True, models=["vit_small_patch16_224"], shapes=["vit_s16*"],
                               max_seconds=0.5, timm=False, memory=False)
    planned = {g.name: g.budget_s for g in runner.plan(config)}
    doc = runner.run_bench(config)
    assert doc["complete"] and schema.validate_document(doc) == []
    for row in doc["results"]:
        assert row["group_budget_s"] <= planned[row["name"]] + 1e-9
        if row["contender"] in ("reference", "fastvit[auto] fp32", "vit-pytorch fp32"):
            assert row["status"] == "ok" and row["samples"] >= 1


def test_registry_declares_real_timm_equivalents():
    """The bench reads timm equivalents from the registry (register_model(..., timm=...)): each names a
    timm model, and the families timm has are covered."""
    timm = pytest.importorskip("timm")
    from fastvit.models.registry import model_entries

    declared = {e.name: e.timm for e in model_entries() if e.timm}
    assert {"vit_base_patch16_224", "levit_128s", "pit_ti_224", "crossvit_tiny_240", "cait_xxs24_224"} <= set(declared)
    for name, timm_name in declared.items():
        assert timm.list_models(timm_name), f"{name}: timm has no model {timm_name!r}"


def test_timm_patch_groups_time_timm_unpatched_patched_and_linear(capsys, tmp_path):
    pytest.importorskip("timm")
    path = tmp_path / "timm.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--no-attention", "--no-models", "--no-memory",
                   "--timm-patch", "vit_small_patch16_224,swin", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(path.read_text())
    assert schema.validate_document(doc) == []
    rows = [r for r in doc["results"] if r["kind"] == "timm"]
    assert {r["name"] for r in rows} == {"vit_small_patch16_224", "swin_tiny_patch4_window7_224"}
    for name in {r["name"] for r in rows}:
        by = {r["contender"]: r for r in rows if r["name"] == name}
        assert set(by) == {"timm fp32", "patched fp32", "patched+linear fp32"}
        assert all(r["status"] == "ok" and r["img_per_s"] > 0 for r in by.values()), by
        assert by["timm fp32"]["x_timm"] == pytest.approx(1.0) and by["patched+linear fp32"]["x_timm"] > 0
        assert by["patched fp32"]["impl"] == "timm-patched" and by["patched fp32"]["family"]
    assert "patched in place" in out and "patched+linear" in out


def test_select_timm_models():
    from fastvit.tools.timm_models import DEFAULT_TIMM_PATCH, TIMM_BENCH_MODELS, select_timm_models

    assert select_timm_models(None) == []
    assert [m.name for m in select_timm_models(["default"])] == DEFAULT_TIMM_PATCH
    assert len(select_timm_models(["all"])) == len(TIMM_BENCH_MODELS)
    assert {m.family for m in select_timm_models(["swin*", "levit"])} == {"swin", "swin-v2", "levit"}
    with pytest.raises(ValueError, match="no timm bench model matches"):
        select_timm_models(["nope*"])
    assert len({m.family for m in TIMM_BENCH_MODELS}) >= 15  # one model per family patch_timm serves
