"""The timm models of ``fastvit bench --timm-patch``: one per family that ``fastvit.patch_timm`` serves.

Each group times timm's model unpatched, patched (attention through ``attend()``) and patched with
``linear=True`` (plus ``fastvit.layers.Linear`` and the fused GELU), all three with the same weights.
``quick`` gives tiny sizes of the same architecture (tests, smoke runs).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Optional, Sequence

__all__ = ["TimmBenchModel", "TIMM_BENCH_MODELS", "DEFAULT_TIMM_PATCH", "select_timm_models"]

_VIT_QUICK = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
_SWIN_QUICK = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
_MAXVIT_QUICK = dict(img_size=64, embed_dim=(16, 32), depths=(1, 1), stem_width=16, transformer_window_size=(4, 4),
                     transformer_grid_size=(4, 4), transformer_dim_head=8)


@dataclass(frozen=True)
class TimmBenchModel:
    """A timm model of the ``--timm-patch`` groups.

    Args:
        family: the family ``patch_timm`` maps (``swin``, ``levit``, ...).
        name: timm's model name.
        quick: ``timm.create_model`` arguments that make it tiny (``--quick``).
        quick_size: the input side for ``quick``.
        batch: batch size per device type.
    """

    family: str
    name: str
    quick: dict = field(default_factory=dict)
    quick_size: int = 32
    batch: tuple = (("cpu", 8), ("cuda", 64))

    def batch_size(self, device: str, quick: bool = False) -> int:
        if quick:
            return 2
        per_device = dict(self.batch)
        return per_device.get(device, per_device["cpu"])


TIMM_BENCH_MODELS = [
    TimmBenchModel("vit", "vit_small_patch16_224", _VIT_QUICK),
    TimmBenchModel("vit", "vit_base_patch16_224", _VIT_QUICK, batch=(("cpu", 4), ("cuda", 64))),
    TimmBenchModel("deit-distilled", "deit_small_distilled_patch16_224", _VIT_QUICK),
    TimmBenchModel("cait", "cait_xxs24_224", dict(_VIT_QUICK, depth_token_only=1)),
    TimmBenchModel("swin", "swin_tiny_patch4_window7_224", _SWIN_QUICK, 64),
    TimmBenchModel("swin-v2", "swinv2_tiny_window8_256", _SWIN_QUICK, 64, batch=(("cpu", 4), ("cuda", 64))),
    TimmBenchModel("levit", "levit_256", dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4),
                                              depth=(1, 1, 1)), 64, batch=(("cpu", 16), ("cuda", 256))),
    TimmBenchModel("pit", "pit_s_224", dict(img_size=64, depth=(1, 1, 1)), 64),
    TimmBenchModel("crossvit", "crossvit_small_240", dict(img_size=(32, 48), patch_size=(8, 16), embed_dim=(16, 32),
                                                          depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1)),
                   48),
    TimmBenchModel("twins", "twins_svt_small", dict(img_size=64, embed_dims=(16, 32), num_heads=(1, 2),
                                                    mlp_ratios=(2, 2), depths=(2, 2), sr_ratios=(2, 1), wss=(4, 4)),
                   64),
    TimmBenchModel("nest", "nest_tiny", dict(img_size=32, patch_size=4), 32),
    TimmBenchModel("mobilevit", "mobilevit_s", {}, 64, batch=(("cpu", 8), ("cuda", 128))),
    TimmBenchModel("maxvit", "maxvit_tiny_tf_224", _MAXVIT_QUICK, 64, batch=(("cpu", 4), ("cuda", 64))),
    TimmBenchModel("beit", "beit_base_patch16_224", _VIT_QUICK, batch=(("cpu", 4), ("cuda", 64))),
    TimmBenchModel("eva", "eva02_small_patch14_224", dict(_VIT_QUICK, img_size=28, patch_size=7), 28),
    TimmBenchModel("efficientformer", "efficientformer_l1", dict(depths=(1, 1, 1, 2), embed_dims=(8, 16, 24, 32),
                                                                 num_vit=1), 224),
]

# The targets of the issue that introduced the patch (CPU: ViT-S/16 and Swin-T).
DEFAULT_TIMM_PATCH = ["vit_small_patch16_224", "swin_tiny_patch4_window7_224"]


def select_timm_models(patterns: Optional[Sequence[str]]) -> list:
    """Table entries whose timm name or family matches any glob (``all``: every one; ``default``: the targets)."""
    if patterns is None:
        return []
    chosen = []
    for pattern in patterns:
        if pattern == "all":
            matched = list(TIMM_BENCH_MODELS)
        else:
            names = DEFAULT_TIMM_PATCH if pattern == "default" else None
            matched = [m for m in TIMM_BENCH_MODELS if (m.name in names if names else
                       fnmatch.fnmatchcase(m.name, pattern) or fnmatch.fnmatchcase(m.family, pattern))]
            if not matched:
                raise ValueError(f"no timm bench model matches {pattern!r}; known: "
                                 f"{', '.join(m.name for m in TIMM_BENCH_MODELS)} (or all, default)")
        chosen += [m for m in matched if m not in chosen]
    return chosen
