"""``Packed``: variable-length sequences in one call. The reference is proven against attention
written per sequence by hand, every backend that serves a packed call against the reference
(forward and gradients, biases over the packed tokens, cross attention, CLS probabilities), and
bad layouts and calls fail early, naming the values."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from fastvit.attention import (
    BACKENDS,
    DenseBias,
    KeyPaddingMask,
    Packed,
    RelPosBias,
    Window,
    attend,
    clear_plans,
    explain_call,
    plan_info,
)

# (lengths, kv_lengths): one sequence; many short; one long among short ones; lengths all equal (one
# batch, a strided view); cross attention with one query per sequence (attention pooling); Nq != Nk
# per sequence both ways.
LAYOUTS = {
    "one": ([37], None),
    "many_short": ([3, 1, 5, 2, 4, 1, 2], None),
    "long_among_short": ([4, 70, 3, 5], None),
    "equal": ([9, 9, 9], None),
    "pooling": ([1, 1, 1, 1], [12, 5, 30, 1]),
    "cross": ([6, 2, 9], [4, 11, 9]),
}


def _qkv(packed: Packed, heads=3, d=16, dv=None, dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, packed.total, d, generator=g)
    k = torch.randn(1, heads, packed.kv_total, d, generator=g)
    v = torch.randn(1, heads, packed.kv_total, dv or d, generator=g)
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]


def _by_hand(q, k, v, packed: Packed, bias=None):
    """Attention of each sequence on its own slices, written out: (out, probs, first rows)."""
    outs, probs, firsts = [], torch.zeros(1, q.shape[1], packed.total, packed.kv_total), []
    for i in range(packed.num_sequences):
        qs, ks = slice(packed.offsets[i], packed.offsets[i + 1]), slice(packed.kv_offsets[i], packed.kv_offsets[i + 1])
        logits = q[:, :, qs].float() @ k[:, :, ks].float().transpose(-1, -2) * q.shape[-1] ** -0.5
        if bias is not None:
            logits = logits + bias[..., qs, ks].float()
        p = logits.softmax(-1)
        outs.append(p @ v[:, :, ks].float())
        probs[..., qs, ks] = p.detach()
        firsts.append(p[:, :, 0])
    return torch.cat(outs, 2), probs, torch.cat(firsts, 2)


# ---- the layout --------------------------------------------------------------------------------------

def test_a_layout_caches_its_offsets_and_compares_by_lengths():
    p = Packed(torch.tensor([3, 5, 2]), kv_lengths=[1, 4, 4])
    assert p.lengths == (3, 5, 2) and p.kv_lengths == (1, 4, 4) and p.offsets == (0, 3, 8, 10)
    assert p.kv_offsets == (0, 1, 5, 9) and (p.total, p.kv_total, p.max_len, p.kv_max_len) == (10, 9, 5, 4)
    assert p == Packed([3, 5, 2], [1, 4, 4]) and hash(p) == hash(Packed([3, 5, 2], [1, 4, 4]))
    assert p != Packed([3, 5, 2]) and Packed([3, 5, 2]).is_self and not p.is_self
    assert p.describe() == "packed3-max5-kvmax4" and "kv_lengths=[1, 4, 4]" in repr(p)
    doc_q, doc_k = p.document_ids(torch.device("cpu"))
    assert doc_q.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2] and doc_k.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert p.document_ids(torch.device("cpu"))[0] is doc_q  # built once per device
    assert Packed([2, 3, 2, 3]).buckets() == (((2, 2), (0, 2)), ((3, 3), (1, 3)))


@pytest.mark.parametrize("lengths, kv_lengths, match", [
    ([3, 0, 2], None, r"lengths\[1\] = 0: every sequence needs at least one token"),
    ([3, -2], None, r"lengths\[1\] = -2"),
    ([], None, "lengths is empty"),
    ([3, 2.5], None, r"lengths\[1\] = 2.5 is not an int"),
    ([3, True], None, r"lengths\[1\] = True is not an int"),
    (torch.ones(2, 2, dtype=torch.long), None, r"1-D integer tensor .* shape \(2, 2\)"),
    (torch.tensor([1.0, 2.0]), None, "torch.float32"),
    (5, None, "got int"),
    ([3, 2], [3], "kv_lengths has 1 sequences, lengths has 2"),
    ([3, 2], [3, 0], r"kv_lengths\[1\] = 0"),
])
def test_bad_layouts_raise_naming_the_values(lengths, kv_lengths, match):
    with pytest.raises(ValueError, match=match):
        Packed(lengths, kv_lengths)


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v, p: attend(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), packed=p),
     r"q must be \[1, H, sum\(lengths\), D\], got \(2, "),
    (lambda q, k, v, p: attend(q[:, :, :-1], k, v, packed=p), r"Nq = sum\(lengths\) = 8 .* Nk = sum\(kv_lengths\) = 8"),
    (lambda q, k, v, p: attend(q, k, v, packed=p, bias=KeyPaddingMask(torch.ones(1, 8, dtype=torch.bool))),
     "packing has no padding"),
    (lambda q, k, v, p: attend(q, k, v, packed=p, bias=DenseBias(torch.zeros(1, 3, 5, 8))),
     r"does not broadcast to \[1, H, sum\(lengths\), sum\(kv_lengths\)\] = \(1, 3, 8, 8\)"),
    (lambda q, k, v, p: attend(q, k, v, packed=p,
                               bias=RelPosBias(torch.zeros(9, 3), torch.zeros(5, 5, dtype=torch.long))),
     r"index has shape \(5, 5\).* \(8, 8\)"),
    (lambda q, k, v, p: attend(q, k, v, packed=p, bias=DenseBias(torch.zeros(1, 3, 8, 8, dtype=torch.long))),
     "DenseBias must be floating point, got torch.int64"),
    (lambda q, k, v, p: attend(q, k, v, packed=p, window=Window(grid=(2, 4), size=(2, 2))),
     "cannot be combined with a window"),
    (lambda q, k, v, p: attend(q, k, v, packed=[5, 3]), "packed must be a fastvit.attention.Packed, got list"),
])
def test_bad_packed_calls_raise_naming_the_values(call, match):
    packed = Packed([5, 3])
    q, k, v = _qkv(packed, grad=False)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, packed)


# ---- the reference against attention written per sequence ------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_the_reference_attends_within_each_sequence(layout):
    packed = Packed(*LAYOUTS[layout])
    q, k, v = _qkv(packed)
    bias = torch.randn(1, 3, packed.total, packed.kv_total)
    want, want_probs, want_first = _by_hand(q, k, v, packed, bias)
    got = attend(q, k, v, packed=packed, bias=DenseBias(bias), return_probs=True, return_cls_probs=True,
                 backend="reference")
    assert_close(got.out, want, atol=1e-5, rtol=1e-5, what=f"{layout} out")
    assert_close(got.probs, want_probs, atol=1e-6, rtol=1e-5, what=f"{layout} probs (zeros off the blocks)")
    assert_close(got.cls_probs, want_first, atol=1e-6, rtol=1e-5, what=f"{layout} first rows")
    assert got.cls_probs.shape == (1, 3, packed.kv_total)


def test_a_relative_position_bias_over_the_packed_tokens_reads_each_diagonal_block():
    packed = Packed([4, 6, 3])
    q, k, v = _qkv(packed)
    table = torch.randn(20, 3, requires_grad=True)
    index = torch.randint(0, 20, (packed.total, packed.kv_total))
    got = attend(q, k, v, packed=packed, bias=RelPosBias(table, index), backend="reference")
    want, _, _ = _by_hand(q, k, v, packed, table[index].permute(2, 0, 1).unsqueeze(0))
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="relpos")
    got.sum().backward()
    # only the table entries the diagonal blocks index receive a gradient
    used = torch.zeros(20, dtype=torch.bool)
    for i in range(packed.num_sequences):
        used[index[packed.offsets[i]:packed.offsets[i + 1], packed.kv_offsets[i]:packed.kv_offsets[i + 1]]] = True
    assert (table.grad.abs().sum(1) > 0).equal(used)


# ---- every backend that serves it, against the reference ---------------------------------------------

def _serving():
    return [name for name, b in BACKENDS.items() if b.availability()[0] and b.supports_packed and name != "reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("biased", [False, True], ids=["none", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_match_the_reference_on_packed_calls(backend, layout, biased, dtype):
    packed = Packed(*LAYOUTS[layout])
    q, k, v = _qkv(packed, dv=24, dtype=dtype)
    dense = torch.randn(1, 1, packed.total, packed.kv_total, dtype=dtype, requires_grad=True) if biased else None
    bias = DenseBias(dense) if biased else None
    cls_probs = BACKENDS[backend].supports_cls_probs
    res = attend(q, k, v, packed=packed, bias=bias, return_cls_probs=cls_probs, backend=backend)
    out = res.out if cls_probs else res
    inputs = [q, k, v] + ([dense] if biased else [])
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    loss = (out * weight).sum() + (res.cls_probs.sum() * 3 if cls_probs else 0)
    grads = torch.autograd.grad(loss, inputs)

    fp32 = [t.detach().float().requires_grad_() for t in inputs]
    ref = attend(*fp32[:3], packed=packed, bias=DenseBias(fp32[3]) if biased else None, return_cls_probs=True,
                 backend="reference")
    ref_loss = (ref.out * weight.float()).sum() + (ref.cls_probs.sum() * 3 if cls_probs else 0)
    ref_grads = torch.autograd.grad(ref_loss, fp32)
    atol, rtol = BACKENDS[backend].tolerances[dtype]
    what = f"{backend}-{layout}-{'dense' if biased else 'none'}-{dtype}"
    assert_close(out.float(), ref.out, atol=atol, rtol=rtol, what=f"{what} out")
    if cls_probs:
        assert_close(res.cls_probs.float(), ref.cls_probs, atol=atol, rtol=rtol, what=f"{what} cls_probs")
    scale = 4 if dtype == torch.bfloat16 else 1  # gradients sum over more rounded terms
    for name, g, r in zip(("dq", "dk", "dv", "d_dense"), grads, ref_grads):
        assert_close(g.float(), r, atol=atol * scale * max(1.0, float(r.abs().max())), rtol=rtol * scale,
                     what=f"{what} {name}")


def test_the_backends_that_serve_packed_calls_are_the_expected_ones():
    assert {"sdpa", "flex"} <= set(_serving())
    packed = Packed([5, 3])
    q, k, v = _qkv(packed, grad=False)
    reasons = explain_call(q, k, v, packed=packed)
    assert reasons["reference"] == [] and reasons["sdpa"] == [] and reasons["flex"] == []
    for name, backend in BACKENDS.items():
        if backend.availability()[0] and not backend.supports_packed:
            assert any("packed variable-length sequences (packed2-max5) are not supported" in r
                       for r in reasons[name]), (name, reasons[name])


def test_equal_lengths_run_as_one_batch_without_copying_q_k_v(monkeypatch):
    """All lengths equal: the bucketed path hands SDPA one [n, H, L, D] strided view of q, k, v."""
    import torch.nn.functional as F

    packed = Packed([6, 6, 6, 6])
    q, k, v = _qkv(packed, grad=False)
    seen = []
    real = F.scaled_dot_product_attention

    def recording(q_, k_, v_, **kw):
        seen.append((q_.shape, q_.data_ptr() == q.data_ptr()))
        return real(q_, k_, v_, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    out = attend(q, k, v, packed=packed, backend="sdpa")
    assert seen == [((4, 3, 6, 16), True)]
    want, _, _ = _by_hand(q, k, v, packed)
    assert_close(out, want, atol=1e-5, rtol=1e-5, what="equal lengths")
    seen.clear()
    attend(q, k, v, packed=Packed([6, 12, 6]), backend="sdpa")  # two buckets: (6, 6) twice, (12, 12) once
    assert sorted(s for s, _ in seen) == [(1, 3, 12, 16), (2, 3, 6, 16)]


def test_layouts_with_equal_lengths_share_a_plan_and_flex_builds_its_block_mask_once(monkeypatch):
    clear_plans()
    packed = Packed([5, 3, 4])
    q, k, v = _qkv(packed, grad=False)
    for _ in range(2):
        attend(q, k, v, packed=Packed([5, 3, 4]), backend="sdpa")
    assert plan_info()["built"] == 1
    attend(q, k, v, packed=Packed([4, 4, 4]), backend="sdpa")
    assert plan_info()["built"] == 2

    from torch.nn.attention import flex_attention as fa

    built = []
    real = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **kw: built.append(a[3:5]) or real(*a, **kw))
    for _ in range(3):
        attend(q, k, v, packed=packed, backend="flex")
    assert built == [(12, 12)]


def test_xformers_gets_a_block_diagonal_mask_built_once_per_layout(monkeypatch):
    """xformers is CUDA-only and absent here: a stand-in with xformers' API (``BlockDiagonalMask.from_seqlens``,
    ``memory_efficient_attention`` on ``[1, N, H, D]``) checks what the backend hands it and how it lays
    the result out."""
    import sys
    import types

    from fastvit.attention import make_inputs
    from fastvit.attention.backends.xformers import XFormersBackend

    built = []

    class BlockDiagonalMask:
        def __init__(self, q_seqlen, kv_seqlen):
            self.q_seqlen, self.kv_seqlen = q_seqlen, kv_seqlen

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None, device=None):
            built.append((list(q_seqlen), list(kv_seqlen), device))
            return cls(list(q_seqlen), list(kv_seqlen))

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert isinstance(attn_bias, BlockDiagonalMask) and q.shape[0] == 1 and q.shape[2] == 3  # (1, n, h, d)
        outs, q0, k0 = [], 0, 0
        for nq, nk in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen):
            s = torch.einsum("bqhd,bkhd->bhqk", q[:, q0:q0 + nq], k[:, k0:k0 + nk]) * scale
            outs.append(torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v[:, k0:k0 + nk]))
            q0, k0 = q0 + nq, k0 + nk
        return torch.cat(outs, 1)

    fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask))
    ops = types.SimpleNamespace(fmha=fmha, memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    packed = Packed(*LAYOUTS["cross"])
    q, k, v = _qkv(packed, grad=False)
    for _ in range(2):
        out = XFormersBackend.forward(make_inputs(q, k, v, packed=packed)).out
    assert built == [([6, 2, 9], [4, 11, 9], q.device)]  # once per layout and device
    want, _, _ = _by_hand(q, k, v, packed)
    assert_close(out, want, atol=1e-5, rtol=1e-5, what="xformers packed layout")
    bias = DenseBias(torch.zeros(1, 1, packed.total, packed.kv_total))
    assert any("BlockDiagonalMask takes no additive bias" in r
               for r in XFormersBackend.extra_reasons(make_inputs(q, k, v, packed=packed, bias=bias)))
