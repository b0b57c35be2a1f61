"""ViT: "An Image is Worth 16x16 Words" (Dosovitskiy et al., arXiv 2010.11929).

vit-pytorch 1.26.x layout and numerics: dual-patchnorm embedding, 2-D ``cls_token (num_cls, dim)``
and ``pos_embedding (N + num_cls, dim)``, pre-norm blocks with the norm inside, a final norm before
pooling, ``mlp_head`` a plain Linear.

Deliberate differences from vit-pytorch:

- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid. vit-pytorch slices the flat table (``pos_embedding[:n]``), which gives a 256x128 image the
  positions of the wrong grid cells. Same-size inputs are unaffected; ``legacy_pos_slicing=True``
  restores vit-pytorch's behaviour.
- Wrong channel counts, non-divisible or too-large images raise ``ValueError`` up front.
- ``num_classes=0`` returns the pooled features ``(b, dim)`` (``mlp_head`` an ``nn.Identity``); vit-pytorch
  has no head then (``mlp_head = None``) and returns the normed tokens ``(b, n, dim)``, which
  ``legacy_num_classes_zero=True`` restores.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastvit.layers import DistillTokenMixin, Linear, Transformer, ViTBody

from .base import VisionModel
from .registry import register_model

__all__ = ["ViT", "DistillableViT"]


class ViT(ViTBody, VisionModel):
    """Vision Transformer with vit-pytorch's constructor.

    Args:
        image_size: int or (h, w); the largest input size.
        patch_size: int or (ph, pw).
        num_classes: classifier width; 0 returns the pooled features ``(b, dim)``.
        dim: token width. depth: number of blocks. heads: attention heads. mlp_dim: MLP hidden width.
        pool: ``"cls"`` (CLS token) or ``"mean"`` (mean over tokens, no CLS token).
        channels: input channels. dim_head: width per head. dropout: attention/MLP dropout.
        emb_dropout: dropout after the position embedding.
        legacy_pos_slicing: slice the flat position table for smaller inputs, as vit-pytorch does.
        legacy_num_classes_zero: with ``num_classes=0`` no head, the tokens out (vit-pytorch).
    """

    final_norm_path = "transformer.norm"
    intermediates_from = "transformer"

    transformer_class = Transformer

    def stem_options(self, pool: str) -> dict:
        return dict(num_cls_tokens=1 if pool == "cls" else 0, flat=True)

    def make_head(self, dim: int, num_classes: int) -> Optional[nn.Module]:
        return Linear(dim, num_classes) if num_classes > 0 else None

    def forward_features(self, img: Tensor) -> Tensor:
        """Normed tokens ``(b, num_cls + n, dim)``, CLS first (``pool='cls'``)."""
        x = self.dropout(self.embed(img))
        return self.transformer(x)

    def pool_features(self, x: Tensor) -> Tensor:
        return self.to_latent(self.pool_tokens(x))


class DistillableViT(DistillTokenMixin, ViT):
    """``ViT`` whose forward also accepts ``distill_token (1, dim)`` (vit-pytorch's ``distill.DistillableViT``);
    same constructor as ``ViT``."""

    plain_class = ViT


_SMALL = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64, num_classes=10)

for _name, _kw in {
    "vit_tiny_patch16_224": dict(dim=192, depth=12, heads=3, mlp_dim=768),
    "vit_small_patch16_224": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
    "vit_base_patch16_224": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
    "vit_large_patch16_224": dict(dim=1024, depth=24, heads=16, mlp_dim=4096),
}.items():
    register_model(_name, ViT, vit_pytorch="vit_pytorch.vit:ViT", timm=_name, test_overrides=_SMALL,
                   image_size=224, patch_size=16, num_classes=1000, **_kw)
register_model("vit_small_patch16_224_mean", ViT, vit_pytorch="vit_pytorch.vit:ViT", timm="vit_small_patch16_224",
               timm_kwargs={"global_pool": "avg", "class_token": False, "fc_norm": False},
               test_overrides={**_SMALL, "pool": "mean"}, image_size=224, patch_size=16, num_classes=1000,
               dim=384, depth=12, heads=6, mlp_dim=1536, pool="mean")
register_model("vit_base_patch32_384", ViT, vit_pytorch="vit_pytorch.vit:ViT", timm="vit_base_patch32_384",
               test_overrides=_SMALL,
               input_size=(3, 384, 384), image_size=384, patch_size=32, num_classes=1000,
               dim=768, depth=12, heads=12, mlp_dim=3072)
