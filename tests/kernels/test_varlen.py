"""The variable-length (packed) kernels (``fastvit.kernels.varlen``) against their reference, one
`attention_ref` call per sequence: forward, backward and the CLS-row probabilities, on the layouts
that stress a grid built from block tables (one sequence, many short ones, one long among short ones,
lengths that are not block multiples, Nq != Nk per sequence, one query per sequence), and through
``attend(..., packed=)`` on the triton backend."""

from __future__ import annotations

import pytest
import torch
from fastvit.kernels import varlen
from kernel_cases import BF16, DEVICE, F16, F32, TOLERANCES

from fastvit.attention import DenseBias, Packed, attend, explain_call
from fastvit.attention.testing import compare, no_tf32

LAYOUTS = {
    "one": ((37,), None),
    "many-short": ((1, 3, 5, 2, 16, 7, 1, 9), None),
    "long-among-short": ((4, 150, 2, 9), None),
    "block-multiples": ((64, 128, 32), None),
    "cross": ((20, 9, 33), (33, 4, 70)),  # Nq != Nk per sequence
    "one-query-each": ((1, 1, 1), (50, 7, 64)),  # NaViT's attention pooling
}


def _inputs(lengths, kv_lengths, dtype, D=32, Dv=None, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(lengths), sum(kv_lengths or lengths)
    q, k, v = (torch.randn(1, H, n, d, generator=g).to(DEVICE, dtype)
               for n, d in ((nq, D), (nk, D), (nk, Dv or D)))
    return q, k, v


def _check(actual, expected, dtype, what, scale_atol=1.0):
    atol, rtol = TOLERANCES[dtype]
    atol *= max(1.0, float(expected.detach().abs().max())) * scale_atol
    res = compare(actual.float(), expected.float(), atol, rtol)
    assert res["ok"], (f"{what}: max abs err {res['max_abs_err']:.3g} at {res['index']}, "
                       f"{res['failed_fraction']:.2%} of elements outside atol={atol:.2g} rtol={rtol}")


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_backward_and_cls_probs_match_the_reference(layout, dtype):
    lengths, kv_lengths = LAYOUTS[layout]
    q, k, v = _inputs(lengths, kv_lengths, dtype)
    scale = 32 ** -0.5
    out, lse, cls_probs = varlen.varlen_attention_fwd(q, k, v, lengths, kv_lengths, scale=scale,
                                                      return_cls_probs=True)
    with no_tf32():
        ref, ref_cls = varlen.varlen_attention_ref(q.float(), k.float(), v.float(), lengths, kv_lengths,
                                                   scale=scale, return_cls_probs=True)
        do = torch.randn_like(out)
        grads_ref = varlen.varlen_attention_bwd_ref(do, q, k, v, lengths, kv_lengths, scale=scale)
    assert out.dtype == dtype and out.shape == ref.shape and lse.shape == q.shape[:3]
    _check(out, ref, dtype, "out")
    _check(cls_probs, ref_cls, dtype, "cls_probs")
    # lse: log of each row's softmax denominator over its own sequence's keys
    cu_k = [0, *torch.tensor(kv_lengths or lengths).cumsum(0).tolist()]
    seq_of_row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    own = torch.zeros(logits.shape[-2:], dtype=torch.bool)
    for row, seq in enumerate(seq_of_row.tolist()):
        own[row, cu_k[seq]:cu_k[seq + 1]] = True
    _check(lse, logits.masked_fill(~own, float("-inf")).logsumexp(-1), F32 if dtype == F32 else dtype, "lse")
    grads = varlen.varlen_attention_bwd(do, q, k, v, out, lse, lengths, kv_lengths, scale=scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert got.dtype == dtype
        _check(got, want, dtype, name, scale_atol=2.0)


@pytest.mark.parametrize("D, Dv", [(8, 8), (24, 24), (48, 48), (32, 64), (128, 128)])
def test_head_dims_padded_in_kernel_and_d_not_dv(D, Dv):
    lengths, kv_lengths = (3, 40, 17), (5, 40, 2)
    q, k, v = _inputs(lengths, kv_lengths, F32, D=D, Dv=Dv)
    out, lse, _ = varlen.varlen_attention_fwd(q, k, v, lengths, kv_lengths)
    with no_tf32():
        ref = varlen.varlen_attention_ref(q, k, v, lengths, kv_lengths)
        do = torch.randn_like(out)
        grads_ref = varlen.varlen_attention_bwd_ref(do, q, k, v, lengths, kv_lengths, scale=D ** -0.5)
    _check(out, ref, F32, "out")
    for name, got, want in zip(("dq", "dk", "dv"), varlen.varlen_attention_bwd(
            do, q, k, v, out, lse, lengths, kv_lengths, scale=D ** -0.5), grads_ref):
        _check(got, want, F32, name, scale_atol=2.0)


def test_a_sequence_never_sees_another_sequences_keys():
    lengths = (10, 30, 5)
    q, k, v = _inputs(lengths, None, F32)
    out = varlen.varlen_attention_fwd(q, k, v, lengths)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:40] = 1e4  # poison sequence 1's keys and values: sequences 0 and 2 must not change
    v2[:, :, 10:40] = float("nan")
    out2 = varlen.varlen_attention_fwd(q, k2, v2, lengths)[0]
    assert torch.equal(out[:, :, :10], out2[:, :, :10]) and torch.equal(out[:, :, 40:], out2[:, :, 40:])
    assert torch.isnan(out2[:, :, 10:40]).all()


def test_the_grid_covers_each_sequence_s_own_blocks_only():
    table = varlen.block_table((1, 64, 65, 130), 64, torch.device("cpu"))
    assert table.tolist() == [[0, 0], [1, 0], [2, 0], [2, 64], [3, 0], [3, 64], [3, 128]]
    assert varlen.cumulative_offsets((1, 64, 65), torch.device("cpu")).tolist() == [0, 1, 65, 130]
    # cached per (lengths, block, device): the same tensor on the next call
    assert varlen.block_table((1, 64, 65, 130), 64, torch.device("cpu")) is table


def test_autograd_through_the_custom_op_matches_the_reference():
    lengths, kv_lengths = (9, 33, 1), (12, 33, 20)
    q, k, v = (t.requires_grad_() for t in _inputs(lengths, kv_lengths, F32))
    out = varlen.varlen_attention(q, k, v, lengths, kv_lengths)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    with no_tf32():
        grads_ref = varlen.varlen_attention_bwd_ref(do, q, k, v, lengths, kv_lengths, scale=32 ** -0.5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        _check(got, want, F32, name, scale_atol=2.0)
    out2, probs = varlen.varlen_attention_with_cls_probs(q, k, v, lengths, kv_lengths)
    assert torch.equal(out2.detach(), out.detach()) and not probs.requires_grad
    assert probs.shape == (1, 2, sum(kv_lengths))


def test_custom_op_registrations():
    lengths, kv_lengths = [3, 5], [4, 6]
    q, k, v = (t.requires_grad_() for t in _inputs(lengths, kv_lengths, F32, D=16))
    torch.library.opcheck(torch.ops.fastvit.varlen_attn_fwd.default, (q, k, v, lengths, kv_lengths, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("lengths, kv_lengths, shape, match", [
    ((3, 0), None, (1, 2, 3, 16), r"lengths\[1\] = 0"),
    ((), None, (1, 2, 0, 16), "empty"),
    ((3, 4), None, (1, 2, 8, 16), "sum\\(lengths\\) = 7"),
    ((3, 4), (3,), (1, 2, 7, 16), "2 query sequences but 1 key sequences"),
    ((3, 4), None, (2, 2, 7, 16), "one batch element"),
])
def test_bad_layouts_are_refused_with_the_values(lengths, kv_lengths, shape, match):
    q = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        varlen.varlen_attention_fwd(q, q, q, lengths, kv_lengths)


def test_launched_variants_are_in_the_report(monkeypatch):
    """What a bf16 packed forward and backward launch is what the ahead-of-time report compiles."""
    launched = []
    real = varlen._launch

    def recording(kernel, grid, args, constexprs, cfg):
        launched.append((kernel.__name__, cfg, dict(constexprs, UPCAST_DOT=False)))
        real(kernel, grid, args, constexprs, cfg)

    monkeypatch.setattr(varlen, "_launch", recording)
    lengths = (197, 50, 3)
    q, k, v = (t.requires_grad_() for t in _inputs(lengths, None, BF16, D=64))
    out, _ = varlen.varlen_attention_with_cls_probs(q, k, v, lengths)
    out.float().sum().backward()
    report = {(s.kernel, s.config, tuple(sorted(s.constexprs.items())))
              for s in varlen.iter_compile_specs(dtypes=(BF16,))}
    names = {name for name, _, _ in launched}
    assert names == {"_varlen_fwd", "_varlen_cls_probs", "_attn_bwd_preprocess", "_varlen_bwd_dkdv", "_varlen_bwd_dq"}
    for name, cfg, constexprs in launched:
        if name == "_attn_bwd_preprocess":  # the attention family's kernel and report entries
            continue
        if name == "_varlen_cls_probs":
            constexprs.pop("UPCAST_DOT")
        assert (name, cfg, tuple(sorted(constexprs.items()))) in report, (name, cfg, constexprs)


# ---- through attend(): the triton backend serves unbiased packed calls -------------------------------

@pytest.mark.parametrize("cls_probs", [False, True])
def test_attend_packed_on_the_triton_backend_matches_the_reference_backend(cls_probs):
    lengths, kv_lengths = (17, 1, 40), (17, 9, 40)
    packed = Packed(lengths, kv_lengths)
    q, k, v = (t.requires_grad_() for t in _inputs(lengths, kv_lengths, F32))
    got = attend(q, k, v, packed=packed, backend="triton", return_cls_probs=cls_probs)
    with no_tf32():
        want = attend(q, k, v, packed=packed, backend="reference", return_cls_probs=cls_probs)
    out, ref = (got.out, want.out) if cls_probs else (got, want)
    _check(out, ref, F32, "out")
    if cls_probs:
        _check(got.cls_probs, want.cls_probs, F32, "cls_probs")
    do = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        _check(a, b, F32, f"d{name}", scale_atol=2.0)


def test_a_biased_packed_call_is_refused_by_triton_with_its_reason():
    lengths = (5, 7)
    q, k, v = _inputs(lengths, None, F32)
    bias = DenseBias(torch.zeros(1, 2, 12, 12))
    reasons = explain_call(q, k, v, bias=bias, packed=Packed(lengths))
    assert any("the variable-length kernels take no bias" in r for r in reasons["triton"]), reasons["triton"]
    assert reasons["reference"] == []
    assert explain_call(q, k, v, packed=Packed(lengths))["triton"] == []
