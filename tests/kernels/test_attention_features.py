"""The FlashAttention-2 features of fastvit.kernels.attention, under the interpreter: the split key
loop at sizes around block multiples, both relative-position paths (expanded once per call, gathered
in-kernel), bitwise reproducible bias gradients, the TF32 switch, tuned tables and forced configs,
and the backward op's fake strides."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from fastvit.kernels import attention as kattn
from fastvit.kernels import attention_configs as kattn_configs
from fastvit.kernels import variants
from kernel_cases import (
    BF16,
    F16,
    F32,
    REDUCED_KV,
    SUBSAMPLED_Q,
    SWIN,
    assert_matches,
    case_inputs,
    differentiable,
    kernel_kwargs,
    launcher_kwargs,
    run_and_compare,
    triton_case,
)

from fastvit.attention.testing import fp32_copy


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, config, constexprs) of every launch."""
    seen = []
    real = kattn._launch

    def recording(kernel, grid, args, constexprs, cfg):
        seen.append((kernel.__name__, cfg, dict(constexprs)))
        real(kernel, grid, args, constexprs, cfg)

    monkeypatch.setattr(kattn, "_launch", recording)
    return seen


# Sizes of their own, not SHAPES entries: N just below, at and above block multiples (16-bit tiles are
# 64 wide, fp32 ones 32): full blocks unmasked (EVEN_M/N/D: no masks compiled in at all), the partial
# last block masked; dK/dV rows clamped.
SPLIT_CASES = [
    triton_case(F16, (1, 2, 63, 63, 32, 32), "relpos+dense_bcast+padding"),
    triton_case(F16, (1, 2, 64, 64, 32, 32), "relpos+dense_bcast+padding"),
    triton_case(F16, (1, 2, 64, 64, 32, 32)),
    triton_case(F32, (1, 2, 64, 64, 64, 64)),
    triton_case(F16, (1, 2, 65, 65, 32, 32), "relpos+dense_bcast+padding"),
    triton_case(BF16, (1, 2, 127, 129, 64, 64)),
    triton_case(F32, (1, 2, 129, 127, 32, 32), "dense+padding"),
    triton_case(F32, (1, 1, 65, 33, 16, 16), "relpos"),
]


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.id)
def test_split_loop_around_block_multiples(case, launches):
    run_and_compare(case)
    fwd = [c for name, _, c in launches if name == "_attn_fwd"]
    cfg = [cfg for name, cfg, _ in launches if name == "_attn_fwd"][0]
    Nk = case.shape[3]
    assert fwd[0]["EVEN_N"] == (Nk % cfg.block_n == 0)  # the masked tail is compiled in only when needed


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("path", ["expanded", "gather"])
@pytest.mark.parametrize("case", [triton_case(F32, SWIN, "relpos+padding"),
                                  triton_case(F16, SUBSAMPLED_Q, "relpos+dense_bcast"),
                                  triton_case(BF16, SWIN, "relpos+dense_bcast_all+padding")], ids=lambda c: c.id)
def test_relative_position_paths(case, path, monkeypatch, launches):
    monkeypatch.setattr(kattn_configs, "REL_BIAS_PRECOMPUTE_MAX_LOGITS", 1 << 30 if path == "expanded" else 0)
    run_and_compare(case)
    tiled = [c for name, _, c in launches if name in kattn.TUNABLE_KERNELS]
    assert tiled and all(c["HAS_REL"] == (path == "gather") for c in tiled)
    assert all(c["HAS_DENSE"] for c in tiled) == (path == "expanded" or "dense" in case.bias)


@pytest.mark.usefixtures("device")
def test_a_batched_dense_bias_keeps_the_table_gathered(launches):
    run_and_compare(triton_case(F32, REDUCED_KV, "relpos+dense"))
    assert all(c["HAS_REL"] for name, _, c in launches if name in kattn.TUNABLE_KERNELS)


def _bias_grads(inputs, grad_out):
    out = kattn.attention(**inputs, scale=0.3)
    return torch.autograd.grad(out, [inputs["rel_table"], inputs["dense_bias"]], grad_out)


@pytest.mark.parametrize("path", ["expanded", "gather"])
@pytest.mark.parametrize("dense", ["dense_bcast", "dense", "dense_bcast_all"])
def test_bias_gradients_are_bitwise_reproducible(path, dense, device, monkeypatch):
    monkeypatch.setattr(kattn_configs, "REL_BIAS_PRECOMPUTE_MAX_LOGITS", 1 << 30 if path == "expanded" else 0)
    # A batch of 3 (no SHAPES entry has one): the bias gradients sum several samples' contributions.
    shape = B, H, Nq, Nk, D, Dv = (3, 2, 40, 45, 16, 16)
    q, k, v, bias = case_inputs(triton_case(F32, shape, f"relpos+{dense}+padding"))
    inputs = launcher_kwargs(q, k, v, bias)
    grad_out = torch.randn(B, H, Nq, Dv, generator=torch.Generator().manual_seed(3)).to(device)
    first = _bias_grads(inputs, grad_out)
    second = _bias_grads(inputs, grad_out)
    for name, a, b in zip(("rel_table", "dense_bias"), first, second):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"
    ref_inputs = launcher_kwargs(*fp32_copy(q, k, v, bias))
    ref = kattn.attention_ref(**ref_inputs, scale=0.3)
    ref_grads = torch.autograd.grad(ref, [ref_inputs["rel_table"], ref_inputs["dense_bias"]], grad_out)
    for name, a, b in zip(("rel_table", "dense_bias"), first, ref_grads):
        assert_matches(a, b, F32, f"d{name}")
    # A dS buffer over DS_BUFFER_MAX_BYTES runs the batch in chunks: the same gradients, also reproducible.
    monkeypatch.setattr(kattn, "DS_BUFFER_MAX_BYTES", 1)
    chunked = _bias_grads(inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(chunked, _bias_grads(inputs, grad_out)))
    for name, a, b in zip(("rel_table", "dense_bias"), chunked, first):
        assert_matches(a, b, F32, f"chunked d{name}")


def test_deterministic_flag_is_exported():
    from fastvit import kernels

    assert kernels.DETERMINISTIC_BIAS_GRADS is True


def test_tf32_follows_the_torch_matmul_flag():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert kattn._dot_flags(F32)["FP32_IEEE"] is False
        assert kattn.tune_key("_attn_fwd", 197, 197, 64, 64, F32, False).split("|")[1] == "tf32"
        matmul.allow_tf32 = False
        assert kattn._dot_flags(F32)["FP32_IEEE"] is True
        assert kattn._dot_flags(F16)["FP32_IEEE"] is False
    finally:
        matmul.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------
# tuned tables and forced configs
# --------------------------------------------------------------------------------------------------

def test_tune_key_and_candidates():
    key = kattn.tune_key("_attn_fwd", 197, 197, 64, 64, BF16, False)
    assert key == "_attn_fwd|16bit|d64x64|none|m256|n256"
    assert kattn.tune_key("_attn_bwd_dq", 49, 49, 32, 32, F16, True).endswith("|dense|m64|n64")
    assert "|gather|" in kattn.tune_key("_attn_bwd_dq", 1024, 1024, 32, 32, F16, True)
    for kernel in kattn.TUNABLE_KERNELS:
        cands = kattn.candidate_configs(kernel, 197, 197, 64, 64, BF16, True)
        assert cands and len(set(cands)) == len(cands)
        assert all(kattn.keep(c, kernel, BF16, (64, 64), "dense") for c in cands)
        assert cands[0] == kattn.launch_plan(197, 197, 64, 64, BF16, biased=True)[kernel][0]
    with pytest.raises(ValueError, match="unknown kernel"):
        kattn.tune_key("_attn_nope", 1, 1, 16, 16, F32, False)


# The tuned-table and forced-config tests name their own small sizes: the keys and configs are the point.
def _write_table(path, entries, **extra):
    path.write_text(json.dumps({"device": "test", "triton": "0", "entries": entries, **extra}))


def test_tuned_table_is_used(device, tmp_path, monkeypatch, launches):
    monkeypatch.setattr(kattn_configs, "TUNED_DIR", str(tmp_path))
    case = triton_case(F32, (1, 2, 40, 40, 16, 16))
    cfg = kattn.Config(16, 16, 2, 1)
    key = kattn.tune_key("_attn_fwd", *case.shape[2:], F32, False)
    path = Path(kattn.tuned_path(torch.device(device)))  # "cpu.json" under the interpreter
    assert path.parent == tmp_path
    run_and_compare(case)  # the built-in configs, and the (absent) table is now cached
    assert [c for name, c, _ in launches if name == "_attn_fwd"] != [cfg]
    launches.clear()
    _write_table(path, {key: dict(cfg._asdict(), ms=0.01)})
    assert kattn.load_tuned(str(path))["entries"] == {key: cfg}
    kattn.reload_tuned()  # what `fastvit tune` does after writing a table
    run_and_compare(case)
    assert [c for name, c, _ in launches if name == "_attn_fwd"] == [cfg]
    # the AOT report compiles the configs of the tuned tables too
    assert any(s.config == cfg for s in variants.iter_compile_specs(dtypes=(F32,), head_blocks=((16, 16),))
               if s.kernel == "_attn_fwd")


def test_tuned_path_slug():
    assert kattn.tuned_path("NVIDIA H100 80GB HBM3").endswith("/nvidia-h100-80gb-hbm3.json")
    assert kattn.tuned_path(torch.device("cpu")).endswith("/cpu.json")


def test_tuned_threshold_refines_the_precompute_rule(device, tmp_path, monkeypatch, launches):
    monkeypatch.setattr(kattn_configs, "TUNED_DIR", str(tmp_path))
    _write_table(Path(kattn.tuned_path(torch.device(device))), {}, rel_bias_precompute_max_logits=0)
    kattn._TUNED_CACHE.clear()
    run_and_compare(triton_case(F32, REDUCED_KV, "relpos"))
    assert all(c["HAS_REL"] for name, _, c in launches if name in kattn.TUNABLE_KERNELS)


def test_forced_configs_take_effect(device, launches):
    forced = {"_attn_fwd": kattn.Config(16, 32, 2, 1), "_attn_bwd_dq": kattn.Config(32, 16, 2, 1)}
    with kattn.forced_configs(forced):
        run_and_compare(triton_case(F32, (1, 2, 40, 50, 16, 16), "dense_bcast"))
    picked = {name: cfg for name, cfg, _ in launches}
    assert picked["_attn_fwd"] == forced["_attn_fwd"] and picked["_attn_bwd_dq"] == forced["_attn_bwd_dq"]
    assert picked["_attn_bwd_dkdv"] == kattn.launch_plan(40, 50, 16, 16, F32, biased=True)["_attn_bwd_dkdv"][0]
    with pytest.raises(ValueError, match="unknown kernel"):
        with kattn.forced_configs({"fwd": kattn.Config(16, 16, 4, 1)}):
            pass


@pytest.mark.parametrize("content", ["{not json", json.dumps({"entries": []}),
                                     json.dumps({"entries": {"_attn_fwd|x": {"block_m": 48, "block_n": 16,
                                                                             "num_warps": 4, "num_stages": 1}}}),
                                     json.dumps({"entries": {"bogus|x": {}}})])
def test_malformed_tuned_table_raises_or_is_ignored_with_a_warning(content, device, tmp_path, monkeypatch,
                                                                    launches):
    monkeypatch.setattr(kattn_configs, "TUNED_DIR", str(tmp_path))
    path = Path(kattn.tuned_path(torch.device(device)))
    path.write_text(content)
    with pytest.raises(ValueError, match="tuned table"):
        kattn.load_tuned(str(path))
    kattn._TUNED_CACHE.clear()
    case = triton_case(F32, (1, 1, 20, 20, 16, 16))
    with pytest.warns(RuntimeWarning, match="ignoring it"):
        run_and_compare(case, backward=False)
    assert [c for name, c, _ in launches] == [kattn.launch_plan(20, 20, 16, 16, F32)["_attn_fwd"][0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file version, not per call
        run_and_compare(case, backward=False)


def test_missing_tuned_table_is_empty(tmp_path):
    assert kattn.load_tuned(str(tmp_path / "none.json"))["entries"] == {}


# --------------------------------------------------------------------------------------------------
# the backward op's fake implementation has the real op's strides
# --------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("device")
def test_backward_op_fake_strides_match():
    case = triton_case(F32, REDUCED_KV, "relpos+dense_bcast")
    inputs = kernel_kwargs(case, requires_grad=False)
    q = inputs["q"].transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1: copied
    table = inputs["rel_table"].t().contiguous().t()  # a non-contiguous table
    out, lse, _ = kattn.attention_fwd(q, inputs["k"], inputs["v"], scale=0.25, rel_table=table,
                                      rel_index=inputs["rel_index"], dense_bias=inputs["dense_bias"])
    args = (torch.randn_like(out), q, inputs["k"], inputs["v"], out, lse, 0.25, table, inputs["rel_index"],
            inputs["dense_bias"], None, True, True)
    torch.library.opcheck(torch.ops.fastvit.attn_bwd.default, args, test_utils=("test_schema", "test_faketensor"))
    assert differentiable(kernel_kwargs(case))  # the helper still sees the trainable inputs
