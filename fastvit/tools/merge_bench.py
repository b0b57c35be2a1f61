"""The ``merge`` groups of ``fastvit bench``: Token Merging (``fastvit.merge_tokens``) on ViT-S/16, ViT-B/16
and ViT-L/16 at 224 px, batch 8, forward, eval.

One group per model and dtype (fp32, and bf16 autocast): fastvit's ViT and timm's ``VisionTransformer``
with the same architecture (random weights; merging needs no training to be timed), each at ``r`` in
``MERGE_RS`` (tokens removed per block; 0 is the unmerged model). ``x_r0`` is the same implementation's
``r = 0`` time over this one. ``info`` gives the token count at the last block for each ``r`` and the
matching's share of a merged forward (bipartite matching plus the size-weighted merge, timed in one
instrumented call outside the timed rounds).
"""

from __future__ import annotations

import copy
import time
from typing import Optional

import torch

from fastvit.attention import dtype_name
from fastvit.extras import importable, install_hint
from fastvit.tools.timing import Contender

MERGE_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
MERGE_RS = (0, 8, 16)
QUICK_RS = (0, 2, 4)
QUICK_FASTVIT = dict(image_size=64, dim=64, depth=4, heads=2, mlp_dim=128)
QUICK_TIMM = dict(img_size=64, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0)
# (model, contender) -> [(row field, lower limit, what it means)]: the CPU targets (fp32)
MERGE_TARGETS = {
    ("vit_base_patch16_224", "fastvit r=16 fp32"): [("x_r0", 1.8, "r = 0's time / this")],
    ("vit_large_patch16_224", "fastvit r=8 fp32"): [("x_r0", 1.8, "r = 0's time / this")],
}
MATCHING_SHARE_MAX = 0.10  # the matching itself at most 10% of a merged model's time


def contender_name(impl: str, r: int, dt: str) -> str:
    return f"{impl} r={r} {dt}"


def _matching_share(model, x) -> float:
    """The share of one forward spent in ``bipartite_soft_matching`` and ``merge_wavg`` (wall clock)."""
    import fastvit.merge as merge

    spent = [0.0]
    originals = merge.bipartite_soft_matching, merge.merge_wavg

    def timed(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return run

    merge.bipartite_soft_matching, merge.merge_wavg = (timed(f) for f in originals)
    try:
        with torch.inference_mode():
            model(x)  # warm
            spent[0] = 0.0
            start = time.perf_counter()
            model(x)
            total = time.perf_counter() - start
    finally:
        merge.bipartite_soft_matching, merge.merge_wavg = originals
    return spent[0] / total


def merge_contenders(name: str, *, device: str, dtype: torch.dtype = torch.float32, batch_size: int = 8,
                     quick: bool = False) -> tuple:
    """The contenders of one ``merge`` group (see the module docstring).

    Returns:
        ``(contenders, info)``; ``info``: ``tokens_last_block`` and ``matching_share`` per contender.
    """
    from fastvit import create_model, merge_tokens
    from fastvit.tools.contenders import _autocast, _model_fn

    rs = QUICK_RS if quick else MERGE_RS
    size = 64 if quick else 224
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    dt = dtype_name(dtype)
    torch.manual_seed(0)
    bases = {"fastvit": create_model(name, **(QUICK_FASTVIT if quick else {})).eval().to(device)}
    missing = importable("timm")
    if missing is None:
        import timm

        bases["timm"] = timm.create_model(name, pretrained=False, **(QUICK_TIMM if quick else {})).eval().to(device)

    contenders, tokens, shares = [], {}, {}
    for impl in ("fastvit", "timm"):
        meta = {"impl": impl, "backend": "auto" if impl == "fastvit" else None, "dtype": dt}
        for r in rs:
            cname = contender_name(impl, r, dt)
            if impl not in bases:
                contenders.append(Contender(cname, meta=dict(meta, r=r), skip_reason=(
                    f"timm is not importable ({missing}): {install_hint('timm')}")))
                continue
            model = merge_tokens(copy.deepcopy(bases[impl]), r) if r else bases[impl]
            with torch.inference_mode(), _autocast(device, dtype):
                tokens[cname] = int(model.forward_features(x[:1]).shape[1])
            if r:
                with _autocast(device, dtype):
                    shares[cname] = _matching_share(model, x)
            contenders.append(Contender(cname, _model_fn(model, x, device, dtype, "fwd", None), dict(meta, r=r)))
    info = {"batch_size": batch_size, "input_size": [3, size, size], "rs": list(rs), "tokens_last_block": tokens,
            "matching_share": shares}
    return contenders, info


def merge_targets(row: dict) -> Optional[list]:
    """The targets of a row (``{field, min, text, value, met}``), or None."""
    from fastvit.tools.packed_bench import row_targets

    out = row_targets(row, MERGE_TARGETS.get((row.get("name"), row.get("contender")))) or []
    share = row.get("matching_share")
    if share is not None and row.get("impl") == "fastvit":
        out.append({"field": "matching_share", "max": MATCHING_SHARE_MAX, "text": "of the merged forward",
                    "value": share, "met": bool(share <= MATCHING_SHARE_MAX)})
    return out or None
