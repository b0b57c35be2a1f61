"""The ``packed`` group of ``fastvit bench``: a mixed-resolution batch, packed against padded.

Sixteen images with sides drawn from 128-384 px (multiples of the patch, 16; seeded, so every run
times the same batch: about half its tokens would be padding if padded to the longest image) go
through NaViT at ViT-S width (dim 384, depth 12, 6 heads of 64), eval (fp32, or bf16 / fp16 autocast
with ``--dtype``; ``--backward`` adds forward + backward):

- ``vit-pytorch NaViT``: vit-pytorch's model, the same weights, its own grouping (groups of at most
  ``GROUP_MAX_SEQ_LEN`` tokens, padded to the longest group, a dense ``[b, 1, n, n]`` mask);
- ``fastvit NaViT packed``: every token of the call in one packed sequence (``Packed``), no padding;
- ``fastvit NaViT padded``: the same model with each image a row of a padded batch and a
  ``KeyPaddingMask`` (``pack=False``), what packing saves;
- ``attend packed <backend>``: one attention call at those lengths (6 heads of 64) through
  ``attend(..., packed=)`` on auto, triton (the variable-length kernels), flex (a document block
  mask) and sdpa (one call per distinct length), each against ``attend padded sdpa``: the same
  tokens padded to the longest with a ``KeyPaddingMask`` (``x_padded``), and triton against flex
  (``x_flex``). Triton and flex are timed on CUDA only (``--quick`` runs them at tiny sizes). ``sdpa raw
  block-diagonal mask`` is the alternative the sdpa backend does not take: one SDPA call over all
  tokens with a ``(total, total)`` boolean mask.

The targets (the issue's, judged on the medians) are ``PACKED_TARGETS``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from fastvit.attention import KeyPaddingMask, Packed, attend, choose, dtype_name, make_inputs
from fastvit.extras import importable, install_hint
from fastvit.tools.timing import Contender

PACKED_GROUP = "navit_s16_mixed16"  # the models; the attention calls are PACKED_ATTENTION_GROUP
PACKED_ATTENTION_GROUP = "navit_s16_mixed16_attention"
NAVIT_S16 = dict(image_size=384, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536,
                 dim_head=64)
NAVIT_QUICK = dict(image_size=64, patch_size=16, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, dim_head=32)
GROUP_MAX_SEQ_LEN = 2048  # vit-pytorch's default
VIT_PYTORCH, PACKED, PADDED = "vit-pytorch NaViT", "fastvit NaViT packed", "fastvit NaViT padded"
ATTEND_PADDED = "attend padded sdpa"  # the base of every packed attention contender: SDPA with a key mask
SDPA_BLOCK_DIAGONAL = "sdpa raw block-diagonal mask"  # the alternative to sdpa's buckets: sum(lengths)^2 logits
PACKED_BACKENDS = ("auto", "triton", "flex", "sdpa")


def attend_packed(backend: str) -> str:
    return f"attend packed {backend}"


# contender -> [(row field, lower limit, what it means)]; the triton one is the GPU target
PACKED_TARGETS = {
    PACKED: [("x_vit_pytorch", 2.0, "vit-pytorch NaViT's time / this"),
             ("x_padded", 1.5, "the padded model's time / this")],
    attend_packed("sdpa"): [("x_padded", 1.4, "the padded masked call's time / this")],
    attend_packed("triton"): [("x_padded", 1.5, "padded SDPA's time / this (GPU)")],
}


def mixed_images(count: int = 16, low: int = 128, high: int = 384, patch: int = 16, seed: int = 0) -> list:
    """``count`` random ``[3, h, w]`` images, h and w drawn independently from the multiples of ``patch``
    in ``[low, high]`` (seeded: the same batch every run)."""
    g = torch.Generator().manual_seed(seed)
    sides = torch.arange(low, high + 1, patch)
    hw = sides[torch.randint(len(sides), (count, 2), generator=g)].tolist()
    return [torch.randn(3, h, w, generator=g) for h, w in hw]


def padding_fraction(lengths) -> float:
    """The share of a padded batch's tokens that would be padding: ``1 - sum / (count * max)``."""
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def packed_contenders(*, device: str, dtype: torch.dtype = torch.float32, mode: str = "fwd",
                      quick: bool = False, part: str = "models") -> tuple:
    """The contenders of the ``packed`` groups (see the module docstring): ``part="models"`` the NaViT
    models in ``dtype`` by autocast, ``part="attention"`` the attention calls on ``dtype`` tensors (a
    group of their own: interleaved with seconds-long model calls they would get one sample each).

    Returns:
        ``(contenders, info)``; ``info`` has the images, their token counts and the padding share.
    """
    from fastvit.models.na_vit import NaViT
    from fastvit.tools.contenders import _autocast

    cfg = NAVIT_QUICK if quick else NAVIT_S16
    images = mixed_images(4, 16, 64) if quick else mixed_images()
    images = [im.to(device) for im in images]
    patch = cfg["patch_size"]
    lengths = [(im.shape[1] // patch) * (im.shape[2] // patch) for im in images]
    torch.manual_seed(0)
    model = NaViT(**cfg).eval().to(device)
    call = dict(group_images=True, group_max_seq_len=GROUP_MAX_SEQ_LEN)
    dt = dtype_name(dtype)
    meta = {"impl": "fastvit", "backend": "auto", "dtype": dt}

    def run(m, **kwargs):
        if mode == "fwd+bwd":
            def fn():
                m.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    out = m(images, **call, **kwargs)
                out.float().sum().backward()
                return out
        else:
            def fn():
                with torch.inference_mode(), _autocast(device, dtype):
                    return m(images, **call, **kwargs)
        return fn

    contenders = []
    info = {"images": [list(im.shape[1:]) for im in images], "lengths": lengths, "tokens": sum(lengths),
            "padded_tokens": len(lengths) * max(lengths), "padding_fraction": padding_fraction(lengths),
            "model": dict(cfg), "group_max_seq_len": GROUP_MAX_SEQ_LEN, "heads": cfg["heads"],
            "dim_head": cfg["dim_head"]}
    if part == "attention":
        return _attention_contenders(lengths, cfg, device, dtype, mode, quick, meta), info
    if part != "models":
        raise ValueError(f"part={part!r}: expected 'models' or 'attention'")
    missing = importable("vit_pytorch")
    if missing is not None:
        contenders.append(Contender(VIT_PYTORCH, meta=dict(meta, impl="vit-pytorch", backend=None),
                                    skip_reason=f"vit-pytorch is not importable ({missing}): "
                                                f"{install_hint('vit_pytorch')}"))
    else:
        from vit_pytorch.na_vit import NaViT as VitPytorchNaViT

        reference = VitPytorchNaViT(**cfg).eval().to(device)
        reference.load_state_dict(copy.deepcopy(model.state_dict()))
        contenders.append(Contender(VIT_PYTORCH, run(reference), dict(meta, impl="vit-pytorch", backend=None)))
    contenders += [Contender(PACKED, run(model), dict(meta)), Contender(PADDED, run(model, pack=False), dict(meta))]
    return contenders, info


def _attention_contenders(lengths: list, cfg: dict, device: str, dtype: torch.dtype, mode: str, quick: bool,
                          meta: dict) -> list:
    """One attention call at ``lengths``: packed on each backend, padded with a key mask on SDPA, and SDPA
    over all tokens with a block-diagonal mask."""
    from fastvit.tools.contenders import _interpreted

    contenders = []
    heads, dim_head = cfg["heads"], cfg["dim_head"]
    g = torch.Generator().manual_seed(1)
    total, longest = sum(lengths), max(lengths)
    grad = mode == "fwd+bwd"
    x = torch.randn(1, heads, total, dim_head, generator=g).to(device, dtype).requires_grad_(grad)
    layout = Packed(lengths)
    rows = torch.zeros(len(lengths), longest, dtype=torch.long)
    keep = torch.zeros(len(lengths), longest, dtype=torch.bool)
    for i, (start, n) in enumerate(zip(layout.offsets, lengths)):
        rows[i, :n] = torch.arange(start, start + n)
        keep[i, :n] = True
    padded = x.detach()[0][:, rows.flatten()].unflatten(1, rows.shape).transpose(0, 1).contiguous()  # (b, h, n, d)
    padded.requires_grad_(grad)
    mask = KeyPaddingMask(keep.to(device))
    calls = [(attend_packed(b), b, (x, x, x), dict(packed=layout)) for b in PACKED_BACKENDS]
    calls.append((ATTEND_PADDED, "sdpa", (padded, padded, padded), dict(bias=mask)))
    doc_q, _ = layout.document_ids(x.device)
    block_diagonal = doc_q[:, None] == doc_q[None, :]  # (total, total) bool, True = attend
    contenders.append(Contender(SDPA_BLOCK_DIAGONAL, _attention_fn((x, x, x), dict(attn_mask=block_diagonal), None,
                                                                   mode), dict(meta, backend=None, served_by="sdpa")))
    for name, backend, qkv, kwargs in calls:
        inp = make_inputs(*qkv, **kwargs)
        try:
            served = choose(inp, backend).name
        except ValueError as e:
            contenders.append(Contender(name, meta=dict(meta, backend=backend, served_by=None), skip_reason=str(e)))
            continue
        why = _interpreted(served, device, quick)
        if why:
            contenders.append(Contender(name, meta=dict(meta, backend=backend, served_by=served),
                                        skip_reason="; ".join(why)))
            continue
        contenders.append(Contender(name, _attention_fn(qkv, kwargs, backend, mode),
                                    dict(meta, backend=backend, served_by=served)))
    return contenders


def _attention_fn(qkv: tuple, kwargs: dict, backend: Optional[str], mode: str):
    """One call of ``attend`` on ``backend`` (None: ``scaled_dot_product_attention`` itself)."""
    if backend is None:
        import torch.nn.functional as F

        call = lambda: F.scaled_dot_product_attention(*qkv, **kwargs)  # noqa: E731
    else:
        call = lambda: attend(*qkv, backend=None if backend == "auto" else backend, **kwargs)  # noqa: E731
    if mode == "fwd+bwd":
        def fn():
            out = call()
            out.float().sum().backward()
            return out
    else:
        def fn():
            with torch.inference_mode():
                return call()
    return fn


def packed_targets(row: dict) -> Optional[list]:
    """The targets of a row of this group, or None for a row without targets (see `row_targets`)."""
    return row_targets(row, PACKED_TARGETS.get(row.get("contender")))


def row_targets(row: dict, targets: Optional[list]) -> Optional[list]:
    """``[(field, lower limit, text)]`` judged on ``row``: each ``{field, min, text, value, met}`` (``met``
    None when the row did not run or its ratio is missing); None for no targets."""
    if not targets:
        return None
    out = []
    for field, limit, text in targets:
        value = row.get(field) if row.get("status") == "ok" else None
        out.append({"field": field, "min": limit, "text": text, "value": value,
                    "met": None if value is None else bool(value >= limit)})
    return out


# ---- the ``ats`` group: adaptive token sampling, kept tokens packed vs padded ---------------------------------

ATS_GROUP = "ats_vit_small_patch16_224"
ATS_PADDED, ATS_PACKED = "ats padded", "ats packed"
ATS_TARGETS = {ATS_PACKED: [("x_padded", 1.15, "the padded, masked model's time / this")]}


def ats_contenders(*, device: str, dtype: torch.dtype = torch.float32, mode: str = "fwd", batch_size: int = 8,
                   quick: bool = False) -> tuple:
    """The contenders of the ``ats`` group: ATS-ViT-S/16 at its default sampling (budgets 196, 128, 64,
    32 patches over the depth), the kept tokens padded with a ``KeyPaddingMask`` (``packed=False``)
    against packed (``packed=True``), the same weights and images, eval.

    Returns:
        ``(contenders, info)``.
    """
    from fastvit.models.registry import create_model
    from fastvit.tools.contenders import _model_fn

    overrides = {}
    if quick:
        overrides = dict(image_size=64, dim=64, heads=2, mlp_dim=128, depth=4, max_tokens_per_depth=(16, 12, 8, 4))
    torch.manual_seed(0)
    padded = create_model(ATS_GROUP, **overrides).eval().to(device)
    packed = create_model(ATS_GROUP, packed=True, **overrides).eval().to(device)
    packed.load_state_dict(padded.state_dict())
    size = 64 if quick else 224
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    meta = {"impl": "fastvit", "backend": "auto", "dtype": dtype_name(dtype)}
    contenders = [Contender(name, _model_fn(model, x, device, dtype, mode, None), dict(meta))
                  for name, model in ((ATS_PADDED, padded), (ATS_PACKED, packed))]
    info = {"batch_size": batch_size, "input_size": [3, size, size], "model": ATS_GROUP, "overrides": overrides}
    return contenders, info


def ats_targets(row: dict) -> Optional[list]:
    """`packed_targets` for the ``ats`` group."""
    return row_targets(row, ATS_TARGETS.get(row.get("contender")))
