"""fastvit.kernels.window_attention under the interpreter: forward and gradients against
window_attention_ref over generated window cases (shift, dilation, biases, dtypes, head dims, padded
and multi-block windows), padding poisoning, bitwise reproducible bias gradients, exact shift
masks, refusals, and the reference itself against Swin's, CrossFormer's and MaxViT's own code.

On the CPU these run under TRITON_INTERPRET=1 (numpy), so shapes stay small. Every comparison is
on fp32 copies of the inputs, with the triton backend's tolerances (atol = rtol; for gradients atol
scaled by the size of the expected values, as in test_attention_interpret).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from einops import rearrange
from fastvit.kernels import window_attention as kwin
from helpers import assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOLERANCES = {F32: 1e-4, BF16: 1.6e-2, F16: 2e-3}  # atol = rtol
DTYPE_NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}
SCALE = 0.3


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WinCase:
    dtype: torch.dtype
    B: int
    heads: int
    grid: tuple
    size: tuple
    shift: tuple = (0, 0)
    dilation: tuple = (1, 1)
    D: int = 16
    Dv: Optional[int] = None
    rel: bool = False
    dense: Optional[str] = None  # "window" [nW, 1, n, n], "heads" [heads, n, n], "full" [nW, heads, n, n], "2d" [n, n]
    backward: bool = True

    @property
    def n(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def num_windows(self) -> int:
        return (self.grid[0] // self.size[0]) * (self.grid[1] // self.size[1])

    @property
    def kwargs(self) -> dict:
        return dict(grid=self.grid, size=self.size, shift=self.shift, dilation=self.dilation)

    @property
    def id(self) -> str:
        parts = [DTYPE_NAMES[self.dtype], f"B{self.B}", f"H{self.heads}", f"g{self.grid[0]}x{self.grid[1]}",
                 f"w{self.size[0]}x{self.size[1]}"]
        if self.shift != (0, 0):
            parts.append(f"s{self.shift[0]}x{self.shift[1]}")
        if self.dilation != (1, 1):
            parts.append(f"d{self.dilation[0]}x{self.dilation[1]}")
        parts.append(f"D{self.D}" + (f"-Dv{self.Dv}" if self.Dv not in (None, self.D) else ""))
        parts += (["rel"] if self.rel else []) + ([f"dense[{self.dense}]"] if self.dense else [])
        return "-".join(parts) + ("" if self.backward else "-fwd")


def make_inputs(case: WinCase, device: str, seed: int = 0) -> dict:
    """q, k, v and the biases of a case (requiring grad when the case runs backward)."""
    g = torch.Generator().manual_seed(seed)
    tokens, n, nw = case.grid[0] * case.grid[1], case.n, case.num_windows
    rand = lambda *shape, dtype=case.dtype: torch.randn(*shape, generator=g).to(dtype).to(device)
    inputs = dict(q=rand(case.B, case.heads, tokens, case.D), k=rand(case.B, case.heads, tokens, case.D),
                  v=rand(case.B, case.heads, tokens, case.Dv or case.D))
    if case.rel:
        table_size = 23
        inputs["rel_table"] = rand(table_size, case.heads, dtype=F32)
        inputs["rel_index"] = torch.randint(0, table_size, (n, n), generator=g).to(device)
    if case.dense:
        shape = {"window": (nw, 1, n, n), "heads": (case.heads, n, n), "full": (nw, case.heads, n, n),
                 "2d": (n, n)}[case.dense]
        inputs["dense_bias"] = rand(*shape, dtype=F32)
    if case.backward:
        for name in ("q", "k", "v", "rel_table", "dense_bias"):
            if name in inputs:
                inputs[name].requires_grad_(True)
    return inputs


def fp32_copies(inputs: dict) -> dict:
    return {name: (t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t)
            for name, t in inputs.items()}


def differentiable(inputs: dict) -> list[str]:
    return [name for name, t in inputs.items() if t.is_floating_point() and t.requires_grad]


def run_and_compare(case: WinCase, device: str) -> None:
    inputs = make_inputs(case, device)
    ref_inputs = fp32_copies(inputs)
    out = kwin.window_attention(**inputs, **case.kwargs, scale=SCALE)
    ref = kwin.window_attention_ref(**ref_inputs, **case.kwargs, scale=SCALE)
    tol = TOLERANCES[case.dtype]
    assert out.dtype == case.dtype and out.shape == ref.shape
    assert_close(out.float(), ref, atol=tol, rtol=tol, what=f"{case.id} out")
    if not case.backward:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).to(device)
    names = differentiable(inputs)
    grads = torch.autograd.grad(out, [inputs[x] for x in names], grad)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[x] for x in names], grad.float())
    for name, actual, expected in zip(names, grads, ref_grads):
        assert actual.shape == inputs[name].shape and actual.dtype == inputs[name].dtype, name
        # A gradient sums n (or batch * windows * n * n) products rounded to the input dtype: its
        # absolute error grows with its size, so atol is relative to max(1, max |expected|).
        atol = tol * max(1.0, expected.abs().max().item())
        assert_close(actual.float(), expected, atol=atol, rtol=tol, what=f"{case.id} d{name}")


# Few programs per case: the interpreter pays for every program (and every nested jit call).
CASES = [
    # non-square grid and windows (n = 12: one 16-tile), then a shift on both axes and on one
    WinCase(F32, 2, 1, (3, 8), (3, 4)),
    WinCase(F32, 1, 2, (6, 8), (3, 4), shift=(1, 2), rel=True, dense="window"),
    WinCase(F32, 1, 1, (3, 8), (3, 4), shift=(0, 2), rel=True),
    WinCase(F32, 1, 1, (6, 4), (3, 4), shift=(2, 0), dense="full"),
    # dilation: two blocks of interleaved windows along W; CrossFormer long distance style (one block)
    WinCase(F32, 1, 1, (4, 8), (2, 2), dilation=(1, 2), D=32, Dv=16, rel=True, dense="heads"),
    WinCase(F32, 1, 2, (9, 6), (3, 3), dilation=(3, 2), rel=True, dense="2d"),
    # tiles of 16 (n = 4, batch 2) and 32 (n = 20)
    WinCase(F32, 2, 1, (2, 4), (2, 2), rel=True),
    WinCase(BF16, 1, 1, (4, 10), (4, 5), shift=(2, 1), rel=True, D=32),
    # Swin's 7x7 windows (49 padded to 64), head dim 48 (padded to 64), Dv != D
    WinCase(BF16, 2, 2, (7, 7), (7, 7), shift=(3, 3), rel=True, D=32),
    WinCase(BF16, 1, 1, (14, 7), (7, 7), D=48, Dv=32, dense="window"),
    WinCase(F32, 1, 2, (7, 7), (7, 7), shift=(3, 3), D=16, Dv=32, rel=True),
    WinCase(F16, 1, 2, (7, 14), (7, 7), shift=(3, 3), rel=True, dense="window", D=32, backward=False),
    WinCase(F16, 1, 1, (3, 8), (3, 4), shift=(1, 1), rel=True),
    # windows larger than one tile: the key-block loop and the dQ / dK,dV kernels
    WinCase(F32, 1, 1, (10, 7), (10, 7), shift=(0, 3), dense="heads"),
    WinCase(BF16, 2, 1, (9, 9), (9, 9), shift=(4, 4), rel=True, dense="window", D=32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, device):
    run_and_compare(case, device)


def test_scale_defaults_and_empty_batch(device):
    case = WinCase(F32, 1, 1, (2, 4), (2, 2), backward=False)
    inputs = make_inputs(case, device)
    out = kwin.window_attention(**inputs, **case.kwargs)
    ref = kwin.window_attention_ref(**inputs, **case.kwargs, scale=case.D ** -0.5)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, what="default scale")
    empty = torch.empty(0, 1, 8, 16, device=device, requires_grad=True)
    out = kwin.window_attention(empty, empty, empty, **case.kwargs, scale=0.5)
    assert out.shape == (0, 1, 8, 16)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


# --------------------------------------------------------------------------------------------------
# the reference against each model's own code
# --------------------------------------------------------------------------------------------------

def _attend(qw, kw, vw, scale, bias=None):
    """Plain softmax attention over the last two dims (fp32)."""
    s = qw @ kw.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    return torch.softmax(s, dim=-1) @ vw


def swin_relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """Swin's ``relative_position_index`` for a (wh, ww) window: ``[n, n]`` into a
    ``(2 wh - 1)(2 ww - 1)`` table."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def _swin_window_partition(x, wh, ww):
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, wh, ww, c)


def _swin_window_reverse(windows, wh, ww, h, w):
    b = int(windows.shape[0] / (h * w / wh / ww))
    x = windows.view(b, h // wh, w // ww, wh, ww, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def swin_naive(q, k, v, grid, size, shift, scale, rel_table, rel_index):
    """Swin Transformer's SwinTransformerBlock steps: roll by -shift, window_partition, attention with
    the relative position bias and the region mask built from ``img_mask`` slices (with -inf instead
    of Swin's -100), window_reverse, roll back."""
    B, heads, _, _ = q.shape
    (H, W), (wh, ww), (sh, sw) = grid, size, shift
    n = wh * ww

    def partition(x):  # (B, heads, H*W, d) -> (B*nW, heads, n, d)
        d = x.shape[-1]
        x = x.permute(0, 2, 1, 3).reshape(B, H, W, heads * d)
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        return _swin_window_partition(x, wh, ww).view(-1, n, heads, d).permute(0, 2, 1, 3)

    bias = rel_table[rel_index.view(-1)].view(n, n, -1).permute(2, 0, 1)  # (heads, n, n)
    if sh or sw:
        img_mask = torch.zeros((1, H, W, 1))
        h_slices = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(0, None),)
        w_slices = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(0, None),)
        cnt = 0
        for hs in h_slices:
            for ws in w_slices:
                img_mask[:, hs, ws, :] = cnt
                cnt += 1
        mask_windows = _swin_window_partition(img_mask, wh, ww).view(-1, n)
        attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float("-inf")).masked_fill(attn_mask == 0, 0.0)
        nw = attn_mask.shape[0]
        bias = (bias.unsqueeze(0) + attn_mask.unsqueeze(1)).repeat(B, 1, 1, 1).view(B * nw, heads, n, n)
    x = _attend(partition(q), partition(k), partition(v), scale, bias)  # (B*nW, heads, n, dv)
    dv = x.shape[-1]
    x = x.permute(0, 2, 1, 3).reshape(-1, wh, ww, heads * dv)
    x = torch.roll(_swin_window_reverse(x, wh, ww, H, W), shifts=(sh, sw), dims=(1, 2))
    return x.reshape(B, H * W, heads, dv).permute(0, 2, 1, 3)


@pytest.mark.parametrize("grid,size,shift", [((8, 8), (4, 4), (2, 2)), ((6, 8), (3, 4), (1, 2)),
                                             ((6, 8), (3, 4), (0, 1)), ((6, 8), (3, 4), (2, 0)),
                                             ((14, 14), (7, 7), (3, 3)), ((6, 8), (3, 4), (0, 0))])
def test_reference_matches_swin(grid, size, shift):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, grid[0] * grid[1], 8, generator=g) for _ in range(3))
    index = swin_relative_position_index(*size)
    table = torch.randn((2 * size[0] - 1) * (2 * size[1] - 1), 3, generator=g)
    ref = kwin.window_attention_ref(q, k, v, grid=grid, size=size, shift=shift, scale=SCALE, rel_table=table,
                                    rel_index=index)
    assert_close(ref, swin_naive(q, k, v, grid, size, shift, SCALE, table, index), atol=1e-5, rtol=1e-5,
                 what=f"swin grid={grid} size={size} shift={shift}")


def crossformer_lda_naive(q, k, v, grid, interval, scale, bias):
    """CrossFormer's long-distance attention: ``x.reshape(B, G, I, G, I, C).permute(0, 2, 4, 1, 3, 5)``
    groups tokens ``interval`` apart into (I x I) groups of (G x G) tokens."""
    B, heads, _, _ = q.shape
    H, W = grid
    i = interval

    def partition(x):
        d = x.shape[-1]
        x = x.permute(0, 2, 1, 3).reshape(B, H // i, i, W // i, i, heads * d).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B * i * i, (H // i) * (W // i), heads, d).permute(0, 2, 1, 3)

    x = _attend(partition(q), partition(k), partition(v), scale, bias)  # (B*I*I, heads, G*G, dv)
    dv = x.shape[-1]
    x = x.permute(0, 2, 1, 3).reshape(B, i, i, H // i, W // i, heads * dv).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, H * W, heads, dv).permute(0, 2, 1, 3)


def maxvit_grid_naive(q, k, v, grid, window, scale, bias):
    """MaxViT's grid attention: ``rearrange(x, 'b d (w1 x) (w2 y) -> b x y w1 w2 d', w1=w, w2=w)``."""
    B, heads, _, _ = q.shape
    H, W = grid

    def partition(x):
        x = rearrange(x.reshape(B, heads, H, W, -1), "b h (w1 x) (w2 y) d -> b x y h (w1 w2) d", w1=window,
                      w2=window)
        return x.reshape(-1, *x.shape[3:])

    x = _attend(partition(q), partition(k), partition(v), scale, bias)
    x = x.reshape(B, H // window, W // window, heads, window, window, -1)
    return rearrange(x, "b x y h w1 w2 d -> b h (w1 x w2 y) d")


def dilated_rearrange_naive(q, k, v, grid, size, dilation, scale, bias):
    """Blocks of ``size * dilation`` rows / columns, each holding ``dilation`` interleaved windows."""
    (H, W), (wh, ww), (dh, dw) = grid, size, dilation
    pattern = "b h (nb wh dh) (mb ww dw) d -> b (nb dh mb dw) h (wh ww) d"
    dims = dict(wh=wh, ww=ww, dh=dh, dw=dw)
    part = lambda x: rearrange(x.reshape(*x.shape[:2], H, W, -1), pattern, **dims)
    x = _attend(part(q), part(k), part(v), scale, bias)
    x = rearrange(x, "b (nb dh mb dw) h (wh ww) d -> b h (nb wh dh) (mb ww dw) d", nb=H // (wh * dh), **dims)
    return x.reshape(*x.shape[:2], H * W, -1)


def test_reference_matches_crossformer_maxvit_and_dilated_blocks():
    g = torch.Generator().manual_seed(0)
    for grid, interval in (((12, 12), 3), ((8, 12), 4)):
        size = (grid[0] // interval, grid[1] // interval)
        q, k, v = (torch.randn(2, 2, grid[0] * grid[1], 8, generator=g) for _ in range(3))
        bias = torch.randn(2, size[0] * size[1], size[0] * size[1], generator=g)  # dynamic position bias
        ref = kwin.window_attention_ref(q, k, v, grid=grid, size=size, dilation=(interval, interval), scale=SCALE,
                                        dense_bias=bias)
        assert_close(ref, crossformer_lda_naive(q, k, v, grid, interval, SCALE, bias), atol=1e-5, rtol=1e-5,
                     what=f"crossformer lda grid={grid} interval={interval}")
    for grid, window in (((12, 12), 3), ((8, 12), 4)):
        q, k, v = (torch.randn(1, 2, grid[0] * grid[1], 8, generator=g) for _ in range(3))
        ref = kwin.window_attention_ref(q, k, v, grid=grid, size=(window, window),
                                        dilation=(grid[0] // window, grid[1] // window), scale=SCALE)
        assert_close(ref, maxvit_grid_naive(q, k, v, grid, window, SCALE, None), atol=1e-5, rtol=1e-5,
                     what=f"maxvit grid={grid} window={window}")
    for grid, size, dilation in (((12, 8), (2, 2), (3, 2)), ((8, 8), (2, 2), (2, 2)), ((6, 8), (3, 4), (1, 1))):
        q, k, v = (torch.randn(1, 2, grid[0] * grid[1], 8, generator=g) for _ in range(3))
        ref = kwin.window_attention_ref(q, k, v, grid=grid, size=size, dilation=dilation, scale=SCALE)
        assert_close(ref, dilated_rearrange_naive(q, k, v, grid, size, dilation, SCALE, None), atol=1e-5, rtol=1e-5,
                     what=f"dilated grid={grid} size={size} dilation={dilation}")


@pytest.mark.parametrize("geometry", [((56, 56), (7, 7), (3, 3), (1, 1)), ((6, 8), (3, 4), (0, 2), (1, 1)),
                                      ((12, 8), (2, 2), (0, 0), (3, 2)), ((9, 6), (3, 3), (0, 0), (3, 2))])
def test_token_index_matches_the_window_descriptor(geometry):
    """The kernels and fastvit.attention's Window use the same geometry."""
    from fastvit.attention.window import Window

    index, region = kwin.window_token_index(*geometry)
    win = Window(*geometry)
    assert torch.equal(index, win.token_index())
    mask = win.region_mask()
    same = region[:, :, None] == region[:, None, :]
    assert (mask is None and bool(same.all())) or torch.equal(same, mask)


# --------------------------------------------------------------------------------------------------
# kernel properties
# --------------------------------------------------------------------------------------------------

def _poisoned(t: torch.Tensor, token_stride: int = 2, extra: int = 5) -> torch.Tensor:
    """The same values as a view into a larger NaN-filled buffer: tokens ``token_stride`` rows apart,
    the head dim at an offset inside a wider row."""
    B, heads, tokens, d = t.shape
    buf = torch.full((B, heads, tokens * token_stride, d + 2 * extra), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[:, :, ::token_stride, extra:extra + d]
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("case", [WinCase(F32, 1, 2, (7, 7), (7, 7), shift=(3, 3), D=48, Dv=16, rel=True,
                                          dense="window"),
                                  WinCase(F32, 1, 1, (10, 7), (10, 7), shift=(0, 3), D=24, rel=True),
                                  WinCase(BF16, 1, 1, (6, 4), (3, 4), dilation=(2, 1), D=32, dense="heads")],
                         ids=lambda c: c.id)
def test_padding_poisoning(case, device):
    """Inputs, biases and the output gradient as views into NaN-filled memory: nothing changes, so no
    kernel reads outside the tensors (padded window positions, padded head dims, strided rows)."""
    inputs = make_inputs(case, device)
    out = kwin.window_attention(**inputs, **case.kwargs, scale=SCALE)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).to(device)
    names = differentiable(inputs)
    grads = torch.autograd.grad(out, [inputs[x] for x in names], grad)

    poisoned = {name: (_poisoned(t) if name in ("q", "k", "v") else t) for name, t in inputs.items()}
    if "dense_bias" in inputs:
        dense = inputs["dense_bias"].detach()
        buf = torch.full((*dense.shape[:-1], dense.shape[-1] + 3), float("nan"), device=device)
        buf[..., :dense.shape[-1]] = dense
        poisoned["dense_bias"] = buf[..., :dense.shape[-1]].requires_grad_(True)
    if "rel_table" in inputs:
        table = inputs["rel_table"].detach()
        buf = torch.full((table.shape[0] + 4, table.shape[1] * 2), float("nan"), device=device)
        buf[:table.shape[0], ::2] = table
        poisoned["rel_table"] = buf[:table.shape[0], ::2].requires_grad_(True)
    out_p = kwin.window_attention(**poisoned, **case.kwargs, scale=SCALE)
    grad_p = _poisoned(grad[..., None, :].squeeze(-2))
    grads_p = torch.autograd.grad(out_p, [poisoned[x] for x in names], grad_p)
    assert torch.equal(out_p, out), "the output changed with poisoned padding"
    for name, a, b in zip(names, grads_p, grads):
        assert not torch.isnan(a).any(), f"d{name} read poisoned memory"
        assert torch.equal(a, b), f"d{name} changed with poisoned padding"


REDUCTION_CASE = WinCase(F32, 3, 1, (3, 6), (3, 3), shift=(1, 1), rel=True, dense="window")  # 2 windows


@pytest.mark.parametrize("target_programs", [1, 4])
def test_bias_gradients_reduced_over_batch_chunks(target_programs, device, monkeypatch):
    """The one-tile backward sums dS over batch chunks inside its programs: with 1 target program the
    whole batch (3) in each program, with 4 chunks of 2 and a short last one (the default: one
    element per program, the cases above)."""
    monkeypatch.setattr(kwin, "DS_TARGET_PROGRAMS", target_programs)
    assert kwin._batch_chunks(3, 1, 2, 64 * 64 * 4) == (3 if target_programs == 1 else 2)
    run_and_compare(REDUCTION_CASE, device)


def test_bias_gradients_are_bitwise_reproducible(device, monkeypatch):
    monkeypatch.setattr(kwin, "DS_TARGET_PROGRAMS", 4)
    runs = []
    for _ in range(2):
        inputs = make_inputs(REDUCTION_CASE, device)
        out = kwin.window_attention(**inputs, **REDUCTION_CASE.kwargs, scale=SCALE)
        runs.append(torch.autograd.grad(out.sum() * 1.5, [inputs["rel_table"], inputs["dense_bias"]]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_multi_block_bias_gradients_in_batch_chunks(device, monkeypatch):
    """Windows larger than a tile store dS per batch element; a small buffer limit runs the dQ kernel
    over the batch in chunks whose partial sums are added in order."""
    monkeypatch.setattr(kwin, "DS_BUFFER_MAX_BYTES", 1)
    run_and_compare(WinCase(F32, 2, 1, (9, 9), (9, 9), rel=True, dense="heads"), device)


@pytest.mark.parametrize("size,grid,shift", [((3, 3), (3, 6), (1, 1)), ((9, 9), (9, 9), (4, 4))],
                         ids=["one-tile", "multi-block"])
def test_shift_masks_are_exact(size, grid, shift, device):
    """Keys across the wrap get probability exactly 0: a +1000 bias on every cross-region pair changes
    nothing (a -100 mask would let it dominate), and its gradient there is exactly 0."""
    index, region = kwin.window_token_index(grid, size, shift)
    cross = (region[:, :, None] != region[:, None, :]).unsqueeze(1)  # (nW, 1, n, n)
    assert cross.any()
    case = WinCase(F32, 1, 1, grid, size, shift=shift, rel=True)
    inputs = make_inputs(case, device)
    plain = kwin.window_attention(**inputs, **case.kwargs, scale=SCALE)
    bias = (cross.float() * 1000.0).to(device).requires_grad_(True)
    out = kwin.window_attention(**inputs, **case.kwargs, scale=SCALE, dense_bias=bias)
    ref = kwin.window_attention_ref(**fp32_copies(inputs), **case.kwargs, scale=SCALE, dense_bias=bias)
    assert_close(out, plain, atol=1e-6, rtol=1e-6, what="cross-wrap bias")
    assert_close(out, ref, atol=1e-4, rtol=1e-4, what="against the reference")
    (d_bias,) = torch.autograd.grad(out.sum(), [bias])
    assert torch.all(d_bias[cross.expand_as(d_bias)] == 0.0)
    assert d_bias[~cross.expand_as(d_bias)].abs().sum() > 0


def test_launched_variants_are_in_the_report(device, monkeypatch):
    """A Swin-shaped call (7x7 windows, shift, table, bf16, head dim 32) launches variants the default
    ahead-of-time report compiles (its unit dilations are triton's specialisation)."""
    launched = []
    real = kwin._launch

    def recording(kernel, grid, args, constexprs, cfg):
        launched.append((kernel.__name__, cfg, dict(constexprs, UPCAST_DOT=False)))
        real(kernel, grid, args, constexprs, cfg)

    monkeypatch.setattr(kwin, "_launch", recording)
    case = WinCase(BF16, 1, 1, (14, 7), (7, 7), shift=(3, 3), rel=True, D=32)
    inputs = make_inputs(case, device)
    kwin.window_attention(**inputs, **case.kwargs, scale=SCALE).float().sum().backward()
    unit_dilations = ("dil_h", "dil_w")
    report = {(s.kernel, s.config, tuple(sorted((k, v) for k, v in s.constexprs.items() if k not in unit_dilations)))
              for s in kwin.iter_compile_specs(dtypes=(BF16,))}
    assert {name for name, _, _ in launched} == {"_win_fwd", "_win_bwd_tile"}
    for name, cfg, constexprs in launched:
        assert (name, cfg, tuple(sorted(constexprs.items()))) in report, (name, cfg, constexprs)


def test_custom_op_registrations(device):
    """Schema, fake tensor and autograd registration of the forward op (torch.library.opcheck)."""
    case = WinCase(F32, 1, 1, (2, 4), (2, 2), shift=(1, 1), rel=True, dense="window")
    inputs = make_inputs(case, device)
    geometry = [2, 4, 2, 2, 1, 1, 1, 1]
    args = (inputs["q"], inputs["k"], inputs["v"], geometry, SCALE, inputs["rel_table"], inputs["rel_index"],
            inputs["dense_bias"])
    torch.library.opcheck(torch.ops.fastvit.window_attn_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------

def _bad(**changes):
    q = torch.zeros(1, 2, 48, 16)
    kwargs = dict(q=q, k=q, v=q, grid=(6, 8), size=(3, 4), scale=SCALE)
    kwargs.update(changes)
    return kwargs


@pytest.mark.parametrize("kwargs,match", [
    (_bad(size=(4, 4)), "not divisible into windows"),
    (_bad(dilation=(1, 3)), "not divisible into windows"),
    (_bad(shift=(3, 0)), "0 <= shift < size"),
    (_bad(shift=(-1, 0)), "0 <= shift < size"),
    (_bad(grid=(6, 8), size=(3, 2), shift=(1, 0), dilation=(2, 2)), "shifted windows are not dilated"),
    (_bad(grid=(3, 8)), "48 tokens, grid=\\(3, 8\\)"),
    (_bad(size=(3, "4")), "size must be an int or a pair"),
    (_bad(scale=0.0), "scale must be a finite, non-zero"),
    (_bad(v=torch.zeros(1, 2, 48, 160)), "v head dim=160"),
    (_bad(q=torch.zeros(1, 2, 48, 16, dtype=torch.float64)), "dtypes differ"),
    (_bad(k=torch.zeros(1, 3, 48, 16)), "batch/heads differ"),
    (_bad(v=torch.zeros(1, 2, 24, 16)), "one token count"),
    (_bad(rel_table=torch.zeros(5, 2)), "go together"),
    (_bad(rel_table=torch.zeros(5, 3), rel_index=torch.zeros(12, 12, dtype=torch.long)), "rel_table must be"),
    (_bad(rel_table=torch.zeros(5, 2), rel_index=torch.zeros(12, 11, dtype=torch.long)), "rel_index must be"),
    (_bad(dense_bias=torch.zeros(3, 1, 12, 12)), "not broadcastable"),
    (_bad(dense_bias=torch.zeros(12)), "not broadcastable"),
    (_bad(dense_bias=torch.zeros(1, 1, 4, 2, 12, 12)), "not broadcastable"),
])
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kwin.window_attention(**kwargs)


def test_capability_reasons():
    ok = kwin.window_not_supported_reasons("cpu", BF16, 32, grid=(56, 56), size=(7, 7), shift=(3, 3))
    assert ok == []  # the interpreter serves the CPU in these tests
    reasons = kwin.window_not_supported_reasons("cpu", torch.float64, 32, value_dim=160, dropout_p=0.1, scale=0.0,
                                                grid=(56, 56), size=(8, 8), shift=(3, 3), dilation=(2, 2))
    text = " | ".join(reasons)
    for expected in ("dtype torch.float64", "head_dim=160 > 128", "dropout", "scale=0.0", "not divisible",
                     "not dilated"):
        assert expected in text, (expected, reasons)


def test_aot_report_compiles_the_swin_and_nest_kernels_without_spills():
    """The bf16 Swin (shifted, biased) forward and fused backward and the NesT (196-token) dQ kernel
    compile for sm_80 and sm_90a without spills (the full report covers every window variant)."""
    from fastvit.kernels import aot

    specs = list(kwin.iter_compile_specs(dtypes=(BF16,)))
    wanted = [s for s in specs if s.constexprs["SHIFT"] and not s.constexprs["EVEN_N"]
              and s.kernel in ("_win_fwd", "_win_bwd_tile")]  # Swin's 49 tokens in a 64-tile
    wanted += [s for s in specs if s.kernel == "_win_bwd_dq" and s.constexprs["HAS_BIAS"]]  # NesT's 196
    assert len(wanted) == 3
    rows = aot.compile_report(capabilities=(80, 90), specs=wanted)
    assert len(rows) == 6
    for row in rows:
        assert row["ok"], row["error"]
        assert row["spills"] == 0 and row["registers"] > 0, row
