"""Attention plans (``fastvit.attention.plan``) never change what an ``attend()`` call does.

``attend()`` keeps one plan (a backend and its runner) per call signature. A plan goes stale when something
it was decided from changes; each way that can happen is tested here: every item of the signature changed
alone, the selection changed inside a ``with`` block (or by ``set_backend`` / ``FASTVIT_ATTN_BACKEND``), a
tuned table written between two calls, a refused call after an accepted one. Each time the second call must
behave exactly as without a cache (``uncached``): a new plan, served by the backend the full path chooses,
the same output and gradients bit for bit, the same error. Also: values are never baked into a plan (new
values, same plan), the LRU bound, threads, graph capture bypassing the cache, plans holding no tensors, and
the eval-mode cache of a ``RelPosBias``'s dense bias (``bias.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Optional
from unittest import mock

import pytest
import torch
from helpers import assert_close
from torch import Tensor, nn

from fastvit.attention import (
    BACKENDS,
    AttnOutput,
    DenseBias,
    HeadMix,
    KeyPaddingMask,
    RelPosBias,
    Window,
    api,
    attend,
    clear_plans,
    dispatch,
    get_backend,
    make_inputs,
    measured,
    plan,
    plan_info,
    set_backend,
    use_backend,
)
from fastvit.attention import bias as bias_module
from fastvit.attention.reference import reference_attention
from fastvit.attention.testing import fp32_copy

ENV_VAR = dispatch.ENV_VAR


# ---------------------------------------------------------------------------------------------------------
# One call, described by its signature items, built afresh (new tensors, the same seeded values) each run.


@dataclass(frozen=True)
class Call:
    """An ``attend()`` call. Tensor values come from three seeds: ``seed`` (q, k, v), ``bias_seed`` (bias
    tables, dense biases, padding masks, head-mix matrices) and ``index_seed`` (relative-position indices)."""

    B: int = 1
    H: int = 2
    Nq: int = 8
    Nk: int = 8
    D: int = 8
    Dv: int = 8
    dtype: torch.dtype = torch.float32
    # "q", "k" or "v": that input a transposed view of (B, N, H, D) memory; "q-last": q's last dim strided;
    # "q-rows8" / "v-cols8": q's first Nq of 8 rows, v's first Dv of 8 columns (the strides of 8)
    layout: str = ""
    device: str = "cpu"
    grad: str = ""  # the letters of q, k, v that require grad
    no_grad: bool = False  # the call runs under torch.no_grad()
    scale: Optional[float] = None
    dropout_p: float = 0.0
    return_probs: bool = False
    return_cls_probs: bool = False
    window: Optional[tuple] = None  # Window(*window), a new (equal) object every run
    bias: str = "none"  # a key of BIASES
    head_mix: str = "none"  # a key of HEAD_MIXES
    backend: Optional[str] = None  # attend(..., backend=...)
    selection: str = ""  # "use:<name>", "lenient:<name>" (strict=False), "global:<name>", "env:<name>"
    deterministic: bool = False  # under torch.use_deterministic_algorithms(True)
    bad: str = ""  # a key of CORRUPTIONS: q, k or v made invalid
    seed: int = 0
    bias_seed: int = 1
    index_seed: int = 2


class Draw:
    """The seeded tensors of one run; those made with ``grad=True`` are collected in ``leaves``."""

    def __init__(self, call: Call):
        self.call = call
        self.leaves: list = []
        seeds = {"qkv": call.seed, "bias": call.bias_seed, "index": call.index_seed}
        self._generators = {name: torch.Generator().manual_seed(seed) for name, seed in seeds.items()}

    def tensor(self, *shape, source: str = "qkv", dtype=None, grad: bool = False) -> Tensor:
        t = torch.randn(*shape, generator=self._generators[source]).to(self.call.device, dtype or self.call.dtype)
        if grad:
            self.leaves.append(t.requires_grad_())
        return t

    def _pairs(self) -> tuple:
        """The (query, key) extent of a bias: the window's tokens for a windowed call."""
        call = self.call
        if call.window is not None:
            n = Window(*call.window).tokens
            return n, n
        return call.Nq, call.Nk

    def relpos(self, rows: int = 9, *, dtype=None, grad: bool = False, transposed: bool = False,
               index_dtype=torch.int64, heads: Optional[int] = None, index_cols: int = 0, high: int = 0) -> RelPosBias:
        heads = heads or self.call.H
        if transposed:  # timm's LeViT / MaxViT keep [H, T] and pass its transpose
            table = self.tensor(heads, rows, source="bias", dtype=dtype, grad=grad).t()
        else:
            table = self.tensor(rows, heads, source="bias", dtype=dtype, grad=grad)
        nq, nk = self._pairs()
        index = torch.randint(0, high or rows, (nq, nk - index_cols), generator=self._generators["index"])
        return RelPosBias(table, index.to(index_dtype))

    def dense(self, *shape, dtype=None, grad: bool = False) -> DenseBias:
        return DenseBias(self.tensor(*shape, source="bias", dtype=dtype, grad=grad))

    def padding(self, *, cols: int = 0, dtype=torch.bool) -> KeyPaddingMask:
        mask = torch.rand(self.call.B, self.call.Nk - cols, generator=self._generators["bias"]) > 0.3
        mask[:, 0] = True
        return KeyPaddingMask(mask.to(dtype))

    def square(self, heads: int = 0, grad: bool = False) -> Tensor:
        heads = heads or self.call.H
        return self.tensor(heads, heads, source="bias", grad=grad)


def _full(d: Draw) -> tuple:
    c = d.call
    return c.B, c.H, c.Nq, c.Nk


BIASES: dict[str, Callable[[Draw], object]] = {
    "none": lambda d: None,
    "relpos": lambda d: d.relpos(),
    "relpos-rows15": lambda d: d.relpos(rows=15),
    "relpos-fp64": lambda d: d.relpos(dtype=torch.float64),
    "relpos-grad": lambda d: d.relpos(grad=True),
    "relpos-transposed": lambda d: d.relpos(transposed=True),
    "relpos-int32": lambda d: d.relpos(index_dtype=torch.int32),
    "dense": lambda d: d.dense(*_full(d)),
    "dense-per-head": lambda d: d.dense(*_full(d)[1:]),
    "dense-1x1": lambda d: d.dense(1, 1, *_full(d)[2:]),
    "dense-2d": lambda d: d.dense(*_full(d)[2:]),
    "dense-1-query-sliced": lambda d: DenseBias(d.dense(*_full(d)).tensor[:, :, :1]),  # the strides of a full one
    "dense-fp64": lambda d: d.dense(*_full(d), dtype=torch.float64),
    "dense-grad": lambda d: d.dense(*_full(d), grad=True),
    "dense-per-head-grad": lambda d: d.dense(*_full(d)[1:], grad=True),
    "padding": lambda d: d.padding(),
    "relpos+padding": lambda d: (d.relpos(), d.padding()),
    "padding+relpos": lambda d: (d.padding(), d.relpos()),
    "relpos+dense": lambda d: (d.relpos(), d.dense(*_full(d))),
    "(relpos,)": lambda d: (d.relpos(),),
    "[relpos,padding]": lambda d: [d.relpos(), d.padding()],
    # Refused: the descriptor itself (a range or dtype the constructor checks) or the call's validation.
    "relpos-index-cols": lambda d: d.relpos(index_cols=3),
    "relpos-heads": lambda d: d.relpos(heads=d.call.H + 1),
    "relpos-out-of-range": lambda d: d.relpos(high=20),
    "padding-cols": lambda d: d.padding(cols=3),
    "padding-uint8": lambda d: d.padding(dtype=torch.uint8),
    "dense-cols": lambda d: d.dense(*_full(d)[:3], d.call.Nk - 3),
    "dense-cols-sliced": lambda d: DenseBias(d.dense(*_full(d)).tensor[..., :-3]),  # the strides of a full one
    "dense-int": lambda d: DenseBias(torch.zeros(*_full(d), dtype=torch.int32)),
    "raw-tensor": lambda d: torch.zeros(*_full(d)),
}

HEAD_MIXES: dict[str, Callable[[Draw], Optional[HeadMix]]] = {
    "none": lambda d: None,
    "pre": lambda d: HeadMix(pre=d.square()),
    "post": lambda d: HeadMix(post=d.square()),
    "post+bias": lambda d: HeadMix(post=d.square(), post_bias=d.tensor(d.call.H, source="bias")),
    "post+norm": lambda d: HeadMix(post=d.square(), post_norm=nn.LayerNorm(d.call.H)),
    "pre-grad": lambda d: HeadMix(pre=d.square(grad=True)),
    "pre-heads": lambda d: HeadMix(pre=d.square(heads=d.call.H + 1)),  # refused
}

CORRUPTIONS: dict[str, Callable[[Draw, Tensor, Tensor, Tensor], tuple]] = {
    "": lambda d, q, k, v: (q, k, v),
    "k-fp64": lambda d, q, k, v: (q, k.double(), v),
    "k-width": lambda d, q, k, v: (q, d.tensor(*k.shape[:3], k.shape[3] + 1), v),
    "v-length": lambda d, q, k, v: (q, k, d.tensor(v.shape[0], v.shape[1], v.shape[2] + 1, v.shape[3])),
    "q-3d": lambda d, q, k, v: (q[0], k, v),
    # views of the valid tensors: the same strides, the shapes of a refused call
    "q-width-sliced": lambda d, q, k, v: (q[..., :-2], k, v),
    "k-length-sliced": lambda d, q, k, v: (q, k[:, :, :-3], v),
    "v-length-sliced": lambda d, q, k, v: (q, k, v[:, :, :-3]),
    "q-list": lambda d, q, k, v: (q.tolist(), k, v),
}


def _layout(d: Draw, name: str, b: int, h: int, n: int, width: int, grad: bool) -> Tensor:
    """``[b, h, n, width]``, contiguous or as the strided view ``Call.layout`` asks for (the leaf requires grad)."""
    layout = d.call.layout
    if layout == name:
        return d.tensor(b, n, h, width, grad=grad).transpose(1, 2)
    if layout == f"{name}-last":
        return d.tensor(b, h, width, n, grad=grad).transpose(2, 3)
    if layout == f"{name}-rows8":
        return d.tensor(b, h, 8, width, grad=grad)[:, :, :n]
    if layout == f"{name}-cols8":
        return d.tensor(b, h, n, 8, grad=grad)[..., :width]
    return d.tensor(b, h, n, width, grad=grad)


@contextlib.contextmanager
def _global_backend(name: str):
    set_backend(name)
    try:
        yield
    finally:
        set_backend(None)


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside, the previous setting restored after."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _selection(spec: str):
    if not spec:
        return contextlib.nullcontext()
    how, name = spec.split(":")
    return {"use": lambda: use_backend(name), "lenient": lambda: use_backend(name, strict=False),
            "global": lambda: _global_backend(name),
            "env": lambda: mock.patch.dict(os.environ, {ENV_VAR: name})}[how]()


@contextlib.contextmanager
def conditions(call: Call):
    """The grad mode, deterministic setting and backend selection the call runs under."""
    with contextlib.ExitStack() as stack:
        if call.no_grad:
            stack.enter_context(torch.no_grad())
        if call.deterministic:
            stack.enter_context(deterministic_algorithms())
        stack.enter_context(_selection(call.selection))
        yield


def build(call: Call) -> tuple:
    """``(q, k, v, attend's keyword arguments, the tensors that require grad)`` for one run."""
    d = Draw(call)
    q = _layout(d, "q", call.B, call.H, call.Nq, call.D, "q" in call.grad)
    k = _layout(d, "k", call.B, call.H, call.Nk, call.D, "k" in call.grad)
    v = _layout(d, "v", call.B, call.H, call.Nk, call.Dv, "v" in call.grad)
    q, k, v = CORRUPTIONS[call.bad](d, q, k, v)
    kwargs = dict(scale=call.scale, bias=BIASES[call.bias](d), dropout_p=call.dropout_p,
                  return_probs=call.return_probs, return_cls_probs=call.return_cls_probs,
                  head_mix=HEAD_MIXES[call.head_mix](d), window=None if call.window is None else Window(*call.window),
                  backend=call.backend)
    return q, k, v, kwargs, d.leaves


def run(call: Call) -> tuple:
    """``(attend's result, the gradients of the inputs that require grad)``: the result's main output is
    backpropagated with a seeded cotangent when any input requires grad (and grad mode is on)."""
    q, k, v, kwargs, leaves = build(call)  # a descriptor may refuse here, cache or not
    with conditions(call):
        if call.dropout_p:
            torch.manual_seed(call.seed)  # the same dropout mask in every run
        result = attend(q, k, v, **kwargs)
    main = result.out if isinstance(result, AttnOutput) else result
    grads = ()
    if leaves and main.requires_grad:
        cotangent = torch.randn(main.shape, generator=torch.Generator().manual_seed(7)).to(main.dtype)
        main.backward(cotangent)
        grads = tuple(leaf.grad for leaf in leaves)
    return result, grads


# ---------------------------------------------------------------------------------------------------------
# The oracle: the same call with every cache bypassed, and which backend served a call.


def _index_range_uncached(index: Tensor) -> tuple:
    lo, hi = torch.aminmax(index)
    return int(lo), int(hi)


@contextlib.contextmanager
def caches_bypassed():
    """``attend()`` as if it cached nothing: no plan (every call validates and chooses on the full path), a
    ``RelPosBias`` gathered every time and its index range read every time."""
    with mock.patch.object(plan, "signature", lambda *args: None), \
            mock.patch.object(bias_module, "_cached_dense", lambda table, index, build: build()), \
            mock.patch.object(bias_module, "_index_range", _index_range_uncached):
        yield


def uncached(fn: Callable[[], object]) -> tuple:
    """``(fn(), the name of the backend the full path chose last, or None)`` with every cache bypassed; the
    plan cache is left exactly as it was."""
    chosen = []
    real_choose = api.choose

    def choose(*args, **kwargs):
        backend = real_choose(*args, **kwargs)
        chosen.append(backend.name)
        return backend

    before = plan_info()
    with caches_bypassed(), mock.patch.object(api, "choose", choose):
        result = fn()
    assert plan_info() == before, "the uncached call touched the plan cache"
    return result, chosen[-1] if chosen else None


def raised(fn: Callable[[], object]) -> tuple:
    """``(exception type, message)`` of what ``fn()`` raises (it must raise)."""
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


def same(actual, expected, where: str = "run") -> str:
    """'' when ``actual`` is ``expected`` bit for bit, recursively through tuples (``run``'s ``(result,
    grads)``, an ``AttnOutput``): types, None fields, dtypes, shapes, strides, grad flags, values (NaN equal
    to NaN); else where they first differ (``run[0]`` is attend's result, ``run[1][i]`` the i-th gradient)."""
    if type(actual) is not type(expected):
        return f"{where}: type {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(actual, (tuple, list)):
        if len(actual) != len(expected):
            return f"{where}: {len(actual)} items != {len(expected)}"
        for i, (x, y) in enumerate(zip(actual, expected)):
            difference = same(x, y, f"{where}[{i}]")
            if difference:
                return difference
        return ""
    if not isinstance(actual, Tensor):
        return "" if actual == expected else f"{where}: {actual!r} != {expected!r}"
    meta = lambda t: (t.dtype, tuple(t.shape), t.stride(), t.requires_grad)  # noqa: E731
    if meta(actual) != meta(expected):
        return f"{where}: (dtype, shape, stride, requires_grad) {meta(actual)} != {meta(expected)}"
    x, y = actual.detach(), expected.detach()
    if not torch.equal(x.nan_to_num(nan=1234.5), y.nan_to_num(nan=1234.5)):
        diff = (x.double() - y.double()).abs().nan_to_num(nan=float("inf"))
        index = tuple(int(j) for j in torch.unravel_index(diff.argmax(), diff.shape))
        return (f"{where}: values differ in {(diff > 0).double().mean().item():.1%} of {diff.numel()} elements, "
                f"most at {index}: {x[index].item():.6g} vs {y[index].item():.6g}")
    return ""


def differ(actual, expected) -> bool:
    return bool(same(actual, expected))


def assert_same(actual, expected, what: str = "") -> None:
    difference = same(actual, expected)
    assert not difference, f"{what}: {difference}"


@pytest.fixture
def served(monkeypatch):
    """The names of the backends whose plans ran, one per ``attend()`` call that ran a plan, in order
    (every backend's runner wrapped so the runs it returns record themselves)."""
    names = []
    for backend in BACKENDS.values():
        make_runner = backend.runner

        def runner(cls, inp, make_runner=make_runner):
            run_plan = make_runner(inp)

            def recorded(*args):
                names.append(cls.name)
                return run_plan(*args)

            return recorded

        monkeypatch.setattr(backend, "runner", classmethod(runner))
    return names


def built() -> int:
    return plan_info()["built"]


def assert_like_uncached(call: Call, got, ran: Optional[str], what: str) -> tuple:
    """``got`` (and the backend that ran, when recorded) are what the same call gives with every cache
    bypassed; returns the uncached ``(result, chosen backend)``."""
    expected, chosen = uncached(lambda: run(call))
    if ran is not None:
        assert ran == chosen, f"{what}: served by {ran}, the full path chooses {chosen}"
    assert_same(got, expected, what)
    return expected, chosen


# ---------------------------------------------------------------------------------------------------------
# Every item of the signature changed alone: a new plan, and the second call behaves as uncached.

BASE = Call()
GRAD = Call(grad="q")
WINDOWED = Call(Nq=16, Nk=16, window=((4, 4), (2, 2)))
RELPOS, DENSE = Call(bias="relpos"), Call(bias="dense")
HEAD_MIXED = Call(head_mix="post")
SELECTED = Call(selection="use:reference")

CHANGED_ALONE = {
    # shapes
    "B": (BASE, Call(B=2)),
    "H": (BASE, Call(H=1)),
    "Nq": (BASE, Call(Nq=5)),
    "Nk": (BASE, Call(Nk=12)),
    "Nk-0": (BASE, Call(Nk=0)),
    "D": (BASE, Call(D=16)),
    "Dv": (BASE, Call(Dv=16)),
    "Nq-same-strides": (BASE, Call(Nq=5, layout="q-rows8")),
    "Dv-same-strides": (BASE, Call(Dv=6, layout="v-cols8")),
    # strides: the same shapes, other memory layouts
    "stride-q": (BASE, Call(layout="q")),
    "stride-k": (BASE, Call(layout="k")),
    "stride-v": (BASE, Call(layout="v")),
    "stride-q-last-dim": (BASE, Call(layout="q-last")),
    "stride-contiguous-again": (Call(layout="k"), BASE),
    # dtypes
    "fp32-to-bf16": (BASE, Call(dtype=torch.bfloat16)),
    "bf16-to-fp64": (Call(dtype=torch.bfloat16), Call(dtype=torch.float64)),
    "fp32-to-fp16": (BASE, Call(dtype=torch.float16)),
    # gradients wanted, grad mode
    "requires-grad-q": (BASE, Call(grad="q")),
    "requires-grad-k": (BASE, Call(grad="k")),
    "requires-grad-v": (BASE, Call(grad="v")),
    "requires-grad-k-after-q": (GRAD, Call(grad="k")),
    "grad-mode-off": (GRAD, dataclasses.replace(GRAD, no_grad=True)),
    "grad-mode-on": (dataclasses.replace(GRAD, no_grad=True), GRAD),
    # scale, dropout, extra outputs
    "scale-none-to-float": (BASE, Call(scale=0.5)),
    "scale-float-to-float": (Call(scale=0.5), Call(scale=0.25)),
    "scale-float-to-none": (Call(scale=0.5), BASE),
    "dropout-0-to-0.5": (BASE, Call(dropout_p=0.5)),
    "dropout-0.5-to-0.25": (Call(dropout_p=0.5), Call(dropout_p=0.25)),
    "dropout-with-grad": (GRAD, dataclasses.replace(GRAD, dropout_p=0.5)),
    "return-probs": (BASE, Call(return_probs=True)),
    "return-cls-probs": (BASE, Call(return_cls_probs=True)),
    "return-probs-to-cls-probs": (Call(return_probs=True), Call(return_cls_probs=True)),
    # window geometry
    "window-added": (Call(Nq=16, Nk=16), WINDOWED),
    "window-removed": (WINDOWED, Call(Nq=16, Nk=16)),
    "window-shift": (WINDOWED, dataclasses.replace(WINDOWED, window=((4, 4), (2, 2), (1, 1)))),
    "window-shift-one-axis": (WINDOWED, dataclasses.replace(WINDOWED, window=((4, 4), (2, 2), (0, 1)))),
    "window-size": (WINDOWED, dataclasses.replace(WINDOWED, window=((4, 4), (4, 4)))),
    "window-grid": (WINDOWED, dataclasses.replace(WINDOWED, window=((2, 8), (2, 2)))),
    "window-dilation": (WINDOWED, dataclasses.replace(WINDOWED, window=((4, 4), (2, 2), (0, 0), (2, 2)))),
    "window-relpos": (WINDOWED, dataclasses.replace(WINDOWED, bias="relpos")),
    # RelPosBias
    "relpos-added": (BASE, RELPOS),
    "relpos-table-rows": (RELPOS, Call(bias="relpos-rows15")),
    "relpos-table-dtype": (RELPOS, Call(bias="relpos-fp64")),
    "relpos-table-requires-grad": (RELPOS, Call(bias="relpos-grad")),
    "relpos-table-requires-grad-batch-2": (Call(B=2, bias="relpos"), Call(B=2, bias="relpos-grad", grad="q")),
    "relpos-table-requires-grad-no-grad-mode": (Call(bias="relpos-grad", no_grad=True), Call(bias="relpos-grad")),
    "relpos-table-stride": (RELPOS, Call(bias="relpos-transposed")),
    "relpos-index-dtype": (RELPOS, Call(bias="relpos-int32")),
    # DenseBias
    "dense-added": (BASE, DENSE),
    "dense-broadcast-batch": (DENSE, Call(bias="dense-per-head")),
    "dense-broadcast-batch-and-heads": (DENSE, Call(bias="dense-1x1")),
    "dense-2d": (Call(bias="dense-1x1"), Call(bias="dense-2d")),
    "dense-broadcast-queries-same-strides": (DENSE, Call(bias="dense-1-query-sliced")),
    "dense-dtype": (DENSE, Call(bias="dense-fp64")),
    "dense-requires-grad": (DENSE, Call(bias="dense-grad")),
    "dense-broadcast-requires-grad": (Call(B=2, bias="dense-per-head"), Call(B=2, bias="dense-per-head-grad")),
    # KeyPaddingMask (its shape follows B and Nk: a mask of another shape alone is refused, below)
    "padding-added": (BASE, Call(bias="padding")),
    "padding-batch": (Call(bias="padding"), Call(B=2, bias="padding")),
    # several descriptors
    "tuple-added": (RELPOS, Call(bias="relpos+padding")),
    "tuple-order": (Call(bias="relpos+padding"), Call(bias="padding+relpos")),
    "tuple-kinds": (Call(bias="relpos+padding"), Call(bias="relpos+dense")),
    "tuple-of-one": (RELPOS, Call(bias="(relpos,)")),
    # head mixing
    "head-mix-added": (BASE, HEAD_MIXED),
    "head-mix-pre-to-post": (Call(head_mix="pre"), HEAD_MIXED),
    "head-mix-post-bias": (HEAD_MIXED, Call(head_mix="post+bias")),
    "head-mix-post-norm": (HEAD_MIXED, Call(head_mix="post+norm")),
    "head-mix-requires-grad": (Call(head_mix="pre"), Call(head_mix="pre-grad")),
    # deterministic algorithms
    "deterministic-on": (BASE, Call(deterministic=True)),
    "deterministic-off": (Call(deterministic=True), BASE),
    "deterministic-with-grad": (Call(bias="relpos-grad"), Call(bias="relpos-grad", deterministic=True)),
    # the selection in force
    "backend-argument": (BASE, Call(backend="reference")),
    "backend-argument-same-as-auto": (BASE, Call(backend="sdpa")),
    "use-backend": (BASE, SELECTED),
    "use-backend-lenient": (SELECTED, Call(selection="lenient:reference")),
    "use-backend-other": (SELECTED, Call(selection="use:sdpa")),
    "set-backend": (BASE, Call(selection="global:reference")),
    "env": (BASE, Call(selection="env:reference")),
    "env-to-argument": (Call(selection="env:reference"), Call(selection="env:reference", backend="sdpa")),
}


@pytest.mark.parametrize("first, second", list(CHANGED_ALONE.values()), ids=list(CHANGED_ALONE))
def test_changed_signature_item_builds_a_new_plan_that_behaves_as_uncached(first, second, served):
    run(first)
    assert built() == 1
    got = run(second)
    assert built() == 2, "the second call ran the first call's plan: the changed item is not in the signature"
    assert_like_uncached(second, got, served[-1], "second call")
    again = run(second)  # its own plan now
    assert built() == 2
    assert_same(again, got, "second call, plan reused")


# The converse: the same signature with new values reuses the plan and gives the new values' result.
NEW_VALUES = {
    "q-k-v": (BASE, Call(seed=5)),
    "q-k-v-grad": (GRAD, dataclasses.replace(GRAD, seed=5)),
    "relpos-table": (RELPOS, Call(bias="relpos", bias_seed=5)),
    "relpos-index": (RELPOS, Call(bias="relpos", index_seed=5)),
    "relpos-table-trainable": (Call(bias="relpos-grad"), Call(bias="relpos-grad", bias_seed=5)),
    "dense": (DENSE, Call(bias="dense", bias_seed=5)),
    "mask": (Call(bias="padding", B=2), Call(bias="padding", B=2, bias_seed=5)),
    "tuple-as-list": (Call(bias="relpos+padding"), Call(bias="[relpos,padding]", bias_seed=5)),
    "head-mix": (HEAD_MIXED, Call(head_mix="post", bias_seed=5)),
    "window-equal-object": (WINDOWED, dataclasses.replace(WINDOWED, seed=5)),
    "window-relpos-index": (dataclasses.replace(WINDOWED, bias="relpos"),
                            dataclasses.replace(WINDOWED, bias="relpos", index_seed=5)),
    "dropout-mask": (Call(dropout_p=0.5), Call(dropout_p=0.5, seed=5)),
}


@pytest.mark.parametrize("first, second", list(NEW_VALUES.values()), ids=list(NEW_VALUES))
def test_new_values_reuse_the_plan_and_are_never_baked_into_it(first, second, served):
    old = run(first)
    got = run(second)
    assert built() == 1, "new values of the same metadata built a second plan"
    assert served == [served[0]] * 2
    assert differ(got, old), "the new values do not change the result: this case tests nothing"
    assert_like_uncached(second, got, served[-1], "new values")


# ---------------------------------------------------------------------------------------------------------
# Selection changed between two calls.


def _check_served(call: Call, served: list, expected: str) -> None:
    """The call is served by ``expected``, as the full path chooses, with the uncached output, which
    is the reference's within that backend's tolerance."""
    got = run(call)
    assert served[-1] == expected, f"served by {served[-1]}, expected {expected}"
    assert_like_uncached(call, got, served[-1], f"under {expected}")
    q, k, v, kwargs, _ = build(call)
    ref = reference_attention(make_inputs(*fp32_copy(q, k, v, ())[:3]))
    atol, rtol = get_backend(expected).tolerances[call.dtype]
    assert_close(got[0], ref.out, atol=atol, rtol=rtol, what=f"{expected} vs the reference")


def test_use_backend_blocks_entered_and_left_between_calls(served):
    call = BASE  # 8 keys on the CPU: auto dispatch picks SDPA
    _check_served(call, served, "sdpa")
    with use_backend("reference"):
        _check_served(call, served, "reference")
        with use_backend("sdpa"):
            _check_served(call, served, "sdpa")
        _check_served(call, served, "reference")  # back in the outer block
        with use_backend("auto"):  # auto inside a reference block: auto's plan
            _check_served(call, served, "sdpa")
        _check_served(call, served, "reference")
    _check_served(call, served, "sdpa")
    assert built() == 3  # auto, reference, sdpa by name: every block re-entered reuses its plan


def test_set_backend_and_environment_variable_changed_between_calls(monkeypatch, served):
    call = BASE
    monkeypatch.delenv(ENV_VAR, raising=False)
    _check_served(call, served, "sdpa")
    set_backend("reference")
    _check_served(call, served, "reference")
    with use_backend("sdpa"):  # a with block over set_backend
        _check_served(call, served, "sdpa")
    _check_served(call, served, "reference")
    set_backend(None)
    _check_served(call, served, "sdpa")
    monkeypatch.setenv(ENV_VAR, "reference")
    _check_served(call, served, "reference")
    set_backend("sdpa")  # set_backend over the environment
    _check_served(call, served, "sdpa")
    set_backend(None)
    _check_served(call, served, "reference")
    monkeypatch.setenv(ENV_VAR, "auto")
    _check_served(call, served, "sdpa")
    monkeypatch.delenv(ENV_VAR)
    _check_served(call, served, "sdpa")
    monkeypatch.setenv(ENV_VAR, "no-such-backend")
    expected = raised(lambda: uncached(lambda: run(call)))
    assert raised(lambda: run(call)) == expected
    assert "no-such-backend" in expected[1]


def test_strict_selection_refuses_after_a_lenient_call_was_served(served):
    lenient = Call(dtype=torch.float64, selection="lenient:sdpa")
    strict = dataclasses.replace(lenient, selection="use:sdpa")
    got = run(lenient)  # SDPA serves no fp64: strict=False falls back to auto, which picks the reference
    assert served == ["reference"]
    assert_like_uncached(lenient, got, served[-1], "lenient")
    expected = raised(lambda: uncached(lambda: run(strict)))
    assert expected[0] is ValueError and "fp64" in expected[1]
    for _ in range(2):
        assert raised(lambda: run(strict)) == expected
    assert built() == 1 and served == ["reference"]
    run(lenient)
    assert built() == 1 and served == ["reference"] * 2


# ---------------------------------------------------------------------------------------------------------
# A tuned table written between two calls.


def test_tuned_table_written_between_two_calls_makes_a_new_plan(monkeypatch, tmp_path, served):
    """On the CPU auto dispatch reads no measured order; here it is made to, as on CUDA, so that the table
    changes the choice (SDPA first, then the reference once the table says so)."""
    from fastvit.tools.tune import write_table

    path = tmp_path / "cpu.json"
    monkeypatch.setattr(measured, "_CACHE", {})
    monkeypatch.setattr(measured, "_table_path", lambda device: str(path))
    cpu_order = dispatch._cpu_order
    monkeypatch.setattr(dispatch, "_cpu_order", lambda inp: measured.ordered(inp, cpu_order(inp)))

    call = BASE
    run(call)
    assert served == ["sdpa"]
    q, k, v, _, _ = build(call)
    generation = measured.generation()
    write_table({"device": "cpu", "triton": None, "torch": torch.__version__, "entries": {}, "timestamp": "now",
                 "dispatch": {measured.key_of(make_inputs(q, k, v)): ["reference", "sdpa"]}}, str(path))
    assert measured.generation() == generation + 1
    got = run(call)
    assert built() == 2 and served[-1] == "reference", "the plan chosen before the table was written served"
    assert_like_uncached(call, got, served[-1], "after write_table")
    run(call)
    assert built() == 2  # the table is read once: later calls run the new plan

    measured.reload_tuned()  # a reload alone (the same table) makes new plans too
    assert_same(run(call), got, "after reload_tuned")
    assert built() == 3 and served[-1] == "reference"


# ---------------------------------------------------------------------------------------------------------
# Refused calls after accepted ones: the same error as with an empty cache, every time, never cached.

REFUSED = {
    "k-dtype": (BASE, Call(bad="k-fp64")),
    "k-head-dim": (BASE, Call(bad="k-width")),
    "v-length": (BASE, Call(bad="v-length")),
    "q-3d": (BASE, Call(bad="q-3d")),
    "q-head-dim-same-strides": (BASE, Call(bad="q-width-sliced")),
    "k-length-same-strides": (BASE, Call(bad="k-length-sliced")),
    "v-length-same-strides": (BASE, Call(bad="v-length-sliced")),
    "device-meta": (BASE, Call(device="meta")),
    "q-not-a-tensor": (BASE, Call(bad="q-list")),
    "dropout-1": (BASE, Call(dropout_p=1.0)),
    "relpos-index-shape": (RELPOS, Call(bias="relpos-index-cols")),
    "relpos-table-heads": (RELPOS, Call(bias="relpos-heads")),
    "relpos-index-out-of-range": (RELPOS, Call(bias="relpos-out-of-range")),
    "padding-shape": (Call(bias="padding"), Call(bias="padding-cols")),
    "padding-dtype": (Call(bias="padding"), Call(bias="padding-uint8")),
    "dense-shape": (DENSE, Call(bias="dense-cols")),
    "dense-shape-same-strides": (DENSE, Call(bias="dense-cols-sliced")),
    "dense-dtype": (DENSE, Call(bias="dense-int")),
    "raw-tensor-bias": (DENSE, Call(bias="raw-tensor")),
    "head-mix-heads": (Call(head_mix="pre"), Call(head_mix="pre-heads")),
    "window-padding": (WINDOWED, dataclasses.replace(WINDOWED, bias="padding")),
    "window-probs": (WINDOWED, dataclasses.replace(WINDOWED, return_probs=True)),
    "window-grid": (WINDOWED, dataclasses.replace(WINDOWED, Nq=12, Nk=12)),
    "sdpa-argument-fp64": (Call(backend="sdpa"), Call(backend="sdpa", dtype=torch.float64)),
    "sdpa-argument-probs": (Call(backend="sdpa"), Call(backend="sdpa", return_probs=True)),
    "sdpa-selected-head-mix": (Call(selection="use:sdpa"), Call(selection="use:sdpa", head_mix="pre")),
    "strict-after-lenient": (Call(selection="lenient:sdpa", dtype=torch.float64),
                             Call(selection="use:sdpa", dtype=torch.float64)),
    "unknown-backend": (BASE, Call(backend="no-such-backend")),
}


@pytest.mark.parametrize("accepted, refused", list(REFUSED.values()), ids=list(REFUSED))
def test_refused_call_after_an_accepted_one_raises_as_uncached(accepted, refused):
    run(accepted)
    before = plan_info()
    expected = raised(lambda: uncached(lambda: run(refused)))
    assert expected[0] is ValueError, expected
    for attempt in range(2):
        assert raised(lambda: run(refused)) == expected, f"attempt {attempt + 1}"
    assert plan_info() == before, "a refused call was cached"
    assert_same(run(accepted), uncached(lambda: run(accepted))[0], "the accepted call afterwards")
    assert plan_info() == before


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_refused_as_uncached_and_builds_no_plan(scale):
    """A non-finite scale is refused (backends disagree on it: CPU SDPA gives zeros for NaN, the reference
    NaN). NaN != NaN, so a NaN in the signature would never be found again: it never gets that far."""
    expected = raised(lambda: uncached(lambda: run(Call(scale=scale))))
    assert expected[0] is ValueError and "scale must be finite" in expected[1], expected
    for _ in range(3):
        assert raised(lambda: run(Call(scale=float(scale)))) == expected  # a new float object each call
    assert built() == 0


# ---------------------------------------------------------------------------------------------------------
# The LRU bound and threads.


def test_least_recently_used_plan_is_evicted_first(monkeypatch, served):
    monkeypatch.setattr(plan, "MAX_PLANS", 4)
    calls = [Call(Nq=n) for n in range(1, 7)]
    for call in calls[:4]:
        run(call)
    run(calls[0])  # used again: the most recently used now, calls[1] the least
    assert plan_info() == {"plans": 4, "built": 4, "max": 4}
    run(calls[4])
    run(calls[5])  # calls[1] and calls[2] make room
    assert plan_info() == {"plans": 4, "built": 6, "max": 4}
    for call in (calls[0], calls[3], calls[4], calls[5]):
        got = run(call)
        assert built() == 6, f"Nq={call.Nq} was evicted"
        assert_like_uncached(call, got, served[-1], f"kept Nq={call.Nq}")
    for n, call in enumerate((calls[1], calls[2]), start=7):
        got = run(call)
        assert built() == n, f"Nq={call.Nq} was kept"
        assert_like_uncached(call, got, served[-1], f"rebuilt Nq={call.Nq}")
    assert plan_info()["plans"] == 4


def test_threads_calling_mixed_signatures_get_uncached_results(monkeypatch):
    monkeypatch.setattr(plan, "MAX_PLANS", 5)  # fewer plans than signatures: evictions race with lookups
    calls = [BASE, Call(Nq=5), Call(B=2, bias="relpos+padding"), Call(bias="dense-per-head"), Call(Dv=16),
             Call(selection="use:reference"), Call(layout="k"), Call(head_mix="post"), Call(return_cls_probs=True),
             dataclasses.replace(WINDOWED, bias="relpos"), Call(grad="qv"), Call(scale=0.5)]
    expected = {call: uncached(lambda call=call: run(call))[0] for call in calls}
    assert differ(expected[BASE], expected[Call(selection="use:reference")]), (
        "sdpa and the reference agree bit for bit: the results cannot tell whose plan served")
    errors: list = []
    start = threading.Barrier(5)
    done = threading.Event()

    def worker(offset: int) -> None:
        start.wait()
        try:
            for i in range(40):
                call = calls[(5 * offset + i) % len(calls)]  # every signature, each thread in its own phase
                difference = same(run(call), expected[call])
                if difference:
                    errors.append(f"{call}: {difference}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    def clearer() -> None:  # clear_plans() between the lookups and inserts of the others
        start.wait()
        while not done.is_set():
            plan.clear_plans()
            done.wait(0.002)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    side = threading.Thread(target=clearer)
    for t in threads + [side]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    side.join()
    assert not errors, errors[:3]
    assert plan_info()["plans"] <= 5


# ---------------------------------------------------------------------------------------------------------
# Graph capture and tensor subclasses take the full path.


def test_torch_compile_traces_the_full_path_and_never_reads_the_cache(monkeypatch):
    call = Call(bias="relpos+padding")
    q, k, v, kwargs, _ = build(call)
    expected, _ = uncached(lambda: attend(q, k, v, **kwargs))

    def fn(q, k, v):
        return attend(q, k, v, **kwargs)

    def poisoned(*args):
        raise AssertionError("the plan cache was consulted")

    monkeypatch.setattr(plan, "signature", poisoned)
    monkeypatch.setattr(plan, "lookup", poisoned)
    with pytest.raises(AssertionError, match="consulted"):  # eager reads it: the poison works
        fn(q, k, v)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        for _ in range(2):
            assert_close(compiled(q, k, v), expected, atol=1e-6, rtol=1e-6, what="compiled")
    finally:
        torch._dynamo.reset()
    assert built() == 0


def test_torch_compile_after_eager_plans_matches_eager():
    call = Call(bias="relpos")
    q, k, v, kwargs, _ = build(call)
    eager = attend(q, k, v, **kwargs)
    assert built() == 1
    torch._dynamo.reset()
    try:
        out = torch.compile(lambda q: attend(q, k, v, **kwargs), backend="eager", fullgraph=True)(q)
    finally:
        torch._dynamo.reset()
    assert_close(out, eager, atol=1e-6, rtol=1e-6, what="compiled after eager")
    assert built() == 1
    assert_same(attend(q, k, v, **kwargs), eager, "eager after compile")


class _Subclass(Tensor):
    pass


@pytest.mark.parametrize("wrap", [lambda t: t.as_subclass(_Subclass), lambda t: nn.Parameter(t)],
                         ids=["tensor-subclass", "parameter"])
def test_tensors_that_are_not_plain_take_the_full_path(wrap):
    q, k, v, kwargs, _ = build(Call(bias="relpos"))
    expected, _ = uncached(lambda: attend(q, k, v, **kwargs))
    for _ in range(2):
        got = attend(wrap(q), wrap(k), wrap(v), **kwargs)
        assert_close(got.as_subclass(Tensor), expected, atol=0, rtol=0, what="not a plain tensor")
    assert built() == 0


def test_fx_symbolic_trace_takes_the_full_path():
    q, k, v, kwargs, _ = build(BASE)
    attend(q, k, v)  # a plan for the concrete signature exists

    def fn(q, k, v):
        return attend(q, k, v)

    expected = raised(lambda: uncached(lambda: torch.fx.symbolic_trace(fn)))
    assert raised(lambda: torch.fx.symbolic_trace(fn)) == expected
    assert built() == 1


def test_plans_hold_no_tensors():
    q, k, v, kwargs, leaves = build(Call(bias="relpos+padding", head_mix="post", grad="q"))
    tensors = [q, k, v, kwargs["bias"][0].table, kwargs["bias"][0].index, kwargs["bias"][1].mask,
               kwargs["head_mix"].post]
    attend(q, k, v, **kwargs)
    attend(q, k, v, **{**kwargs, "head_mix": None, "bias": kwargs["bias"][0]})
    refs = [weakref.ref(t) for t in tensors]
    del q, k, v, kwargs, leaves, tensors
    gc.collect()
    assert plan_info()["plans"] == 2
    assert [r() is None for r in refs] == [True] * len(refs), "a plan (or a cache) keeps an input alive"


# ---------------------------------------------------------------------------------------------------------
# The eval-mode dense bias of a RelPosBias: cached per (table, index) until either changes in place.


def _table_and_index(rows: int = 9) -> tuple:
    g = torch.Generator().manual_seed(3)
    return nn.Parameter(torch.randn(rows, 2, generator=g)), torch.randint(0, rows, (8, 8), generator=g)


def _in_place(change: str, table: nn.Parameter, index: Tensor) -> None:
    # (a change that moves every logit of a head alike, table + 1, would cancel in the softmax)
    if change == "table-mul-no-grad":
        with torch.no_grad():
            table.mul_(2.0)
    elif change == "table-copy-no-grad":
        with torch.no_grad():
            table.copy_(table.flip(0))
    elif change == "index-copy":
        index.copy_(index.flip(1))
    elif change == "load-state-dict":
        module = nn.Module()
        module.table = table
        module.load_state_dict({"table": table.detach() * 2})
    elif change == "table-data-rebound":  # Module._apply (model.double(), .to()), MoCo's momentum update
        table.data = table.data * 2
    elif change == "table-data-mul-then-clear-plans":
        # A write into .data in place bumps no version counter (autograd does not see it either): bias.py
        # documents clear_plans() as the way to make it seen.
        table.data.mul_(2.0)
        clear_plans()
    else:
        raise AssertionError(change)


@pytest.mark.parametrize("change", ["table-mul-no-grad", "table-copy-no-grad", "index-copy", "load-state-dict",
                                    "table-data-rebound", "table-data-mul-then-clear-plans"])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_eval_relpos_bias_is_gathered_once_until_table_or_index_change(monkeypatch, change, backend):
    gathers = []
    gather = RelPosBias._gather
    monkeypatch.setattr(RelPosBias, "_gather", lambda self: gathers.append(1) or gather(self))
    table, index = _table_and_index()
    q, k, v, _, _ = build(BASE)

    def call():
        return attend(q, k, v, bias=RelPosBias(table, index), backend=backend)

    with torch.no_grad():
        first = call()
        assert_same(call(), first, "eval, second call")
        assert len(gathers) == 1, "the dense bias of an eval call was gathered again"
        _in_place(change, table, index)
        got = call()
        expected, _ = uncached(call)
    assert_same(got, expected, f"after {change}")
    assert differ(got, first), "the change does not change the result: this case tests nothing"


def test_index_changed_in_place_out_of_range_is_refused_as_uncached():
    table, index = _table_and_index()
    q, k, v, _, _ = build(BASE)
    with torch.no_grad():
        attend(q, k, v, bias=RelPosBias(table, index))
        index[0, 0] = 20
        expected = raised(lambda: uncached(lambda: attend(q, k, v, bias=RelPosBias(table, index))))
        assert expected[0] is ValueError and "[0, 20]" in expected[1]
        assert raised(lambda: attend(q, k, v, bias=RelPosBias(table, index))) == expected


def test_trainable_relpos_bias_is_gathered_every_call_and_gets_its_gradient(monkeypatch):
    gathers = []
    gather = RelPosBias._gather
    monkeypatch.setattr(RelPosBias, "_gather", lambda self: gathers.append(1) or gather(self))
    q, k, v, _, _ = build(BASE)
    table, index = _table_and_index()

    def step():
        table.grad = None
        out = attend(q, k, v, bias=RelPosBias(table, index))
        out.backward(torch.ones_like(out))
        return out, table.grad

    first = step()
    assert_same(step(), first, "training, second step")
    assert len(gathers) == 2
    assert_same(first, uncached(step)[0], "training")


def test_dense_bias_gathered_in_inference_mode_serves_a_later_autograd_call():
    """An eval pass under inference_mode, then input gradients of the frozen model (saliency, attacks)."""
    table, index = _table_and_index()
    table.requires_grad_(False)
    q, k, v, _, _ = build(BASE)
    with torch.inference_mode():
        attend(q, k, v, bias=RelPosBias(table, index))

    def saliency():
        x = q.clone().requires_grad_()
        attend(x, k, v, bias=RelPosBias(table, index)).sum().backward()
        return x.grad

    assert_same(saliency(), uncached(saliency)[0], "input gradient after an inference-mode call")
