"""``Window``: the geometry is proven against the way the models cut windows by hand (Swin's roll,
partition and region mask; CrossFormer's and MaxViT's rearranges), and bad windows fail early.
Every backend's windowed cases against the reference are in test_backends.py (``WINDOW_SHAPES``)."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from helpers import assert_close

from fastvit.attention import BACKENDS, DenseBias, KeyPaddingMask, RelPosBias, Window, attend, explain_call


def _naive_attention(q, k, v, bias=None):
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


def _swin(x_q, x_k, x_v, grid, ws, shift, table=None, index=None):
    """Swin's shifted-window attention written as Swin writes it, on (b, heads, H, W, d) maps."""
    H, W = grid
    rolled = [torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(2, 3)) for t in (x_q, x_k, x_v)]
    # window_partition: (b, h, H, W, d) -> (b, nW, h, ws*ws, d)
    parts = [rearrange(t, "b h (nh wh) (nw ww) d -> b (nh nw) h (wh ww) d", wh=ws[0], ww=ws[1]) for t in rolled]
    img_mask = torch.zeros(H, W)
    cnt = 0
    h_slices = (slice(0, -ws[0]), slice(-ws[0], -shift[0]), slice(-shift[0], None)) if shift[0] else (slice(None),)
    w_slices = (slice(0, -ws[1]), slice(-ws[1], -shift[1]), slice(-shift[1], None)) if shift[1] else (slice(None),)
    for hs in h_slices:
        for wsl in w_slices:
            img_mask[hs, wsl] = cnt
            cnt += 1
    mask_windows = rearrange(img_mask, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=ws[0], ww=ws[1])
    diff = mask_windows[:, None, :] - mask_windows[:, :, None]
    attn_mask = torch.zeros_like(diff).masked_fill(diff != 0, float("-inf"))  # Swin: -100.0
    bias = attn_mask[None, :, None]  # (1, nW, 1, n, n)
    if table is not None:
        bias = bias + table[index].permute(2, 0, 1)[None, None]
    out = _naive_attention(*parts, bias)
    out = rearrange(out, "b (nh nw) h (wh ww) d -> b h (nh wh) (nw ww) d", nh=H // ws[0], wh=ws[0], ww=ws[1])
    return torch.roll(out, shifts=shift, dims=(2, 3))


def _maps(b=2, heads=3, grid=(8, 12), d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, grid[0], grid[1], d, generator=g) for _ in range(3)]


def _tokens(t):  # (b, h, H, W, d) -> (b, h, H*W, d): raster order, a view
    return t.flatten(2, 3)


@pytest.mark.parametrize("grid,ws,shift", [((8, 12), (4, 4), (2, 2)), ((8, 12), (4, 6), (1, 3)),
                                           ((8, 8), (4, 4), (0, 2)), ((6, 9), (3, 3), (0, 0)),
                                           ((4, 12), (4, 4), (2, 1)), ((12, 8), (3, 8), (1, 5))])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_shifted_windows_match_swin(grid, ws, shift, backend):
    q, k, v = _maps(grid=grid)
    T = (2 * ws[0] - 1) * (2 * ws[1] - 1)
    table = torch.randn(T, 3)
    index = torch.randint(0, T, (ws[0] * ws[1],) * 2)
    expected = _swin(q, k, v, grid, ws, shift, table, index)
    out = attend(_tokens(q), _tokens(k), _tokens(v), window=Window(grid=grid, size=ws, shift=shift),
                 bias=RelPosBias(table, index), backend=backend)
    assert_close(out, _tokens(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_shifted_windows_copy_the_same_with_and_without_autograd(backend):
    """Inference gathers shifted windows straight from the grid (no roll); a call that records gradients
    rolls first. Both give Swin's result, and the output is laid out like q (a fused projection's view)."""
    b, heads, grid, d = 2, 3, (8, 12), 8
    qkv = torch.randn(b, grid[0] * grid[1], 3, heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, N, d) views with the token dim outermost
    window = Window(grid=grid, size=(4, 4), shift=(2, 3))
    with torch.no_grad():
        eager = attend(q, k, v, window=window, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    recorded = attend(*leaves, window=window, backend=backend)
    maps = [t.unflatten(2, grid) for t in (q, k, v)]
    assert_close(eager, _tokens(_swin(*maps, grid, (4, 4), (2, 3))), atol=1e-5, rtol=1e-5)
    assert_close(eager, recorded, atol=1e-6, rtol=1e-6)
    assert eager.stride(2) > eager.stride(1)  # tokens outer, heads inner: merging the heads is a view


def test_shift_mask_is_exact_across_the_wrap():
    # Keys across the wrap get probability 0: a huge value there must not leak into the output.
    grid, ws, shift = (8, 8), (4, 4), (2, 2)
    q, k, v = _maps(b=1, heads=1, grid=grid)
    win = Window(grid=grid, size=ws, shift=shift)
    base = attend(_tokens(q), _tokens(k), _tokens(v), window=win, backend="reference")
    # Token (0, 0) sits in the last window of the rolled grid with rows 6, 7, 0, 1: rows 0-1 are across
    # the wrap from rows 6-7, so row 6's queries must not see row 0's values.
    v2 = v.clone()
    v2[:, :, 0, 0] = 1e6
    out = attend(_tokens(q), _tokens(k), _tokens(v2), window=win, backend="reference")
    changed = (out - base).abs().amax(dim=-1)[0, 0].view(grid)
    assert changed[6:, :].max() == 0 and changed[:, 6:].max() == 0
    assert changed[0, 0] > 0  # the token itself still sees its own value


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_dilated_windows_match_crossformer_long_distance_and_maxvit_grid(backend):
    q, k, v = _maps(grid=(8, 12))
    # CrossFormer long distance, window (token count) wsz per axis: x is (l1 h), window = (h, w), position = (l1, l2)
    wsz = (2, 3)
    parts = [rearrange(t, "b n (l1 h) (l2 w) d -> b (h w) n (l1 l2) d", l1=wsz[0], l2=wsz[1]) for t in (q, k, v)]
    expected = rearrange(_naive_attention(*parts), "b (h w) n (l1 l2) d -> b n (l1 h) (l2 w) d",
                         h=8 // wsz[0], l1=wsz[0], l2=wsz[1])
    win = Window(grid=(8, 12), size=wsz, dilation=(8 // wsz[0], 12 // wsz[1]))
    assert_close(attend(*map(_tokens, (q, k, v)), window=win, backend=backend), _tokens(expected), atol=1e-5, rtol=1e-5)
    # MaxViT grid attention with grid g: x is (w1 x), window = (x, y), position = (w1, w2)
    g = 4
    parts = [rearrange(t, "b n (w1 x) (w2 y) d -> b (x y) n (w1 w2) d", w1=g, w2=g) for t in (q, k, v)]
    expected = rearrange(_naive_attention(*parts), "b (x y) n (w1 w2) d -> b n (w1 x) (w2 y) d", x=8 // g, w1=g, w2=g)
    win = Window(grid=(8, 12), size=(g, g), dilation=(8 // g, 12 // g))
    assert_close(attend(*map(_tokens, (q, k, v)), window=win, backend=backend), _tokens(expected), atol=1e-5, rtol=1e-5)


def test_plain_windows_match_a_rearrange_partition_with_a_per_window_bias():
    q, k, v = _maps(grid=(6, 8))
    ws = (3, 4)
    n = ws[0] * ws[1]
    dense = torch.randn(4, 3, n, n)  # one bias per window
    parts = [rearrange(t, "b h (nh wh) (nw ww) d -> b (nh nw) h (wh ww) d", wh=3, ww=4) for t in (q, k, v)]
    expected = rearrange(_naive_attention(*parts, dense), "b (nh nw) h (wh ww) d -> b h (nh wh) (nw ww) d",
                         nh=2, wh=3, ww=4)
    out = attend(*map(_tokens, (q, k, v)), window=Window(grid=(6, 8), size=ws), bias=DenseBias(dense))
    assert_close(out, _tokens(expected), atol=1e-5, rtol=1e-5)


def test_token_index_of_dilated_windows_with_several_blocks():
    # 8 rows, windows of 2 rows with dilation 2: blocks of 4 rows, two interleaved windows per block.
    win = Window(grid=(8, 1), size=(2, 1), dilation=(2, 1))
    assert win.token_index().tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert win.inverse_index()[win.token_index().reshape(-1)].tolist() == list(range(8))


def test_window_properties_and_id():
    win = Window(grid=(56, 56), size=7, shift=3)
    assert (win.grid, win.size, win.shift, win.dilation) == ((56, 56), (7, 7), (3, 3), (1, 1))
    assert win.tokens == 49 and win.num_windows == 64 and win.seq_len == 3136
    assert win.describe() == "win7x7-grid56x56-shift3x3"
    assert win.region_mask() is not None and Window(grid=8, size=4).region_mask() is None
    # Only the last window row/column of a shifted grid holds two regions.
    mask = win.region_mask()
    assert mask[0].all() and not mask[-1].all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(8, 8), size=(3, 3)), "does not divide the grid"),
    (dict(grid=(8, 8), size=(4, 4), dilation=(3, 1)), "does not divide the grid"),
    (dict(grid=(8, 8), size=(4, 4), shift=(4, 0)), "shift=.* must be smaller than size"),
    (dict(grid=(8, 8), size=(4, 4), shift=(-1, 0)), "shift=.* must be >= 0"),
    (dict(grid=(8, 8), size=(2, 2), shift=(1, 1), dilation=(2, 2)), "together are not supported"),
    (dict(grid=(8, 8), size=(0, 4)), "size=.* must be >= 1"),
    (dict(grid=(8, 8), size=(2.0, 2)), "must be an int or a pair of ints"),
])
def test_bad_windows_raise_naming_the_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Window(**kwargs)


def _qkv(n=64, heads=2, d=8):
    return [torch.randn(1, heads, n, d) for _ in range(3)]


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v, w: attend(q[:, :, :60], k[:, :, :60], v[:, :, :60], window=w), r"Nq = Nk = H\*W = 64"),
    (lambda q, k, v, w: attend(q, k, v, window=w, return_probs=True), "return_probs cannot be combined"),
    (lambda q, k, v, w: attend(q, k, v, window=w, return_cls_probs=True), "return_cls_probs cannot be combined"),
    (lambda q, k, v, w: attend(q, k, v, window=w, bias=KeyPaddingMask(torch.ones(1, 64, dtype=torch.bool))),
     "KeyPaddingMask cannot be combined with a window"),
    (lambda q, k, v, w: attend(q, k, v, window=w,
                               bias=RelPosBias(torch.randn(49, 2), torch.zeros(64, 64, dtype=torch.long))),
     r"window-local positions: expected \(n, n\) = \(16, 16\)"),
    (lambda q, k, v, w: attend(q, k, v, window=w, bias=DenseBias(torch.randn(1, 2, 64, 64))),
     r"does not broadcast to \[num_windows, heads, n, n\] = \(4, 2, 16, 16\)"),
    (lambda q, k, v, w: attend(q, k, v, window=(8, 8)), "window must be a fastvit.attention.Window"),
])
def test_bad_windowed_calls_raise_naming_the_values(call, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        call(q, k, v, Window(grid=(8, 8), size=(4, 4)))


def test_backends_say_whether_they_serve_windows():
    q, k, v = _qkv()
    reasons = explain_call(q, k, v, window=Window(grid=(8, 8), size=(4, 4), shift=(2, 2)))
    for name, backend in BACKENDS.items():
        if not backend.availability()[0]:
            continue  # the only reason of an unavailable backend is why it is unavailable
        refused = any("windowed attention (win4x4-grid8x8-shift2x2) is not supported" in r for r in reasons[name])
        assert refused == (not backend.supports_window), (name, reasons[name])
    assert reasons["reference"] == [] and reasons["sdpa"] == [] and reasons["flex"] == []


def test_windowed_gradients_reach_every_input():
    q, k, v = (t.requires_grad_() for t in _qkv())
    table = torch.randn(49, 2, requires_grad=True)
    dense = torch.randn(2, 16, 16, requires_grad=True)
    index = torch.randint(0, 49, (16, 16))
    out = attend(q, k, v, window=Window(grid=(8, 8), size=(4, 4), shift=(1, 2)),
                 bias=(RelPosBias(table, index), DenseBias(dense)), backend="sdpa")
    out.square().sum().backward()
    for t in (q, k, v, table, dense):
        assert t.grad is not None and t.grad.abs().sum() > 0
