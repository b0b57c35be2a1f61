"""``fastvit.layers.WindowAttention`` and the window copies behind it: Swin-style shifted windows with
a relative table against a hand-written Swin block, the conv-map layout, the Recorder's per-window
maps, and the layouts ``window_batch`` / ``window_unbatch`` read and write."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from helpers import assert_close

from fastvit import Recorder
from fastvit.attention import Window, attend, use_backend
from fastvit.attention.partition import window_batch, window_unbatch
from fastvit.layers import WindowAttention, map_heads, merge_map_heads, window_relative_position_index


def _swin_block(attn: WindowAttention, x: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Swin's window attention written out: roll, partition, (table[index] + region mask), reverse, roll."""
    (H, W), (wh, ww), (sh, sw) = grid, attn.window_size, attn.shift
    b, _, _ = x.shape
    qkv = attn.to_qkv(attn.norm(x)).view(b, H, W, 3, attn.heads, -1)
    qkv = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2))
    q, k, v = rearrange(qkv, "b (y s1) (x s2) t h d -> t (b y x) h (s1 s2) d", s1=wh, s2=ww)
    logits = (q * attn.scale) @ k.transpose(-1, -2)
    logits = logits + attn.rel_pos_table[attn.rel_pos_index].permute(2, 0, 1)
    region = torch.zeros(H, W)
    for i, rows in enumerate((slice(0, H - wh), slice(H - wh, H - sh), slice(H - sh, H)) if sh else (slice(None),)):
        for j, cols in enumerate((slice(0, W - ww), slice(W - ww, W - sw), slice(W - sw, W)) if sw else (slice(None),)):
            region[rows, cols] = i * 3 + j
    region = rearrange(region, "(y s1) (x s2) -> (y x) (s1 s2)", s1=wh, s2=ww)
    mask = torch.zeros(region.shape[0], region.shape[1], region.shape[1])
    mask.masked_fill_(region[:, :, None] != region[:, None, :], float("-inf"))
    logits = logits.view(b, -1, *logits.shape[1:]) + mask[None, :, None]
    out = logits.flatten(0, 1).softmax(-1) @ v  # (b * windows, h, n, d)
    out = rearrange(out, "(b y x) h (s1 s2) d -> b (y s1) (x s2) (h d)", b=b, y=H // wh, s1=wh, s2=ww)
    out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return attn.to_out(out.reshape(b, H * W, -1))


@pytest.mark.parametrize("grid,window_size,shift", [((8, 8), 4, 2), ((8, 12), (4, 6), (1, 3)), ((6, 6), 3, 0)])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_shifted_windows_with_a_relative_table_match_a_swin_block(grid, window_size, shift, backend):
    torch.manual_seed(0)
    attn = WindowAttention(16, heads=2, dim_head=8, window_size=window_size, shift=shift, rel_pos_bias=True).eval()
    with torch.no_grad():
        attn.rel_pos_table.normal_()
    x = torch.randn(2, grid[0] * grid[1], 16)
    with torch.no_grad(), use_backend(backend):
        assert_close(attn(x, grid=grid), _swin_block(attn, x, grid), atol=1e-5, rtol=1e-5, what="vs Swin")


def test_relative_position_index_is_swins():
    swin = pytest.importorskip("timm.models.swin_transformer")
    for size in ((7, 7), (4, 6), (1, 3)):
        assert torch.equal(window_relative_position_index(size), swin.get_relative_position_index(*size))


def test_keys_and_the_index_buffer():
    attn = WindowAttention(16, heads=2, dim_head=8, window_size=(3, 4), rel_pos_bias=True)
    assert list(attn.state_dict()) == ["rel_pos_table", "norm.weight", "norm.bias", "to_qkv.weight",
                                       "to_out.0.weight", "to_out.0.bias"]
    assert attn.rel_pos_table.shape == (5 * 7, 2) and attn.rel_pos_index.shape == (12, 12)
    conv = WindowAttention(16, heads=2, dim_head=8, conv=True, fused_qkv=False, proj_dropout=None)
    assert list(conv.state_dict()) == ["norm.g", "norm.b", "to_q.weight", "to_kv.weight", "to_out.weight",
                                       "to_out.bias"]
    with pytest.raises(ValueError, match="needs grid"):
        attn(torch.randn(1, 12, 16))


def test_conv_layout_is_attention_per_window_of_the_map():
    torch.manual_seed(0)
    attn = WindowAttention(8, heads=2, dim_head=4, window_size=2, conv=True).eval()
    x = torch.randn(2, 8, 4, 6)
    with torch.no_grad():
        out = attn(x)
        # the same module on each 2x2 window cut out by hand (the norm and the 1x1 convs are per pixel)
        for r in range(0, 4, 2):
            for c in range(0, 6, 2):
                assert_close(out[..., r:r + 2, c:c + 2], attn(x[..., r:r + 2, c:c + 2]), atol=1e-5, rtol=1e-5,
                             what=f"window at {(r, c)}")


def test_map_heads_are_views_and_the_windowed_output_merges_as_a_view():
    x = torch.randn(2, 3 * 2 * 4, 4, 6)
    q, k, v = map_heads(x, heads=2, parts=3)
    assert q.shape == (2, 2, 24, 4) and q.data_ptr() == x.data_ptr()
    assert torch.equal(v, rearrange(x.chunk(3, dim=1)[2], "b (h d) x y -> b h (x y) d", h=2))
    out = attend(q, k, v, window=Window(grid=(4, 6), size=(2, 3)), backend="reference")
    merged = merge_map_heads(out, (4, 6))
    assert merged.shape == (2, 8, 4, 6) and merged.data_ptr() == out.data_ptr()  # no copy


@pytest.mark.parametrize("window", [Window(grid=(8, 12), size=(4, 4), shift=(2, 2)),
                                    Window(grid=(8, 12), size=(2, 3), dilation=(4, 4)),
                                    Window(grid=(6, 9), size=(3, 3))], ids=lambda w: w.describe())
@pytest.mark.parametrize("layout", ["contiguous", "map", "fused"])
def test_window_copies_follow_token_index_and_keep_the_layout_of_q(window, layout):
    B, h, d, N = 2, 3, 5, window.seq_len
    x = {"contiguous": torch.randn(B, h, N, d),
         "map": torch.randn(B, h, d, N).transpose(-1, -2),  # a (b, h*d, H, W) conv output
         "fused": torch.randn(B, N, 3, h, d)[:, :, 1].transpose(1, 2)}[layout]  # a fused (b, N, 3*h*d) Linear
    index = window.token_index().reshape(-1)
    expected = x.index_select(2, index).view(B, h, window.num_windows, window.tokens, d).transpose(1, 2)
    batched = window_batch(x, window)
    assert torch.equal(batched, expected.reshape(B * window.num_windows, h, window.tokens, d))
    back = window_unbatch(batched, window, like=x)
    assert torch.equal(back, x)
    order = sorted(range(4), key=lambda i: -x.stride(i))
    assert sorted(range(4), key=lambda i: -back.stride(i)) == order  # written in q's memory order


def test_recorder_sees_the_maps_of_every_window_and_the_output_is_unchanged():
    torch.manual_seed(0)
    attn = WindowAttention(16, heads=2, dim_head=8, window_size=4, shift=2, rel_pos_bias=True).eval()
    x = torch.randn(2, 64, 16)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, grid=(8, 8))

    with torch.no_grad():
        plain = attn(x, grid=(8, 8))
        out, maps = Recorder(Wrapper())(x)
    assert_close(out, plain, atol=1e-6, rtol=1e-6, what="recorded vs plain")
    assert tuple(maps.shape) == (2 * 4, 1, 2, 16, 16)  # (b * windows, layers, heads, n, n)
    assert_close(maps.sum(-1), torch.ones(8, 1, 2, 16), atol=1e-5, rtol=0, what="rows sum to 1")
    assert (maps[-1] == 0).any() and not (maps[0] == 0).any()  # the shifted last window masks across the wrap


@pytest.mark.parametrize("window", [Window(grid=(56, 56), size=(7, 7)),
                                    Window(grid=(56, 56), size=(8, 8), dilation=(7, 7)),
                                    Window(grid=(16, 12), size=(2, 3), dilation=(4, 2))], ids=lambda w: w.describe())
@pytest.mark.parametrize("elements", [1, 3000, 5000])  # a window row per chunk, within and across blocks
def test_cpu_inference_in_chunks_of_window_rows_is_the_whole_batch(window, elements, monkeypatch):
    import fastvit.attention.partition as window_module
    from fastvit.attention import DenseBias, RelPosBias, make_inputs

    torch.manual_seed(0)
    B, h, d, n = 2, 3, 8, window.tokens
    q, k, v = (torch.randn(B, h, d, window.seq_len).transpose(-1, -2) for _ in range(3))  # a conv map's layout
    bias = (RelPosBias(torch.randn(20, h), torch.randint(0, 20, (n, n))), DenseBias(torch.randn(window.num_windows, 1,
                                                                                               n, n)))
    with torch.inference_mode():
        monkeypatch.setattr(window_module, "CPU_CHUNK_ELEMENTS", 1 << 40)
        whole = attend(q, k, v, window=window, bias=bias, backend="reference")
        monkeypatch.setattr(window_module, "CPU_CHUNK_ELEMENTS", elements)
        assert len(window_module.window_chunks(make_inputs(q, k, v, window=window, bias=bias))) > 1
        for backend in ("reference", "sdpa"):
            chunked = attend(q, k, v, window=window, bias=bias, backend=backend)
            assert_close(chunked, whole, atol=1e-5, rtol=1e-5, what=f"{backend} in chunks")
            assert chunked.stride() == whole.stride()  # written in place, in q's memory order
    q.requires_grad_()
    training = make_inputs(q, k, v, window=window)
    assert window_module.window_chunks(training) == [window_module.ALL]  # with a gradient: one batch
