"""The pluggable-transformer ViT (vit-pytorch ``efficient.ViT``), and its distillable variant.

``transformer`` is any module mapping ``(b, n, dim) -> (b, n, dim)`` (Nystromformer, an x-transformers
``Encoder``, or a fastvit ``Transformer``). vit-pytorch 1.26.x layout: 3-D ``pos_embedding
(1, N + 1, dim)`` and ``cls_token (1, 1, dim)``, no embedding dropout, head ``LayerNorm + Linear``.

Deliberate differences from vit-pytorch:

- ``patch_size`` may be an ``(h, w)`` pair (vit-pytorch takes an int only).
- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid, as fastvit's ViT does; vit-pytorch slices the flat table. ``legacy_pos_slicing=True`` restores
  vit-pytorch's behaviour.
- ``DistillableEfficientViT`` works (vit-pytorch 1.26.x's ``DistillMixin`` fails on the 3-D
  ``cls_token``); its ``to_vit()`` deep-copies the ``transformer=`` module, so the two models are
  independent (vit-pytorch would share it).
- ``num_classes=0`` returns the pooled, normed features ``(b, dim)`` (``mlp_head.1`` an ``nn.Identity``);
  vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.
- ``forward_intermediates`` and gradient checkpointing need a fastvit ``Transformer`` (or any module
  whose blocks run through ``fastvit.layers.BlockRunner``) as ``transformer``.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastvit.layers import DistillTokenMixin, Linear, Transformer, ViTStem

from .base import VisionModel
from .registry import register_model

__all__ = ["ViT", "DistillableEfficientViT"]


class ViT(ViTStem, VisionModel):
    """Args: image_size, patch_size, num_classes, dim, transformer, pool ("cls" | "mean"), channels,
    legacy_pos_slicing, legacy_num_classes_zero."""

    classifier_path = "mlp_head.1"
    final_norm_path = "transformer.norm"
    intermediates_from = "transformer"

    def __init__(self, *, image_size, patch_size, num_classes, dim, transformer: nn.Module, pool="cls", channels=3,
                 legacy_pos_slicing=False, legacy_num_classes_zero=False):
        super().__init__()
        if not isinstance(transformer, nn.Module):
            raise ValueError(
                f"transformer must be an nn.Module mapping (b, n, dim) -> (b, n, dim), got {transformer!r}"
            )
        # No embedding dropout in vit-pytorch's pluggable ViT: the stem's dropout has rate 0.
        self.build_stem(image_size=image_size, patch_size=patch_size, channels=channels, dim=dim, pool=pool,
                        legacy_pos_slicing=legacy_pos_slicing)
        self.transformer = transformer
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        depth = len(getattr(transformer, "layers", ()))  # a module without fastvit's blocks: no intermediates
        self.set_feature_info([dim] * depth, [self.patch_size[0]] * depth, "transformer.layers")

    def forward_features(self, img: Tensor) -> Tensor:
        """The ``transformer``'s tokens ``(b, 1 + n, dim)``, CLS first."""
        return self.transformer(self.embed(img))

    def pool_features(self, x: Tensor) -> Tensor:
        return self.mlp_head[0](self.to_latent(self.pool_tokens(x)))


class DistillableEfficientViT(DistillTokenMixin, ViT):
    """The pluggable ``ViT`` whose forward also accepts ``distill_token (1, dim)``; same constructor."""

    plain_class = ViT


def _efficient_vit(*, dim, depth, heads, mlp_dim, dim_head=64, **kwargs) -> ViT:
    """A preset: the pluggable ViT around fastvit's own Transformer."""
    return ViT(dim=dim, transformer=Transformer(dim, depth, heads, dim_head, mlp_dim), **kwargs)


register_model("efficient_vit_small_patch16_224", _efficient_vit,
               test_overrides=dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
                                   num_classes=10),
               image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536)
