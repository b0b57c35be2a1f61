"""Ahead-of-time compilation for sm_80 / sm_90a (no GPU needed), and the coverage of the report:
every variant the launchers launch for model-named shapes is one of `iter_compile_specs()`."""

from __future__ import annotations

import os

import pytest
import torch
from fastvit.kernels import aot, variants
from fastvit.kernels import attention as kattn
from kernel_cases import kernel_kwargs, triton_case


def _layer(n: int, d: int, *, nk: int | None = None, dv: int | None = None, biased: bool = False) -> tuple:
    """``(Nq, Nk, D, Dv, biased)``: ``n`` queries over ``nk`` keys (default ``n``), head dims ``d`` and ``dv``
    (default ``d``)."""
    return n, n if nk is None else nk, d, d if dv is None else dv, biased


# The attention layers of the models fastvit serves: self-attention unless nk, dv or biased say otherwise.
MODEL_SHAPES = {
    "vit_b16_224": _layer(197, 64),
    "vit_l16_384": _layer(577, 64),
    "vit_h14_224": _layer(257, 80),
    "deit_tiny_patch16": _layer(197, 64),
    "cait_s24_class_attention": _layer(1, 48, nk=197),
    "swin_t_stage1_window": _layer(49, 32, biased=True),
    "crossformer_dense_bias": _layer(49, 32, biased=True),
    "levit_256_stage1": _layer(196, 32, dv=64, biased=True),
    "levit_256_subsample": _layer(49, 32, nk=196, dv=64, biased=True),
    "levit_128_paper_subsample": _layer(49, 16, nk=196, dv=64, biased=True),  # runs in (64, 64) head blocks
    "levit_256_stage3": _layer(16, 32, dv=64, biased=True),
    "pvt_stage1_reduced_kv": _layer(3136, 64, nk=49),
    "cvt_stage1_reduced_kv": _layer(3136, 64, nk=784),
    "ats_vit_padded_tokens": _layer(197, 64, biased=True),
    "t2t_vit_tokens": _layer(3136, 64),
    "mobilevit_d8": _layer(64, 8),
}


def _head_blocks(constexprs: dict) -> tuple:
    """(BLOCK_D, BLOCK_DV) of a kernel's constexprs; a kernel with only one of them uses it for both."""
    d, dv = constexprs.get("BLOCK_D"), constexprs.get("BLOCK_DV")
    return (dv if d is None else d, d if dv is None else dv)


def _spec_keys(specs) -> set:
    """(kernel, config, head blocks, dtype) of each spec."""
    keys = set()
    for s in specs:
        dtype = s.signature["Q"] if "Q" in s.signature else s.signature["Out"]
        keys.add((s.kernel, s.config, _head_blocks(s.constexprs), dtype))
    return keys


def _report_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the default report compiles for ``dtype``'s class (bf16 stands for fp16)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


@pytest.mark.parametrize("dtype", kattn.SUPPORTED_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_picked_config_is_compiled_ahead_of_time(dtype):
    keys = _spec_keys(variants.iter_compile_specs(dtypes=(_report_dtype(dtype),)))
    code = "*" + kattn._DTYPE_CODES[_report_dtype(dtype)]
    for model, (nq, nk, d, dv, biased) in MODEL_SHAPES.items():
        for capability in ((8, 0), (9, 0)):
            plan = kattn.launch_plan(nq, nk, d, dv, dtype, biased=biased, capability=capability)
            for kernel, (cfg, blocks) in plan.items():
                assert (kernel, cfg, blocks, code) in keys, f"{model}: {kernel} {cfg} {blocks} is not in the report"


def test_launched_variants_are_listed(device, monkeypatch):
    """Records what the launchers actually launch (constexprs included): every launch is one of
    `iter_compile_specs(full=True)`, and its (kernel, config, head blocks, dtype) is in the default
    report."""
    launched = []
    real_launch = kattn._launch

    def recording_launch(kernel, grid, args, constexprs, cfg):
        # UPCAST_DOT is the interpreter's bf16 workaround; compiled code always has it off
        launched.append((kernel.__name__, cfg, args[0].dtype, dict(constexprs, UPCAST_DOT=False)
                         if "UPCAST_DOT" in constexprs else dict(constexprs)))
        real_launch(kernel, grid, args, constexprs, cfg)

    monkeypatch.setattr(kattn, "_launch", recording_launch)

    def run(dtype, shape, bias="none"):
        out, _ = kattn.attention_with_cls_probs(**kernel_kwargs(triton_case(dtype, shape, bias), fp32_table=True))
        out.float().sum().backward()

    run(torch.float16, (1, 2, 49, 50, 32, 32))  # unbiased, head dim aligned, sequence not
    run(torch.bfloat16, (1, 2, 64, 64, 64, 64))  # unbiased, block multiples
    run(torch.float32, (1, 2, 49, 49, 16, 64), "relpos+dense_bcast_all+padding")  # all biases, widened head blocks
    run(torch.float16, (1, 2, 30, 20, 48, 48), "relpos+padding")  # a bias subset

    full = {(s.kernel, s.config, s.signature.get("Q", s.signature.get("Out")),
             # the unit strides in a spec's constexprs are triton's specialisation, not launch arguments
             tuple(sorted((k, v) for k, v in s.constexprs.items() if not k.startswith("stride_"))))
            for s in variants.iter_compile_specs(full=True)}
    default = _spec_keys(variants.iter_compile_specs())
    for name, cfg, dtype, constexprs in launched:
        code = "*" + kattn._DTYPE_CODES[dtype]
        key = (name, cfg, code, tuple(sorted(constexprs.items())))
        assert key in full, f"launched but not listed: {key}"
        report_code = "*" + kattn._DTYPE_CODES[_report_dtype(dtype)]
        assert (name, cfg, _head_blocks(constexprs), report_code) in default, (
            f"launched config not in the default report: {key}")


def _kind(constexprs: dict) -> str:
    if constexprs.get("HAS_REL"):
        return "gather"
    return "dense" if constexprs.get("HAS_DENSE") or constexprs.get("HAS_PAD") else "none"


def test_compile_report_builds_a_subset_for_sm80_and_sm90a():
    wanted = [
        ("_attn_fwd", torch.bfloat16, (64, 64), "dense"),
        ("_attn_bwd_dkdv", torch.float16, (64, 64), "dense"),
        ("_attn_bwd_dq", torch.float32, (16, 16), "none"),
        ("_attn_cls_probs", torch.bfloat16, (64, 64), "gather"),
        ("_attn_bwd_preprocess", torch.float32, (32, 32), "none"),
    ]
    subset = []
    for kernel, dtype, blocks, kind in wanted:
        for spec in variants.iter_compile_specs(dtypes=(dtype,), head_blocks=(blocks,)):
            if spec.kernel == kernel and _kind(spec.constexprs) == kind:
                subset.append(spec)
                break
    assert len(subset) == len(wanted)
    rows = aot.compile_report(capabilities=(80, 90), specs=subset)
    expected = sum(len(s.capabilities) or 2 for s in subset)  # a spec may be picked on one capability only
    assert len(rows) == expected
    for row in rows:
        assert row["ok"], row["error"]
        assert row["registers"] > 0 and row["spills"] == 0 and row["shared_mem_bytes"] is not None, row
        # the machine code was read: the 16-bit matmul kernels multiply on tensor cores in a loop (IEEE
        # fp32 multiplies with FMAs; the preprocess and the CLS row have no matmul)
        assert isinstance(row["wgmma_serialized"], bool) and isinstance(row["ptxas_notices"], list), row
        assert row["instructions"] > 0 and row["loads"], row
        if row["kernel"] in kattn.TUNABLE_KERNELS and row["config"]["dtype"] != "fp32":
            assert row["mma"] > 0 and row["loop_mma"] > 0, row
    assert {row["capability"] for row in rows} == {80, 90}
    assert f"{expected} compiled, 0 failed" in aot.format_report(rows)


def test_report_rows_carry_the_runtime_specialisation():
    """A ViT call (N=197, D=64) has its head dim, strides and pointers divisible by 16, not N."""
    spec = next(s for s in variants.iter_compile_specs(dtypes=(torch.bfloat16,), head_blocks=((64, 64),))
                if s.kernel == "_attn_fwd" and not s.constexprs["EVEN_N"])
    hints = variants.divisible_by_16(kattn.KERNELS["_attn_fwd"], spec.constexprs)
    assert {"Q", "stride_qm", "D", "Dv"} <= set(hints)
    assert not {"Nq", "Nk", "H", "stride_dm"} & set(hints)
    even = dict(spec.constexprs, EVEN_M=True, EVEN_N=True)
    assert {"Nq", "Nk", "stride_dm"} <= set(variants.divisible_by_16(kattn.KERNELS["_attn_fwd"], even))
    assert "split" in aot._variant(spec.constexprs)


def test_the_biased_16bit_backward_keeps_64_key_tiles():
    """Head dim 64 with a bias: dK/dV programs own 64 keys, dQ programs 64 queries, on sm_80 and sm_90a."""
    for capability in ((8, 0), (9, 0)):
        plan = kattn.launch_plan(197, 197, 64, 64, torch.bfloat16, biased=True, capability=capability)
        assert plan["_attn_bwd_dkdv"][0].block_n >= 64, (capability, plan)
        assert plan["_attn_bwd_dq"][0].block_m >= 64, (capability, plan)
        assert all(len(key) == 6 and key[5] in (80, 90) for key in kattn.PRUNED)


def test_compile_spec_records_errors_instead_of_raising(device):
    spec = next(iter(variants.iter_compile_specs(dtypes=(torch.float32,), head_blocks=((16, 16),))))
    broken = spec._replace(constexprs={k: v for k, v in spec.constexprs.items() if k != "BLOCK_M"})
    row = aot.compile_spec(broken, 90)
    assert row["ok"] is False and row["error"] and row["registers"] is None


def test_main_exits_nonzero_on_a_failed_compile(monkeypatch, capsys):
    good = {"kernel": "_attn_fwd", "config": {"dtype": "bf16", "BLOCK_M": 64, "num_warps": 4, "num_stages": 2,
                                              "variant": "plain uneven"},
            "capability": 90, "registers": 128, "spills": 0, "shared_mem_bytes": 32768, "ok": True, "error": None}
    bad = dict(good, ok=False, registers=None, spills=None, shared_mem_bytes=None, error="PTXASError: boom")
    monkeypatch.setattr(aot, "compile_report", lambda *a, **k: [good])
    assert aot.main([]) == 0
    monkeypatch.setattr(aot, "compile_report", lambda *a, **k: [good, bad])
    assert aot.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED PTXASError: boom" in out and "1 compiled, 1 failed" in out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTVIT_AOT_FULL") != "1",
                    reason="the full report takes minutes; CI runs `fastvit kernels` (set FASTVIT_AOT_FULL=1 to run)")
def test_full_report_compiles_without_spills():
    rows = aot.compile_report()
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and r["spills"]]
    assert not failed, failed[:3]
    assert not spilled, spilled[:3]


def test_the_spill_table_follows_the_triton_in_use():
    from fastvit.kernels import spill_table

    assert spill_table.pruned_for("3.8.0") == spill_table.PRUNED == spill_table.pruned_for("3.9.1")
    both = spill_table.PRUNED | spill_table.PRUNED_TRITON_3_6
    assert spill_table.pruned_for("3.6.0") == both == spill_table.pruned_for("3.2.0") == spill_table.pruned_for("")
    assert spill_table.PRUNED_TRITON_3_6 - spill_table.PRUNED, "3.6 adds nothing: the table is stale"
    import triton

    assert kattn.PRUNED == spill_table.pruned_for(triton.__version__)
