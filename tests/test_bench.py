"""The benchmark tooling (fastvit/tools/), ``fastvit bench --quick`` end to end, and the check cases.

Nothing here asserts a timing: only that things were measured, recorded and reported.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from helpers import backend_class, registered

from fastvit import cli
from fastvit.attention import BACKENDS, DenseBias, KeyPaddingMask, RelPosBias, testing
from fastvit.models.registry import get_model_entry
from fastvit.tools import contenders as bench_contenders
from fastvit.tools import env as bench_env
from fastvit.tools import runner, schema, shapes, timing


def assert_intervals(rows: list) -> None:
    """Every ratio column of every row that ran has its interval: ``[low, high]`` of positive ratios, or
    None where the base did not run (or too few rounds hold both)."""
    for row in rows:
        if row["status"] != "ok":
            continue
        assert isinstance(row["unstable"], bool), row
        for key in [k for k in row if k.startswith("x_") and not k.endswith("_ci")]:
            assert f"{key}_ci" in row, f"{row['name']} {row['contender']}: {key} has no interval"
            interval = row[f"{key}_ci"]
            if row[key] is None:
                assert interval is None, (row["contender"], key, interval)
            elif interval is not None:
                assert 0 < interval[0] <= interval[1], (row["contender"], key, interval)


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
    assert vit["vit-pytorch fp32"]["x_vit_pytorch_ci"] == [1.0, 1.0]
    assert vit["fastvit[auto] fp32"]["x_timm"] is not None
    assert_intervals(doc["results"])
    assert not any(r["kind"] == "overhead" for r in doc["results"])  # --quick runs leave it out
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
    assert all(max(c.shape[2], c.shape[3]) <= 64 for c in quick if c.window is None and c.packed is None)
    # a packed query sees its own sequence's keys
    assert all(max(c.packed.max_len, c.packed.kv_max_len) <= 64 for c in quick if c.packed is not None)
    assert any(c.packed is not None for c in quick)
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
    assert_intervals(rows)
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


# ---- confidence intervals of the ratios (a bootstrap over the interleaved rounds) -------------------------------

def _width(interval) -> float:
    return interval[1] - interval[0]


def test_ratio_interval_narrow_for_identical_samples_wider_for_noise_and_paired_noise_cancels():
    gen = torch.Generator().manual_seed(1)
    n = 40
    # identical samples: the ratio is exactly 2 in every resample
    steady = timing.ratio_interval([2e-3] * n, [1e-3] * n)
    assert steady == pytest.approx((2.0, 2.0), abs=1e-12)

    # independent noise (±20% per sample): the interval widens but still holds the true ratio
    base = (2e-3 * (1 + 0.4 * (torch.rand(n, generator=gen) - 0.5))).tolist()
    x = (1e-3 * (1 + 0.4 * (torch.rand(n, generator=gen) - 0.5))).tolist()
    noisy = timing.ratio_interval(base, x)
    assert noisy[0] < 2.0 < noisy[1] and _width(noisy) > 0.05, noisy

    # load that slows both contenders of a round by up to 3x, and 1% of their own noise: paired, the
    # load cancels in the ratio; the same samples with the rounds shuffled apart do not
    load = 1 + 2 * torch.rand(n, generator=gen)
    base = (2e-3 * load).tolist()
    x = (1e-3 * load * (1 + 0.02 * (torch.rand(n, generator=gen) - 0.5))).tolist()
    paired = timing.ratio_interval(base, x)
    unpaired = timing.ratio_interval(base, [x[i] for i in torch.randperm(n, generator=gen).tolist()])
    assert paired[0] <= 2.0 * 1.01 and paired[1] >= 2.0 * 0.99 and _width(paired) < 0.05, paired
    assert _width(unpaired) > 10 * _width(paired), (paired, unpaired)

    # deterministic for a seed; the orientation is median(first) / median(second)
    assert timing.ratio_interval(base, x) == paired
    swapped = timing.ratio_interval(x, base)
    assert swapped[1] < 0.51 and swapped[0] > 0.49, swapped
    low, high = timing.difference_interval(x, base)  # median(base) - median(x), seconds
    assert low <= statistics.median(base) - statistics.median(x) <= high
    with pytest.raises(ValueError, match="one entry per round"):
        timing.ratio_interval([1.0, 2.0], [1.0])


def test_paired_samples_match_rounds_not_positions():
    a = timing.Measurement("a", samples=[9.0, 1.0, 2.0, 3.0], rounds=[-1, 0, 1, 2])  # -1: its profiled call
    b = timing.Measurement("b", samples=[10.0, 30.0], rounds=[0, 2])  # it sat round 1 out (max_samples)
    assert timing.paired_samples(a, b) == ([1.0, 3.0], [10.0, 30.0])
    assert timing.paired_samples(b, a) == ([10.0, 30.0], [1.0, 3.0])


class _VirtualTime:
    """A clock that moves only when a fake contender "runs": durations are exactly what the test says."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def run(self, seconds: float) -> None:
        self.now += seconds


def _timed_with_virtual_time(monkeypatch, *, noisy: bool, watch, precision: float = 0.05):
    import types

    clock = _VirtualTime()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    gen = torch.Generator().manual_seed(0)

    def wobbly():  # 1 ms, or anywhere in 0.2-5 ms: its ratio to "steady" never settles to ±5%
        clock.run(1e-3 * (float(torch.empty(1).uniform_(0.2, 5.0, generator=gen)) if noisy else 1.0))

    contenders = [timing.Contender("steady", lambda: clock.run(1e-3)), timing.Contender("wobbly", wobbly)]
    measured = timing.time_interleaved(contenders, "cpu", budget_s=0.1, hard_cap_factor=2.0, min_samples=3,
                                      max_samples=10_000, target_sample_s=1e-3, warmup=1, measure_memory=False,
                                      precision=precision, watch=watch)
    return measured, clock.now


def test_time_interleaved_keeps_sampling_past_the_budget_while_unsettled_and_stops_at_the_cap(monkeypatch):
    watch = [("steady", "wobbly")]
    # settled ratio (both 1 ms): it stops as soon as the 0.1 s budget is spent, as without a watch
    calm, calm_end = _timed_with_virtual_time(monkeypatch, noisy=False, watch=watch)
    unwatched, unwatched_end = _timed_with_virtual_time(monkeypatch, noisy=True, watch=())
    assert calm_end < 0.1 + 3e-3 and unwatched_end < 0.1 + 6e-3  # one round past the budget at most
    assert timing.unsettled(calm, watch, 0.05) == []

    # unsettled: it goes on past the budget, up to the hard cap (2 x 0.1 s, warm-up included), no further
    noisy, noisy_end = _timed_with_virtual_time(monkeypatch, noisy=True, watch=watch)
    assert 0.2 <= noisy_end < 0.2 + 12e-3, noisy_end
    assert len(noisy["wobbly"].samples) > 1.6 * len(unwatched["wobbly"].samples)
    (base, name, width), = timing.unsettled(noisy, watch, 0.05)
    assert (base, name) == ("steady", "wobbly") and width > 0.05
    # every sample knows its round, so both contenders pair up completely
    assert noisy["steady"].rounds == noisy["wobbly"].rounds == list(range(len(noisy["wobbly"].samples)))

    # a loose precision settles at the budget
    loose, loose_end = _timed_with_virtual_time(monkeypatch, noisy=True, watch=watch, precision=10.0)
    assert loose_end < 0.1 + 6e-3


def test_comparisons_carry_intervals_in_the_orientation_of_their_column():
    from fastvit.tools.contenders import SDPA_RAW, TIMM_ATTENTION, TIMM_PATCHED

    load = [1.0, 1.5, 1.2, 3.0, 1.1, 1.3]  # the same load in every contender's round
    times = {SDPA_RAW: 5e-6, "attend auto": 8e-6, TIMM_ATTENTION: 30e-6, TIMM_PATCHED: 20e-6}
    contenders = [timing.Contender(name, lambda: None) for name in times]
    measured = {name: timing.Measurement(name, samples=[t * f for f in load], rounds=list(range(len(load))))
                for name, t in times.items()}
    group = runner.Group("overhead", "b1_h1_n16_d16", "fwd", "fp32", 1.0)
    comparisons = runner._comparisons(group, contenders)
    rows = [{"contender": name, "status": "ok"} for name in times]
    runner._apply_comparisons(rows, contenders, comparisons, measured)
    by = {r["contender"]: r for r in rows}
    median = {name: statistics.median(m.samples) for name, m in measured.items()}
    auto, patched = by["attend auto"], by[TIMM_PATCHED]
    assert auto["x_sdpa"] == pytest.approx(median[SDPA_RAW] / median["attend auto"])
    assert auto["extra_us_vs_sdpa"] == pytest.approx((median["attend auto"] - median[SDPA_RAW]) * 1e6)
    assert patched["x_timm"] == pytest.approx(1.5) and patched["time_vs_timm"] == pytest.approx(2 / 3)
    # the load is shared, so each interval is the point: a ratio of 1.5 is not reported as 0.67
    assert patched["x_timm_ci"] == pytest.approx([1.5, 1.5])
    assert patched["time_vs_timm_ci"] == pytest.approx([2 / 3, 2 / 3])
    assert auto["x_sdpa_ci"] == pytest.approx([0.625, 0.625])
    low, high = auto["extra_us_vs_sdpa_ci"]  # a difference does not cancel the load: it scales with it
    assert low <= auto["extra_us_vs_sdpa"] <= high and low > 0
    assert by[SDPA_RAW]["x_sdpa"] == 1.0 and by[SDPA_RAW]["x_sdpa_ci"] == [1.0, 1.0]
    assert (TIMM_ATTENTION, TIMM_PATCHED) in runner._watched(comparisons)
    assert not any(base == name for base, name in runner._watched(comparisons))
    assert runner._unstable(contenders, comparisons, measured, 0.05) == []


def test_strict_exits_1_when_a_group_stays_unstable(capsys, tmp_path):
    path = tmp_path / "unstable.json"
    common = ["bench", "--quick", "--device", "cpu", "--no-models", "--shapes", "vit_s16_224", "--backends",
              "reference,sdpa", "--no-memory", "--group-seconds", "0.3", "--threads", "1", "--json", str(path)]
    threads = torch.get_num_threads()
    try:
        # precision 0: no interval of real timings is that narrow, so the group samples on and stays unstable
        assert cli.main([*common, "--precision", "0", "--strict"]) == 1
        out = capsys.readouterr().out
        doc = json.loads(path.read_text())
        assert schema.validate_document(doc) == []
        assert doc["results"] and all(r["unstable"] is True and "sdpa / reference" in r["unstable_reason"]
                                      for r in doc["results"])
        lines = [line for line in out.splitlines() if line.startswith("unstable (")]
        assert len(lines) == 1 and "attention vit_s16_224 fp32 fwd" in lines[0], out
        sdpa = next(r for r in doc["results"] if r["contender"] == "sdpa")
        # past the budget: to the hard cap (2 x 0.3 s), or to max_samples when calls are that cheap
        assert sdpa["group_wall_s"] >= 0.6 or sdpa["samples"] == 200, sdpa
        if sdpa["x_reference_ci"] is not None:  # None when the cap left fewer than 3 rounds (a loaded machine)
            low, high = sdpa["x_reference_ci"]
            assert low <= high and f"({low:.2f}-{high:.2f})" in out

        # the same group without --strict reports it and exits 0; a loose precision is stable
        assert cli.main([*common, "--precision", "0"]) == 0
        assert cli.main([*common, "--precision", "100", "--strict"]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert all(r["unstable"] is False and "unstable_reason" not in r for r in doc["results"])
    capsys.readouterr()
    assert cli.main(["bench", "--quick", "--overhead", "--no-overhead"]) == 2


def test_validate_document_checks_intervals_and_flags():
    good = {"schema_version": schema.SCHEMA_VERSION, "kind": "fastvit-bench", "device": "x", "device_type": "cpu",
            "dtype": ["fp32"], "versions": {"torch": "1", "triton": None, "timm": None, "vit-pytorch": None},
            "git_commit": None, "timestamp": "t", "config": {}, "results": []}
    row = {"kind": "overhead", "name": "b1_h1_n16_d16", "mode": "fwd", "status": "ok", "median_ms": 0.004,
           "min_ms": 0.004, "samples": 3, "calls": 30, "median_us": 4.0, "x_sdpa_ci": [0.9, 1.1], "unstable": False}
    assert schema.validate_document({**good, "results": [row]}) == []
    assert schema.validate_document({**good, "results": [{**row, "x_sdpa_ci": [1.1, 0.9]}]})
    assert schema.validate_document({**good, "results": [{**row, "x_sdpa_ci": 1.0}]})
    assert schema.validate_document({**good, "results": [{**row, "unstable": "yes"}]})
    assert schema.validate_document({**good, "results": [{k: v for k, v in row.items() if k != "median_us"}]})


# ---- the host-path overhead group -------------------------------------------------------------------------------

def test_overhead_group_is_in_a_full_run_only_unless_asked_for():
    full = runner.plan(runner.BenchConfig(device="cpu"))
    assert full[-1].kind == "overhead" and full[-1].budget_s <= 2.0 and not full[-1].measure_memory
    assert sum(g.kind == "overhead" for g in full) == 1
    assert not any(g.kind == "overhead" for g in runner.plan(runner.BenchConfig(device="cpu", quick=True)))
    assert not any(g.kind == "overhead" for g in runner.plan(runner.BenchConfig(device="cpu", overhead=False)))
    assert not any(g.kind == "overhead" for g in runner.plan(runner.BenchConfig(device="cpu", shapes=["vit_*"])))
    only = runner.plan(runner.BenchConfig(device="cpu", models=[], shapes=[], overhead=True, backward=True,
                                          dtypes=["bf16"]))
    assert [(g.kind, g.mode, g.dtype) for g in only] == [("overhead", "fwd", "fp32")]


def test_overhead_group_times_the_host_path_with_ratios_and_targets(capsys, tmp_path):
    pytest.importorskip("timm")
    from fastvit.kernels import attention as kattn

    from fastvit.tools.contenders import OVERHEAD_TARGETS

    launch = kattn._launch
    path = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    try:  # one thread, as a host-path measurement is meant to run (two on a shared CPU wait for each other)
        rc = cli.main(["bench", "--quick", "--device", "cpu", "--overhead", "--no-attention", "--no-models",
                       "--threads", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert kattn._launch is launch  # the no-op was for the group only
    doc = json.loads(path.read_text())
    assert schema.validate_document(doc) == []
    rows = {r["contender"]: r for r in doc["results"]}
    assert {r["kind"] for r in rows.values()} == {"overhead"}
    assert set(rows) == {"sdpa raw", "sdpa raw dense-mask", "attend auto", "attend sdpa", "attend RelPosBias",
                         "attend DenseBias", "attend KeyPaddingMask", "attend Window", "attend triton (launch no-op)",
                         "timm Attention", "timm Attention patched"}
    assert all(r["status"] == "ok" for r in rows.values()), {n: r["reason"] for n, r in rows.items() if r["reason"]}
    us = {name: r["median_us"] for name, r in rows.items()}
    for name, r in rows.items():
        assert 0 < r["median_us"] < 5_000 and r["median_us"] == pytest.approx(r["median_ms"] * 1e3)
        assert r["shape"] == {"B": 1, "H": 1, "N": 16, "D": 16} and isinstance(r["unstable"], bool)
        if name.startswith("attend"):
            assert r["extra_us_vs_sdpa"] == pytest.approx(us[name] - us["sdpa raw"])
            assert r["x_sdpa"] == pytest.approx(us["sdpa raw"] / us[name])
            low, high = r["x_sdpa_ci"]
            assert 0 < low <= high
            assert r["extra_us_vs_sdpa_ci"][0] <= r["extra_us_vs_sdpa_ci"][1]
    assert rows["attend auto"]["served_by"] in BACKENDS and rows["attend sdpa"]["served_by"] == "sdpa"
    relpos = rows["attend RelPosBias"]
    assert relpos["extra_us_vs_sdpa_mask"] == pytest.approx(us["attend RelPosBias"] - us["sdpa raw dense-mask"])
    patched = rows["timm Attention patched"]
    assert patched["x_timm"] == pytest.approx(us["timm Attention"] / us["timm Attention patched"])
    assert patched["time_vs_timm"] == pytest.approx(1 / patched["x_timm"])
    assert patched["x_timm_ci"][0] <= patched["x_timm_ci"][1] and patched["time_vs_timm_ci"][0] < 1.5
    triton = rows["attend triton (launch no-op)"]
    assert triton["launch_noop"] and triton["served_by"] == "triton"
    assert triton["median_us"] < 2_000  # an interpreted launch takes milliseconds: the no-op was in force
    for name, (column, limit, _) in OVERHEAD_TARGETS.items():
        r = rows[name]
        assert r["target"]["field"] == column and r["target"]["max"] == limit
        assert r["target_met"] is (r[column] <= limit), r
    assert "host-path overhead" in out and "attend triton (launch no-op)" in out
    met = sum(rows[name]["target_met"] for name in OVERHEAD_TARGETS)
    assert f"host-path targets: {met} of {len(OVERHEAD_TARGETS)} met" in out


def test_overhead_scope_restores_the_launch_also_on_error():
    from fastvit.kernels import attention as kattn

    launch = kattn._launch
    with pytest.raises(RuntimeError, match="boom"):
        with bench_contenders._overhead_scope(noop_launch=True):
            assert kattn._launch is bench_contenders._no_launch and torch.is_inference_mode_enabled()
            raise RuntimeError("boom")
    assert kattn._launch is launch and not torch.is_inference_mode_enabled()
    with bench_contenders._overhead_scope(noop_launch=False):
        assert kattn._launch is launch


def test_triton_noop_contender_says_why_it_cannot_run(monkeypatch):
    from fastvit.kernels import attention as kattn

    from fastvit.attention import make_inputs

    inp = make_inputs(*(torch.randn(1, 1, 16, 16) for _ in range(3)))
    assert bench_contenders._triton_noop_skip("cpu", inp) is None  # conftest set TRITON_INTERPRET=1
    monkeypatch.setattr(kattn, "_attn_fwd", object())  # as if the kernels were compiled, not interpreted
    assert "imported before TRITON_INTERPRET=1" in bench_contenders._triton_noop_skip("cpu", inp)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "set TRITON_INTERPRET=1" in bench_contenders._triton_noop_skip("cpu", inp)
    contenders, info = bench_contenders.overhead_contenders(device="cpu")
    triton = next(c for c in contenders if c.name == bench_contenders.TRITON_NOOP)
    assert "TRITON_INTERPRET=1" in triton.skip_reason
    launch = kattn._launch
    with info["scope"]():  # nothing to no-op when the row does not run
        assert kattn._launch is launch


# ---- the packed group -------------------------------------------------------------------------------------------

def test_packed_group_is_planned_only_when_asked_for_per_dtype_and_mode():
    assert not any(g.kind == "packed" for g in runner.plan(runner.BenchConfig(device="cpu")))
    only = runner.plan(runner.BenchConfig(device="cpu", models=[], shapes=[], overhead=False, packed=True,
                                          backward=True, dtypes=["fp32", "bf16"]))
    assert [(g.kind, g.name, g.mode, g.dtype) for g in only] == [
        ("packed", name, m, d) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")
        for name in ("navit_s16_mixed16", "navit_s16_mixed16_attention")]


def test_mixed_images_are_seeded_and_about_half_padding():
    from fastvit.tools.packed_bench import mixed_images, padding_fraction

    images = mixed_images()
    assert len(images) == 16 and all(128 <= s <= 384 and s % 16 == 0 for im in images for s in im.shape[1:])
    assert all(torch.equal(a, b) for a, b in zip(images, mixed_images()))
    lengths = [(im.shape[1] // 16) * (im.shape[2] // 16) for im in images]
    assert 0.3 < padding_fraction(lengths) < 0.7
    assert padding_fraction([4, 2, 2]) == pytest.approx(1 - 8 / 12)


def test_packed_group_times_navit_and_attention_packed_against_padded(capsys, tmp_path):
    pytest.importorskip("vit_pytorch")
    from fastvit.tools.packed_bench import (
        ATTEND_PADDED,
        PACKED,
        PACKED_TARGETS,
        PADDED,
        SDPA_BLOCK_DIAGONAL,
        VIT_PYTORCH,
        attend_packed,
    )

    path = tmp_path / "packed.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--packed", "--no-attention", "--no-models",
                   "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(path.read_text())
    assert schema.validate_document(doc) == []
    rows = {r["contender"]: r for r in doc["results"]}
    assert {r["kind"] for r in rows.values()} == {"packed"}
    assert set(rows) == {VIT_PYTORCH, PACKED, PADDED, ATTEND_PADDED, SDPA_BLOCK_DIAGONAL,
                         *(attend_packed(b) for b in ("auto", "triton", "flex", "sdpa"))}
    ran = {n for n, r in rows.items() if r["status"] == "ok"}
    assert {VIT_PYTORCH, PACKED, PADDED, ATTEND_PADDED, SDPA_BLOCK_DIAGONAL, attend_packed("sdpa"),
            attend_packed("auto")} <= ran, \
        {n: r["reason"] for n, r in rows.items() if r["status"] != "ok"}
    ms = {n: rows[n]["median_ms"] for n in ran}
    assert rows[PACKED]["x_vit_pytorch"] == pytest.approx(ms[VIT_PYTORCH] / ms[PACKED])
    assert rows[PACKED]["x_padded"] == pytest.approx(ms[PADDED] / ms[PACKED])
    assert rows[attend_packed("sdpa")]["x_padded"] == pytest.approx(ms[ATTEND_PADDED] / ms[attend_packed("sdpa")])
    assert rows[attend_packed("sdpa")]["served_by"] == "sdpa" and rows[ATTEND_PADDED]["served_by"] == "sdpa"
    first = rows[PACKED]
    assert first["images"] == 4 and first["tokens"] < first["padded_tokens"]
    for name, targets in PACKED_TARGETS.items():
        got = rows[name]["targets"]
        assert [(t["field"], t["min"]) for t in got] == [(f, m) for f, m, _ in targets]
        for t in got:
            assert t["met"] is (None if t["value"] is None else t["value"] >= t["min"])
    assert "packed sequences on" in out and "packed targets:" in out


def test_ats_group_times_packed_against_padded_token_sampling(capsys, tmp_path):
    from fastvit.tools.packed_bench import ATS_PACKED, ATS_PADDED, ATS_TARGETS

    path = tmp_path / "ats.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--ats", "--no-attention", "--no-models",
                   "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(path.read_text())
    assert schema.validate_document(doc) == []
    rows = {r["contender"]: r for r in doc["results"]}
    assert set(rows) == {ATS_PADDED, ATS_PACKED} and all(r["status"] == "ok" for r in rows.values())
    assert rows[ATS_PACKED]["x_padded"] == pytest.approx(rows[ATS_PADDED]["median_ms"] / rows[ATS_PACKED]["median_ms"])
    (target,) = rows[ATS_PACKED]["targets"]
    assert (target["field"], target["min"]) == ATS_TARGETS[ATS_PACKED][0][:2]
    assert target["met"] is (target["value"] >= target["min"])
    assert "adaptive token sampling on" in out and "ats targets:" in out


def test_merge_group_times_token_merging_at_each_r(capsys, tmp_path):
    pytest.importorskip("timm")
    from fastvit.tools.merge_bench import QUICK_RS, contender_name

    path = tmp_path / "merge.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--merge", "--no-attention", "--no-models", "--dtype", "fp32",
                   "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(path.read_text())
    assert schema.validate_document(doc) == []
    rows = {r["contender"]: r for r in doc["results"]}
    assert set(rows) == {contender_name(i, r, "fp32") for i in ("fastvit", "timm") for r in QUICK_RS}
    assert all(r["status"] == "ok" and r["kind"] == "merge" for r in rows.values())
    for impl in ("fastvit", "timm"):
        tokens = [rows[contender_name(impl, r, "fp32")]["tokens_last_block"] for r in QUICK_RS]
        # 16 patches + CLS, 4 blocks, r fewer per block: 17 - 4 * 2; r = 4 is clamped to half the mergeable
        # tokens in the last block (17 -> 13 -> 9 -> 5 -> 3)
        assert tokens == [17, 9, 3]
        base = rows[contender_name(impl, 0, "fp32")]["median_ms"]
        for r in QUICK_RS[1:]:
            row = rows[contender_name(impl, r, "fp32")]
            assert row["x_r0"] == pytest.approx(base / row["median_ms"])
            assert 0 < row["matching_share"] < 1
    assert any(t["field"] == "matching_share" for t in rows[contender_name("fastvit", 2, "fp32")]["targets"])
    assert "token merging on" in out and "merge targets:" in out
