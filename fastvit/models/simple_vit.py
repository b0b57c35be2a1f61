"""SimpleViT: "Better plain ViT baselines for ImageNet-1k" (Beyer et al., arXiv 2205.01580).

2-D sin-cos positions, mean pooling, no dropout, no biases in the attention projections.
vit-pytorch 1.26.x key layout (``to_out`` is a bias-free Linear, ``linear_head``).

Deliberate difference from vit-pytorch: ``num_classes=0`` returns the pooled features ``(b, dim)``
(``linear_head`` an ``nn.Identity``); vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``, which
``legacy_num_classes_zero=True`` restores.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastvit.layers import Linear, PatchEmbed, Transformer, check_image, pair, patch_grid, posemb_sincos_2d

from .base import VisionModel
from .registry import register_model

__all__ = ["SimpleViT"]


class SimpleViT(VisionModel):
    """Args as ``ViT`` minus pool/dropout: image_size, patch_size, num_classes, dim, depth, heads,
    mlp_dim, channels, dim_head, legacy_num_classes_zero."""

    classifier_path = "linear_head"
    final_norm_path = "transformer.norm"
    intermediates_from = "transformer"

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=3, dim_head=64,
                 legacy_num_classes_zero=False):
        super().__init__()
        self.image_size = pair(image_size)
        self.patch_size = pair(patch_size)
        gh, gw = patch_grid(image_size, patch_size)
        self.channels = channels
        self.to_patch_embedding = PatchEmbed(self.patch_size, channels, dim)
        # A buffer that is not saved: vit-pytorch keeps it as a plain attribute, outside the state_dict.
        self.register_buffer("pos_embedding", posemb_sincos_2d(gh, gw, dim), persistent=False)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout=None, out_bias=False)
        self.pool = "mean"
        self.to_latent = nn.Identity()
        self.linear_head = Linear(dim, num_classes)
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info([dim] * depth, [self.patch_size[0]] * depth, "transformer.layers")

    def forward_features(self, img: Tensor) -> Tensor:
        """Normed tokens ``(b, n, dim)`` (no CLS token)."""
        check_image(img, channels=self.channels, max_size=self.image_size, patch_size=self.patch_size,
                    allow_smaller=False)
        x = self.to_patch_embedding(img)
        x = x + self.pos_embedding.to(x.dtype)
        return self.transformer(x)

    def pool_features(self, x: Tensor) -> Tensor:
        return self.to_latent(x.mean(dim=1))


register_model("simple_vit_small_patch16_224", SimpleViT, vit_pytorch="vit_pytorch.simple_vit:SimpleViT",
               test_overrides=dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
                                   num_classes=10),
               image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536)
