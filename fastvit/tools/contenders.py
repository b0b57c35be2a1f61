"""What a benchmark group times: every attention backend on one shape; a model under each backend
selection, vit-pytorch with the same weights and timm's equivalent; timm models patched in place; the
host path of one tiny call (``overhead_contenders``)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional, Sequence

import torch

from fastvit.attention import BACKENDS, attend, choose, dtype_name, make_inputs, use_backend
from fastvit.extras import importable, install_hint
from fastvit.tools.env import package_version
from fastvit.tools.shapes import AttentionShape, attention_inputs
from fastvit.tools.timing import Contender

HEADLINE_MODEL = "vit_small_patch16_224"


def _interpreted(backend: str, device: str, quick: bool) -> list:
    """Triton on the CPU runs in its numpy interpreter (TRITON_INTERPRET=1): a correctness tool, not a
    benchmark, and minutes per call at full sizes. Allowed in --quick runs only."""
    if backend == "triton" and torch.device(device).type == "cpu" and not quick \
            and os.environ.get("TRITON_INTERPRET") == "1":
        return ["triton runs in its interpreter on the CPU (TRITON_INTERPRET=1); not benchmarked at full size"]
    if backend == "flex" and torch.device(device).type == "cpu" and not quick:
        return ["flex runs uncompiled on the CPU (it materialises the B*H*N^2 scores); not benchmarked at full size"]
    return []


def _served_by(name: str, inp, device: str, quick: bool) -> tuple:
    """``(meta, skip_reason)`` of the contender ``name`` (a backend or ``auto``) for the call ``inp``:
    meta names the backend that serves it; the reason says why it cannot ("" when it can)."""
    meta = {"backend": name}
    if name == "auto":
        try:
            meta["served_by"] = choose(inp, "auto").name
        except ValueError as e:
            return meta, str(e)
        return meta, ""
    if name not in BACKENDS:
        return meta, f"unknown backend {name!r}"
    reasons = BACKENDS[name].not_supported_reasons(inp) or _interpreted(name, device, quick)
    if reasons:
        return meta, "; ".join(reasons)
    meta["served_by"] = name
    return meta, ""


def attention_contenders(shape: AttentionShape, *, device: str, dtype: torch.dtype, mode: str = "fwd",
                         backends: Optional[Sequence[str]] = None, quick: bool = False,
                         batch_size: Optional[int] = None) -> tuple:
    """The contenders of one attention group: every backend (refusals skipped with their reasons) + auto.

    Returns:
        ``(contenders, dims)``.
    """
    dims = shape.dims(device, quick, batch_size)
    backward = mode == "fwd+bwd"
    q, k, v, make_bias = attention_inputs(dims, shape.bias, device, dtype, requires_grad=backward)
    extra = dict(return_cls_probs=True) if shape.cls_probs else {}
    inp = make_inputs(q, k, v, bias=make_bias(), **extra)
    names = list(backends) if backends is not None else [*BACKENDS, "auto"]
    leaves = [q, k, v] + ([make_bias().table] if shape.bias == "relpos" else [])
    grad_out = torch.randn(dims[0], dims[1], dims[2], dims[5], device=device, dtype=dtype) if backward else None

    contenders = []
    for name in names:
        meta, skip = _served_by(name, inp, device, quick)
        if skip:
            contenders.append(Contender(name, meta=meta, skip_reason=skip))
            continue
        if backward:
            def fn(name=name):
                for t in leaves:
                    t.grad = None
                res = attend(q, k, v, bias=make_bias(), backend=name, **extra)
                out = res.out if shape.cls_probs else res
                out.backward(grad_out)
                return out
        else:
            def fn(name=name):
                with torch.inference_mode():
                    return attend(q, k, v, bias=make_bias(), backend=name, **extra)
        contenders.append(Contender(name, fn, meta))
    return contenders, dims


def einops_window_attention(q, k, v, window, bias, scale: float):
    """Windowed attention the way the models wrote it before ``Window`` (Swin in timm, Twins, NesT,
    CrossFormer in vit-pytorch): roll, cut the windows into a batch with einops, one float mask
    expanded to ``[B * windows, heads, n, n]`` (the bias plus the shift mask), SDPA, paste the windows
    back, roll back. q, k, v ``[B, heads, H*W, D]``; the copies are what a model pays."""
    import torch.nn.functional as F
    from einops import rearrange

    from fastvit.attention import DenseBias, RelPosBias

    B, heads, _, _ = q.shape
    (H, W), (wh, ww), (sh, sw), (dh, dw) = window.grid, window.size, window.shift, window.dilation
    # Row (y * wh + s1) * dh + o is position s1 of window row y * dh + o: adjacent positions without a
    # dilation, positions dh apart with one (CrossFormer's long distance, MaxViT's grid).
    cut = "b h (y s1 dh) (x s2 dw) d -> (b y dh x dw) h (s1 s2) d"
    paste = "(b y dh x dw) h (s1 s2) d -> b h (y s1 dh) (x s2 dw) d"
    sizes = dict(s1=wh, s2=ww, dh=dh, dw=dw)
    maps = [t.view(B, heads, H, W, t.shape[-1]) for t in (q, k, v)]
    if window.shifted:
        maps = [torch.roll(t, shifts=(-sh, -sw), dims=(2, 3)) for t in maps]
    q, k, v = (rearrange(t, cut, **sizes) for t in maps)
    mask = None
    for b in bias:
        term = b.materialize() if isinstance(b, (RelPosBias, DenseBias)) else None
        if term is not None:
            mask = term if mask is None else mask + term
    if window.shifted:  # Swin's region mask, per window, expanded over the batch and the heads
        region = window.region_mask(q.device)  # (nw, n, n)
        shift_mask = torch.zeros(region.shape, dtype=q.dtype, device=q.device).masked_fill_(~region, float("-inf"))
        mask = shift_mask[:, None] if mask is None else mask + shift_mask[:, None]  # (nw, h|1, n, n)
        nw, n = window.num_windows, window.tokens
        mask = mask.unsqueeze(0).expand(B, nw, heads, n, n).reshape(B * nw, heads, n, n)
    if mask is not None:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = rearrange(out, paste, b=B, y=H // (wh * dh), x=W // (ww * dw), **sizes)
    if window.shifted:
        out = torch.roll(out, shifts=(sh, sw), dims=(2, 3))
    return out.flatten(2, 3)  # (b, h, H*W, d)


def window_contenders(shape: AttentionShape, *, device: str, dtype: torch.dtype, mode: str = "fwd",
                      backends: Optional[Sequence[str]] = None, quick: bool = False,
                      batch_size: Optional[int] = None) -> tuple:
    """The contenders of one windowed group: every backend through ``attend(..., window=...)`` (the
    ones that do not declare ``supports_window`` show why), ``einops`` (the models' own window cut,
    ``einops_window_attention``) and auto.

    Returns:
        ``(contenders, dims)``.
    """
    dims = shape.dims(device, quick, batch_size)
    window = shape.window_for(quick)
    names = list(backends) if backends is not None else [*BACKENDS, "auto"]
    names = [n for n in names if n != "auto"] + ["einops"] + (["auto"] if "auto" in names else [])
    not_here = shape.skip_reason(device, quick)
    if not_here:
        return [Contender(name, meta={"backend": name}, skip_reason=not_here) for name in names], dims
    backward = mode == "fwd+bwd"
    q, k, v, make_bias = attention_inputs(dims, shape.bias, device, dtype, requires_grad=backward, window=window)
    bias = make_bias()
    inp = make_inputs(q, k, v, bias=bias, window=window)
    leaves = [q, k, v] + ([bias.table] if shape.bias == "relpos" else [bias.tensor] if shape.bias == "dense" else [])
    grad_out = torch.randn(dims[0], dims[1], dims[2], dims[5], device=device, dtype=dtype) if backward else None
    scale = inp.scale
    bias_tuple = () if bias is None else (bias,)

    def timed(call):
        if backward:
            def fn():
                for t in leaves:
                    t.grad = None
                out = call()
                out.backward(grad_out)
                return out
        else:
            def fn():
                with torch.inference_mode():
                    return call()
        return fn

    contenders = []
    for name in names:
        meta = {"backend": name}
        if name == "einops":
            meta["served_by"] = "sdpa"
            contenders.append(Contender(name, timed(lambda: einops_window_attention(q, k, v, window, bias_tuple,
                                                                                     scale)), meta))
            continue
        meta, skip = _served_by(name, inp, device, quick)
        if skip:
            contenders.append(Contender(name, meta=meta, skip_reason=skip))
            continue
        contenders.append(Contender(name, timed(lambda name=name: attend(q, k, v, bias=make_bias(), window=window,
                                                                          backend=name)), meta))
    return contenders, dims


def default_models() -> list:
    """The headline ViT-S/16, then one preset per vit-pytorch architecture (the first registered one),
    so models added to the registry show up without touching the benchmark."""
    from fastvit.models.registry import model_entries

    registry = {entry.name: entry for entry in model_entries()}
    names, seen = [], set()
    if HEADLINE_MODEL in registry:
        names.append(HEADLINE_MODEL)
        seen.add((registry[HEADLINE_MODEL].vit_pytorch or "").split(":")[0])
    for name, entry in registry.items():
        if not entry.vit_pytorch:
            continue
        family = entry.vit_pytorch.split(":")[0]
        if family not in seen:
            seen.add(family)
            names.append(name)
    return names


def select_models(patterns: Optional[Sequence[str]]) -> list:
    """Presets matching any glob pattern (``all`` = every preset with a vit-pytorch equivalent)."""
    from fastvit.models.registry import list_models, model_entries

    if not patterns:
        return default_models()
    names = []
    for pattern in patterns:
        if pattern == "all":
            matched = [e.name for e in model_entries() if e.vit_pytorch]
        elif pattern == "default":
            matched = default_models()
        else:
            matched = list_models(pattern)
            if not matched:
                raise ValueError(f"no registered model matches {pattern!r} (see fastvit.list_models())")
        names += [n for n in matched if n not in names]
    return names


def _timm_vit_kwargs(kwargs: dict) -> dict:
    """timm VisionTransformer arguments with the sizes of a fastvit ViT (for --quick's tiny presets)."""
    dim, heads = kwargs["dim"], kwargs["heads"]
    out = dict(img_size=kwargs["image_size"], patch_size=kwargs["patch_size"], embed_dim=dim,
               depth=kwargs["depth"], num_heads=heads, mlp_ratio=kwargs["mlp_dim"] / dim,
               num_classes=kwargs.get("num_classes", 1000), in_chans=kwargs.get("channels", 3))
    if kwargs.get("pool", "cls") == "mean":
        out.update(global_pool="avg", class_token=False, fc_norm=False)
    return out


def _build_timm(name: str, entry, overrides: dict, quick: bool):
    """``(model or None, timm name, reason)``."""
    if package_version("timm") is None:
        return None, None, "timm is not installed"
    if entry.timm is None:
        return None, None, f"no timm equivalent registered for {name} (register_model(..., timm=...))"
    timm_name, extra = entry.timm, entry.timm_kwargs
    import timm

    kwargs = dict(extra)
    if quick:
        if not (entry.vit_pytorch or "").startswith("vit_pytorch.vit:"):
            return None, timm_name, "no size-matched timm model for --quick's tiny preset"
        kwargs.update(_timm_vit_kwargs({**entry.kwargs, **overrides}))
    return timm.create_model(timm_name, pretrained=False, **kwargs), timm_name, None


def _autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _model_fn(model: torch.nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype, mode: str,
              backend: Optional[str]) -> Callable[[], Any]:
    selection = (lambda: use_backend(backend, strict=False)) if backend else contextlib.nullcontext
    if mode == "fwd+bwd":
        def fn():
            model.zero_grad(set_to_none=True)
            with selection(), _autocast(device, dtype):
                out = model(x)
            out.float().sum().backward()
            return out
    else:
        def fn():
            with torch.inference_mode(), selection(), _autocast(device, dtype):
                return model(x)
    return fn


def model_contenders(name: str, *, device: str, dtypes: Sequence[torch.dtype], mode: str = "fwd",
                     batch_size: int = 8, backends: Optional[Sequence[str]] = None, vit_pytorch: bool = True,
                     timm: bool = True, quick: bool = False, extra_auto_dtypes: Sequence[torch.dtype] = (),
                     timm_compile: bool = False) -> tuple:
    """The contenders of one model group.

    fastvit runs under each name in ``backends`` (``use_backend(name, strict=False)``: calls a backend
    cannot serve fall back to auto) and ``"auto"``; vit-pytorch with the same weights; timm's
    equivalent (and, with ``timm_compile``, the same timm model under ``torch.compile``). Each in every
    dtype of ``dtypes`` (autocast for bf16 / fp16), plus fastvit auto in ``extra_auto_dtypes``.

    Returns:
        ``(contenders, info)``; ``info`` has the input size, parameter count and notes.
    """
    from fastvit.models.registry import get_model_entry

    entry = get_model_entry(name)
    overrides = dict(entry.test_overrides) if quick else {}
    input_size = entry.input_size_for(overrides) if quick else entry.input_size
    if quick and entry.test_input_size:
        input_size = entry.test_input_size
    info = {"input_size": list(input_size), "vit_pytorch": entry.vit_pytorch, "notes": []}

    torch.manual_seed(0)
    model = entry.build(**overrides).eval()
    ref = None
    ref_reason = None
    if not vit_pytorch:
        ref_reason = "disabled (--no-vit-pytorch)"
    elif entry.vit_pytorch is None:
        ref_reason = "no vit-pytorch equivalent"
    elif package_version("vit-pytorch") is None:
        ref_reason = "vit-pytorch is not installed"
    else:
        try:
            torch.manual_seed(0)
            ref = entry.build_vit_pytorch(**overrides).eval()
            model.load_vit_pytorch_state_dict(ref.state_dict())
        except Exception as e:  # noqa: BLE001 - a broken equivalent must not stop the benchmark
            ref_reason = f"vit-pytorch build or weight loading failed: {type(e).__name__}: {e}"
            info["notes"].append(ref_reason)
            ref = None
    timm_model, timm_name, timm_reason = (None, None, "disabled (--no-timm)")
    if timm:
        try:
            timm_model, timm_name, timm_reason = _build_timm(name, entry, overrides, quick)
        except Exception as e:  # noqa: BLE001
            timm_reason = f"timm build failed: {type(e).__name__}: {e}"
    info["timm_model"] = timm_name
    if timm_model is not None and entry.timm_note:
        info["notes"].append(f"timm: {entry.timm_note}")
    info["params"] = sum(p.numel() for p in model.parameters())

    model.to(device)
    if ref is not None:
        ref.to(device)
    if timm_model is not None:
        timm_model.eval().to(device)
    torch.manual_seed(0)
    x = torch.randn(batch_size, *input_size, device=device)
    if mode == "fwd+bwd":
        x.requires_grad_(False)

    names = list(backends) if backends is not None else [*BACKENDS, "auto"]
    contenders = []
    for dtype in list(dtypes) + [d for d in extra_auto_dtypes if d not in dtypes]:
        dt = dtype_name(dtype)
        extra_only = dtype not in dtypes
        for backend in (["auto"] if extra_only else names):
            meta = {"impl": "fastvit", "backend": backend, "dtype": dt}
            cname = f"fastvit[{backend}] {dt}"
            if backend != "auto":
                if backend not in BACKENDS:
                    contenders.append(Contender(cname, meta=meta, skip_reason=f"unknown backend {backend!r}"))
                    continue
                ok, why = BACKENDS[backend].availability()
                if not ok:
                    contenders.append(Contender(cname, meta=meta, skip_reason=f"unavailable: {why}"))
                    continue
                if torch.device(device).type not in BACKENDS[backend].devices:
                    contenders.append(Contender(cname, meta=meta, skip_reason=f"{backend} does not run on {device}"))
                    continue
                if _interpreted(backend, device, quick):
                    contenders.append(Contender(cname, meta=meta, skip_reason=_interpreted(backend, device, quick)[0]))
                    continue
            contenders.append(Contender(cname, _model_fn(model, x, device, dtype, mode, backend), meta))
        if extra_only:
            continue
        meta = {"impl": "vit-pytorch", "backend": None, "dtype": dt}
        if ref is None:
            contenders.append(Contender(f"vit-pytorch {dt}", meta=meta, skip_reason=ref_reason))
        else:
            contenders.append(Contender(f"vit-pytorch {dt}", _model_fn(ref, x, device, dtype, mode, None), meta))
        meta = {"impl": "timm", "backend": None, "dtype": dt, "timm_model": timm_name}
        if timm_model is None:
            contenders.append(Contender(f"timm {dt}", meta=meta, skip_reason=timm_reason))
        else:
            contenders.append(Contender(f"timm {dt}", _model_fn(timm_model, x, device, dtype, mode, None), meta))
        if timm_compile:
            meta = dict(meta, impl="timm", compiled=True)
            if timm_model is None:
                contenders.append(Contender(f"timm compiled {dt}", meta=meta, skip_reason=timm_reason))
            else:
                # Compiled on its first (warm-up) call, outside the timed rounds.
                compiled = torch.compile(timm_model)
                contenders.append(Contender(f"timm compiled {dt}", _model_fn(compiled, x, device, dtype, mode, None),
                                            meta))
    return contenders, info


def timm_patch_contenders(entry, *, device: str, dtypes: Sequence[torch.dtype], mode: str = "fwd",
                          batch_size: Optional[int] = None, quick: bool = False) -> tuple:
    """The contenders of one ``--timm-patch`` group: timm's model unpatched, ``patch_timm``-ed, and
    ``patch_timm(linear=True)``-ed, the same weights, each in every dtype (autocast for bf16 / fp16).

    Args:
        entry: a ``fastvit.tools.timm_models.TimmBenchModel``.

    Returns:
        ``(contenders, info)``; ``info`` has the input size, parameter count, what the patch did and
        the batch size.
    """
    import copy

    import timm

    from fastvit.compat.timm import patch_summary, patch_timm

    torch.manual_seed(0)
    kwargs = dict(entry.quick) if quick else {}
    model = timm.create_model(entry.name, pretrained=False, **kwargs).eval()
    input_size = (3, entry.quick_size, entry.quick_size) if quick else tuple(model.pretrained_cfg["input_size"])
    batch = batch_size or entry.batch_size(torch.device(device).type, quick)
    versions = {"timm": model,
                "patched": patch_timm(copy.deepcopy(model)),
                "patched+linear": patch_timm(copy.deepcopy(model), linear=True)}
    summary = patch_summary(versions["patched+linear"])
    info = {"input_size": list(input_size), "params": sum(p.numel() for p in model.parameters()),
            "timm_model": entry.name, "vit_pytorch": None, "batch_size": batch,
            "notes": [f"refused: {cls} ({why})" for cls, (_, why) in summary.refused.items()]}
    for m in versions.values():
        m.to(device)
    torch.manual_seed(0)
    x = torch.randn(batch, *input_size, device=device)
    impls = {"timm": "timm", "patched": "timm-patched", "patched+linear": "timm-patched-linear"}
    contenders = []
    for dtype in dtypes:
        dt = dtype_name(dtype)
        for version, m in versions.items():
            meta = {"impl": impls[version], "backend": "auto" if version != "timm" else None, "dtype": dt,
                    "timm_model": entry.name, "family": entry.family}
            if version == "patched+linear" and torch.device(device).type != "cpu":
                contenders.append(Contender(f"{version} {dt}", meta=meta, skip_reason=(
                    "fastvit.layers.Linear's fast path is CPU inference only (elsewhere it is timm's Linear)")))
                continue
            contenders.append(Contender(f"{version} {dt}", _model_fn(m, x, device, dtype, mode, None), meta))
    return contenders, info


# ---- the host path: what a call costs before (and instead of) any arithmetic ---------------------------------

OVERHEAD_DIMS = (1, 1, 16, 16)  # B, H, N, D: so small that the time is the Python and dispatch around the math
SDPA_RAW, SDPA_MASK, TIMM_ATTENTION, TIMM_PATCHED = ("sdpa raw", "sdpa raw dense-mask", "timm Attention",
                                                     "timm Attention patched")
TRITON_NOOP = "attend triton (launch no-op)"
# The targets: contender -> (row field, upper limit, what it means). Judged on the medians.
OVERHEAD_TARGETS = {
    "attend auto": ("extra_us_vs_sdpa", 3.0, "vs sdpa raw"),
    # the honest base of a biased call: SDPA with the dense float mask the descriptor becomes
    "attend RelPosBias": ("extra_us_vs_sdpa_mask", 6.0, "vs sdpa raw dense-mask"),
    TIMM_PATCHED: ("time_vs_timm", 1.05, "of timm's time"),
    TRITON_NOOP: ("median_us", 8.0, "per call"),
}


def _no_launch(*args, **kwargs) -> None:
    """Stands in for ``fastvit.kernels.attention._launch``: everything up to the launch runs, nothing after."""


def _triton_noop_skip(device: str, inp) -> Optional[str]:
    """Why the triton launch path cannot be timed here (None: it can).

    The kernels decide at import whether ``@triton.jit`` compiles or interprets, and on the CPU only the
    interpreter runs, so ``TRITON_INTERPRET=1`` must be in the environment before ``fastvit.kernels`` is
    first imported. The bench never sets it itself: it would change every other group's triton rows in
    the process. With the launch replaced by a no-op nothing is interpreted, but the path timed must be
    the one a real interpreted call takes, so kernels imported without it are refused as well.
    """
    missing = importable("triton")
    if missing is not None:
        return f"triton is not importable ({missing}): {install_hint('triton')}"
    cpu = torch.device(device).type == "cpu"
    if cpu and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the triton kernels run on the CPU only in Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before fastvit.kernels is imported (TRITON_INTERPRET=1 fastvit bench --overhead)")
    ok, why = BACKENDS["triton"].availability()  # imports fastvit.kernels
    if not ok:
        return f"the triton backend is unavailable: {why}"
    if cpu:
        from fastvit.kernels import attention as kattn

        if type(kattn._attn_fwd).__name__ != "InterpretedFunction":
            return ("fastvit.kernels was imported before TRITON_INTERPRET=1 was set (the kernels choose the "
                    "interpreter at import): set it in the environment before fastvit starts")
    reasons = BACKENDS["triton"].not_supported_reasons(inp)
    return "; ".join(reasons) if reasons else None


@contextlib.contextmanager
def _overhead_scope(noop_launch: bool):
    """The whole overhead group runs under one ``torch.inference_mode()`` (as a model's caller enters it
    once, not per attention call) and, when the triton row runs, with the kernel launch a no-op; both
    are undone when the group ends, also on error."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if noop_launch:
            from fastvit.kernels import attention as kattn

            original = kattn._launch
            kattn._launch = _no_launch
            stack.callback(setattr, kattn, "_launch", original)
        yield


def overhead_contenders(*, device: str) -> tuple:
    """The contenders of the overhead group: the host-path cost of one call on tiny ``[1, 1, 16, 16]``
    fp32 tensors (µs per call), raw SDPA against ``attend()`` under each way a model calls it.

    The descriptors (``RelPosBias`` with Swin's 4x4 index, ``DenseBias``, ``KeyPaddingMask``,
    ``Window`` 2x2 windows on the 4x4 grid) are built inside the timed call, as a model's forward
    builds them. ``attend triton (launch no-op)`` is the triton path with the kernel launch replaced by
    a no-op (``_triton_noop_skip`` says when it cannot run); ``timm Attention`` is timm's ViT attention
    (dim 64, 2 heads, 5 tokens) unpatched and patched with ``fastvit.patch_timm`` (a deep copy).

    Returns:
        ``(contenders, info)``; ``info["scope"]`` is the context the group is timed in
        (``_overhead_scope``), ``info["dims"]`` the attention shape.
    """
    import copy

    import torch.nn.functional as F

    from fastvit.attention import DenseBias, KeyPaddingMask, RelPosBias, Window
    from fastvit.layers import window_relative_position_index

    B, H, N, D = OVERHEAD_DIMS
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device) for _ in range(3))
    rel_index = window_relative_position_index((4, 4)).to(device)  # (16, 16) into a (7 * 7, heads) table
    rel_table = torch.randn(7 * 7, H, device=device)
    dense = torch.randn(1, 1, N, N, device=device)
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep[:, -3:] = False  # three padded keys
    grid, size = (4, 4), (2, 2)

    calls = {
        SDPA_RAW: (None, lambda: F.scaled_dot_product_attention(q, k, v), {}),
        SDPA_MASK: (None, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), {}),
        "attend auto": ("auto", lambda: attend(q, k, v), {}),
        "attend sdpa": ("sdpa", lambda: attend(q, k, v, backend="sdpa"), {}),
        "attend RelPosBias": ("auto", lambda: attend(q, k, v, bias=RelPosBias(rel_table, rel_index)),
                              dict(bias=RelPosBias(rel_table, rel_index))),
        "attend DenseBias": ("auto", lambda: attend(q, k, v, bias=DenseBias(dense)), dict(bias=DenseBias(dense))),
        "attend KeyPaddingMask": ("auto", lambda: attend(q, k, v, bias=KeyPaddingMask(keep)),
                                  dict(bias=KeyPaddingMask(keep))),
        "attend Window": ("auto", lambda: attend(q, k, v, window=Window(grid=grid, size=size)),
                          dict(window=Window(grid=grid, size=size))),
        TRITON_NOOP: ("triton", lambda: attend(q, k, v, backend="triton"), {}),
    }
    contenders, notes = [], []
    triton_skip = _triton_noop_skip(device, make_inputs(q, k, v))
    for name, (backend, fn, kwargs) in calls.items():
        meta = {"backend": backend, "served_by": "sdpa (raw)" if backend is None else None}
        if name == TRITON_NOOP:
            meta.update(served_by="triton", launch_noop=True)
            contenders.append(Contender(name, fn, meta, skip_reason=triton_skip))
            continue
        if backend is not None:
            try:
                meta["served_by"] = choose(make_inputs(q, k, v, **kwargs), backend).name
            except ValueError as e:
                contenders.append(Contender(name, meta=meta, skip_reason=str(e)))
                continue
            if meta["served_by"] == "triton" and triton_skip is None:
                meta["launch_noop"] = True  # the no-op is in force for the whole group
                notes.append(f"{name} is served by triton: its kernel launch is a no-op in this group too")
        contenders.append(Contender(name, fn, meta))

    timm_meta = {"backend": None, "served_by": "timm", "timm_model": "vision_transformer.Attention(64, heads=2)"}
    timm_skip = importable("timm")
    if timm_skip is not None:
        why = f"timm is not importable ({timm_skip}): {install_hint('timm')}"
        contenders += [Contender(TIMM_ATTENTION, meta=dict(timm_meta), skip_reason=why),
                       Contender(TIMM_PATCHED, meta=dict(timm_meta, backend="auto"), skip_reason=why)]
    else:
        from timm.models.vision_transformer import Attention

        from fastvit.compat.timm import patch_summary, patch_timm

        torch.manual_seed(0)
        timm_attention = Attention(64, num_heads=2).eval().to(device)
        patched = patch_timm(copy.deepcopy(timm_attention))
        summary = patch_summary(patched)
        x = torch.randn(1, 5, 64, device=device)  # (b, n, c): a CLS token and a 2x2 grid
        contenders.append(Contender(TIMM_ATTENTION, lambda: timm_attention(x), dict(timm_meta)))
        if summary.patched:
            contenders.append(Contender(TIMM_PATCHED, lambda: patched(x), dict(timm_meta, backend="auto",
                                                                                 served_by="fastvit")))
        else:
            contenders.append(Contender(TIMM_PATCHED, meta=dict(timm_meta, backend="auto"),
                                        skip_reason=f"patch_timm left the module alone: {summary}"))
    info = {"dims": OVERHEAD_DIMS, "notes": notes, "scope": lambda: _overhead_scope(triton_skip is None)}
    return contenders, info
