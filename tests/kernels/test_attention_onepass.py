"""The two backward paths of the attention family against their twin, ``attention_bwd_ref``.

Short sequences (``onepass_max_n``: 256 tokens, 128 at head dim 128) run the one-pass kernel
(``kernels/attention_bwd_onepass.py``); longer ones the three passes. ``test_attention_interpret``
runs its cases on the default path (one pass at its sizes); here both paths are forced on awkward
shapes (every bias kind, key padding with an all-padded sample, Nq != Nk both ways, Dv != D, block
multiples and not, class attention), and the choice between them is checked on the launches.
"""

from __future__ import annotations

import pytest
import torch
from fastvit.kernels import attention as kattn
from fastvit.kernels import attention_configs as kattn_configs
from kernel_cases import BF16, F16, F32, assert_matches, case_inputs, launcher_kwargs, triton_case

from fastvit.attention.testing import bias_parts

PATHS = ("onepass", "threepass")

# (dtype, (B, H, Nq, Nk, D, Dv), bias): several key and query blocks with partial last ones, and block
# multiples (EVEN_M / EVEN_N); fp32 runs in 32-row tiles, 16-bit in 64-row ones.
BWD_CASES = [
    triton_case(F32, (2, 3, 70, 45, 32, 32), "dense+padding"),
    triton_case(F32, (1, 2, 64, 96, 16, 16), "relpos"),
    triton_case(F32, (2, 2, 1, 50, 32, 32), "dense_bcast_heads"),  # class attention: one query
    triton_case(F32, (3, 2, 33, 81, 16, 64), "relpos+dense_bcast+padding"),  # Dv != D
    triton_case(F32, (2, 2, 50, 50, 80, 80), "dense_bcast_all"),  # head dim padded to 128 in-kernel
    triton_case(BF16, (3, 2, 33, 81, 16, 64), "relpos+dense+padding"),
    triton_case(F16, (1, 2, 197, 197, 64, 64), "relpos"),  # ViT/16 at 224 px
    triton_case(F16, (2, 2, 128, 64, 32, 32), "none"),  # block multiples: no masks compiled in
    triton_case(BF16, (2, 3, 49, 49, 32, 32), "padding"),  # a Swin window
    # batch-free biases: the one pass sums dS over 4 batch elements per program (here 4 + 2)
    triton_case(F32, (6, 2, 40, 45, 16, 16), "relpos+dense_bcast+padding"),
    triton_case(BF16, (5, 2, 49, 49, 32, 32), "relpos"),
]


class _Launches(list):
    def __init__(self):
        super().__init__()
        self.switches = []

    def clear(self):
        super().clear()
        self.switches.clear()


@pytest.fixture
def launches(monkeypatch):
    """Records the name of every kernel launched; ``launches.switches`` their constexprs."""
    seen = _Launches()
    real = kattn._launch

    def recording(kernel, grid, args, constexprs, cfg):
        seen.append(kernel.__name__)
        seen.switches.append(dict(constexprs, grid=grid))
        real(kernel, grid, args, constexprs, cfg)

    monkeypatch.setattr(kattn, "_launch", recording)
    return seen


def _backward(case, path: str, *, seed: int = 0):
    """``attention_bwd`` on ``path`` and its twin on fp32 copies: two 5-tuples (dq, dk, dv, d_rel, d_dense)."""
    B, H, Nq, Nk, D, Dv = case.shape
    kwargs = launcher_kwargs(*case_inputs(case, seed=seed))
    scale = D ** -0.5
    do = torch.randn(B, H, Nq, Dv, generator=torch.Generator().manual_seed(seed + 1)).to(case.dtype)
    with kattn.backward_path(path):
        out, lse, _ = kattn.attention_fwd(**kwargs, scale=scale)
        got = kattn.attention_bwd(do, kwargs["q"], kwargs["k"], kwargs["v"], out, lse, scale=scale,
                                  **{n: t for n, t in kwargs.items() if n not in ("q", "k", "v")})
    ref = kattn.attention_bwd_ref(do, **kwargs, scale=scale)
    return got, ref


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: c.id)
def test_backward_paths_match_the_twin(case, path, launches):
    try:
        got, ref = _backward(case, path)
    except ValueError as e:
        # the installed triton's spill table leaves the one pass no clean config for this call (triton
        # 3.6: fp32 at head blocks 64x64 with a dense bias): auto must then take the three passes
        assert path == "onepass" and "spills or serialises wgmma" in str(e), e
        launches.clear()
        got, ref = _backward(case, "auto")
        path = "threepass"
    backward = [name for name in launches if name != "_attn_fwd"]
    expected = (["_attn_bwd_onepass"] if path == "onepass"
                else ["_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"])
    assert backward == expected
    if path == "onepass":
        B, H = case.shape[:2]
        parts = bias_parts(case.bias)  # a bias with a gradient, none of them per sample
        per_sample = {"dense", "dense_bcast_heads"} & set(parts)
        batch_free = any(p.startswith(("relpos", "dense")) for p in parts) and not per_sample
        one = launches.switches[-1]
        assert one["BATCH_SUM"] == batch_free and one["grid"] == H * (-(-B // 4) if batch_free else B)
    for name, g, r in zip(("dq", "dk", "dv", "d_rel_table", "d_dense_bias"), got, ref):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.shape == r.shape, name
            assert_matches(g, r, case.dtype, f"{case.id} {path} {name}")


@pytest.mark.usefixtures("device")
def test_the_one_pass_bias_gradients_are_bitwise_reproducible_and_chunk(monkeypatch):
    case = triton_case(F32, (3, 2, 40, 45, 16, 16), "relpos+dense+padding")
    first, ref = _backward(case, "onepass")
    second, _ = _backward(case, "onepass")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # a dS buffer over DS_BUFFER_MAX_BYTES runs one batch element per launch: the same gradients
    monkeypatch.setattr(kattn, "DS_BUFFER_MAX_BYTES", 1)
    chunked, _ = _backward(case, "onepass")
    for name, a, r in zip(("dq", "dk", "dv", "d_rel_table", "d_dense_bias"), chunked, ref):
        assert_matches(a, r, F32, f"chunked {name}")


def test_the_batch_sum_cuts_levit_bias_gradient_buffers_to_a_quarter():
    """Issue target: a LeViT-256 step's dS buffers at batch 128 at most a third of the three passes'."""
    from fastvit.tools.perf_model import levit_calls

    for call in levit_calls(batch=128):
        args = (128, call.heads, call.nq, call.nk, call.d, call.dv, BF16)
        now = kattn.bias_grad_buffer_bytes(*args, capability=(9, 0))
        with kattn.backward_path("threepass"):
            before = kattn.bias_grad_buffer_bytes(*args, capability=(9, 0))
        # a quarter, less where the one pass's tiles are fitted to 16 queries (the subsample to N = 16)
        assert now * 4 == before if call.nq > 16 else now * 4 < before, call
        # a per-sample dense bias with a gradient keeps a row per batch element
        assert kattn.bias_grad_buffer_bytes(*args, batch_free=False, capability=(9, 0)) == now * 4


@pytest.mark.usefixtures("device")
def test_chunked_batch_sums_match(monkeypatch, launches):
    case = triton_case(F32, (6, 2, 40, 45, 16, 16), "relpos+dense_bcast")
    whole, ref = _backward(case, "onepass")
    monkeypatch.setattr(kattn, "DS_BUFFER_MAX_BYTES", 1)  # one buffer row per launch: 4 + 2 elements
    launches.clear()
    chunked, _ = _backward(case, "onepass")
    assert [s["grid"] for s in launches.switches if "BATCH_SUM" in s] == [2, 2]
    for name, a, r in zip(("dq", "dk", "dv", "d_rel_table", "d_dense_bias"), chunked, ref):
        assert_matches(a, r, F32, f"chunked {name}")
    for a, b in zip(whole[:3], chunked[:3]):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("device")
def test_auto_takes_one_pass_up_to_the_bound_and_three_above(launches):
    assert kattn.onepass_max_n(64) == 256 and kattn.onepass_max_n(128) == 128
    # D = 128 allows 128 tokens: 129 queries take the three passes, 128 the one pass
    for nq, expected in ((129, "_attn_bwd_dq"), (128, "_attn_bwd_onepass")):
        launches.clear()
        got, ref = _backward(triton_case(F32, (1, 1, nq, 20, 128, 128), "none"), "auto")
        assert expected in launches, launches
        assert_matches(got[0], ref[0], F32, f"dq at Nq={nq}")


@pytest.mark.usefixtures("device")
def test_forcing_the_one_pass_beyond_its_bound_raises():
    case = triton_case(F32, (1, 1, 129, 20, 128, 128), "none")
    with pytest.raises(ValueError, match=r"one-pass backward cannot serve this call: Nq=129, Nk=20 > 128"):
        _backward(case, "onepass")
    with pytest.raises(ValueError, match="backward path 'fast'"):
        with kattn.backward_path("fast"):
            pass


@pytest.mark.usefixtures("device")
def test_a_forced_three_pass_config_takes_the_three_passes(launches):
    with kattn.forced_configs({"_attn_bwd_dkdv": kattn.Config(16, 16, 4, 1)}):
        _backward(triton_case(F32, (1, 1, 40, 40, 16, 16), "none"), "auto")
    assert "_attn_bwd_dkdv" in launches and "_attn_bwd_onepass" not in launches


def test_a_config_the_spill_table_prunes_everywhere_falls_back_to_three_passes(monkeypatch):
    blocks, kind = (64, 64), "dense"
    prefs = kattn_configs._ONEPASS_PREFS["16bit"]
    assert kattn_configs._pick_onepass_config(197, 197, blocks, BF16, kind, (9, 0)) in prefs
    pruned = frozenset(("_attn_bwd_onepass", cfg, "16bit", blocks, kind, 90) for cfg in prefs)
    monkeypatch.setattr(kattn_configs, "PRUNED", kattn_configs.PRUNED | pruned)
    assert kattn_configs._pick_onepass_config(197, 197, blocks, BF16, kind, (9, 0)) is None
    assert kattn_configs._pick_onepass_config(197, 197, blocks, BF16, kind, (8, 0)) is not None


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("dtype, bias, padded", [(BF16, "relpos", True), (F16, "relpos+dense_bcast", True),
                                                 (BF16, "dense_bcast", False), (BF16, "relpos+dense", False),
                                                 (F32, "relpos", False)])
def test_the_expanded_table_has_padded_rows(dtype, bias, padded, launches):
    """A relative-position table the launcher expands for 16-bit inputs gets rows padded to 64
    elements (aligned loads; the one pass then reads its last key block without clamping the
    columns); a caller's dense bias, a table gathered beside a per-sample bias, and fp32 keep theirs."""
    case = triton_case(dtype, (2, 2, 40, 45, 16, 16), bias)
    q, k, v, descriptors = case_inputs(case)
    kw = launcher_kwargs(q, k, v, descriptors)
    args = kattn._bias_args(q, kw.get("rel_table"), kw.get("rel_index"), kw.get("dense_bias"), None)
    assert args.cols_padded == padded
    if padded:
        assert args.dense_bias.shape[-1] == 45 and args.dense_bias.stride(2) == 64
    got, ref = _backward(case, "onepass")
    assert launches.switches[-1]["BIAS_PADDED"] == (padded and not args.has_rel)
    for name, g, r in zip(("dq", "dk", "dv", "d_rel_table", "d_dense_bias"), got, ref):
        if g is not None:
            assert_matches(g, r, dtype, f"{case.id} {name}")


@pytest.mark.usefixtures("device")
def test_a_frozen_table_is_expanded_once_and_again_after_it_changes():
    case = triton_case(BF16, (2, 2, 40, 45, 16, 16), "relpos")
    q, k, v, descriptors = case_inputs(case)
    kw = launcher_kwargs(q, k, v, descriptors)
    table, index = kw["rel_table"], kw["rel_index"]

    def expanded():
        return kattn._bias_args(q, table, index, None, None).dense_bias

    with torch.no_grad():  # eval: the same expansion, not recomputed
        first = expanded()
        assert expanded().data_ptr() == first.data_ptr()
        table.add_(1.0)  # an in-place change (a new version of the table): expanded again, new values
        again = expanded()
        assert again.data_ptr() != first.data_ptr()
        ref = table.float()[index.long()].permute(2, 0, 1).unsqueeze(0).to(BF16)
        assert torch.equal(again, ref)
        out = kattn.attention(q, k, v, scale=0.25, rel_table=table, rel_index=index)
        expect = kattn.attention_ref(q.float(), k.float(), v.float(), scale=0.25, rel_table=table.float(),
                                     rel_index=index)
        assert_matches(out, expect, BF16, "out after the table changed")
    # training (the table takes a gradient): expanded per call, never cached
    a, b = expanded(), expanded()
    assert table.requires_grad and a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    with torch.inference_mode():  # a table made here has no version counter: never cached, still right
        table_i, index_i = table.detach().clone(), index.clone()
        got = kattn._bias_args(q, table_i, index_i, None, None).dense_bias
        assert torch.equal(got, table_i.float()[index_i.long()].permute(2, 0, 1).unsqueeze(0).to(BF16))
        assert table_i not in kattn._EXPANDED


@pytest.mark.usefixtures("device")
def test_a_frozen_dense_bias_seen_twice_is_read_from_padded_rows(launches):
    """A caller's frozen 16-bit dense bias with unaligned rows is copied into padded rows on its
    second forward and the copy reused while the bias is unchanged; a fresh bias per call, a bias
    that takes a gradient, fp32 and aligned rows are never copied. Results do not change."""
    case = triton_case(BF16, (2, 2, 40, 45, 16, 16), "dense")  # a per-sample bias [B, H, Nq, Nk]
    q, k, v, descriptors = case_inputs(case)
    bias = launcher_kwargs(q, k, v, descriptors)["dense_bias"].detach()

    def args(b, forward=True, query=q):
        return kattn._bias_args(query, None, None, b, None, forward=forward)

    assert not args(bias).cols_padded  # first sighting: the caller's tensor as is
    assert not args(bias, forward=False).cols_padded  # the backward never makes the copy
    second = args(bias)
    assert second.cols_padded and second.dense_bias.stride(2) == 64 and torch.equal(second.dense_bias, bias)
    assert args(bias, forward=False).dense_bias.data_ptr() == second.dense_bias.data_ptr()  # reused
    bias.add_(1.0)  # a new version: the stale copy is not read
    assert not args(bias).cols_padded and args(bias).cols_padded and torch.equal(args(bias).dense_bias, bias)
    for other, query in ((bias.clone().requires_grad_(), q), (bias.float(), q.float()),
                         (torch.randn(2, 2, 40, 64, dtype=BF16), q)):  # rows of 64: aligned already
        args(other, query=query)
        assert not args(other, query=query).cols_padded
    for _ in range(2):  # a fresh tensor per call
        assert not args(bias.clone()).cols_padded

    # end to end, forward and one-pass backward (BIAS_PADDED, no dS: the bias is frozen) vs the twin
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = kattn.attention_ref(q32, k32, v32, scale=0.25, dense_bias=bias.float())
    ref.float().sum().backward()
    with kattn_configs.backward_path("onepass"):
        out = kattn.attention(q, k, v, scale=0.25, dense_bias=bias)
        out.float().sum().backward()
    assert launches.switches[-1]["BIAS_PADDED"] and not launches.switches[-1]["STORE_DS"]
    assert_matches(out, ref, BF16, "out")
    for name, g, r in (("dq", q.grad, q32.grad), ("dk", k.grad, k32.grad), ("dv", v.grad, v32.grad)):
        assert_matches(g, r, BF16, name)
