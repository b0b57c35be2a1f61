"""DeepViT: "DeepViT: Towards Deeper Vision Transformer" (Zhou et al., arXiv 2103.11886).

Re-attention: the post-softmax attention maps are mixed across heads by a learned ``(h, h)`` matrix
and normalised with a LayerNorm over the head axis before they weight the values. fastvit declares
this to ``attend()`` as ``HeadMix(post=reattn_weights, post_norm=LayerNorm over heads)``; dispatch
routes it to a backend that materialises the probabilities.

vit-pytorch 1.26.x layout and numerics: dual-patchnorm embedding, 3-D ``cls_token (1, 1, dim)`` and
``pos_embedding (1, N + 1, dim)``, pre-norm blocks with the norm inside, no final norm in the
transformer, ``mlp_head = LayerNorm + Linear``. Keys: ``transformer.layers.{i}.0.{norm, to_qkv,
reattn_weights, reattn_norm.1, to_out.0}``, ``transformer.layers.{i}.1.net.{0,1,4}``.

Deliberate differences from vit-pytorch:

- ``image_size`` and ``patch_size`` may be ``(h, w)`` pairs (vit-pytorch takes ints only).
- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid; vit-pytorch slices the flat table (``pos_embedding[:, :n + 1]``), which gives a non-square or
  narrower image the positions of the wrong grid cells. Same-size inputs are unaffected;
  ``legacy_pos_slicing=True`` restores vit-pytorch's behaviour.
- Wrong channel counts, non-divisible or too-large images raise ``ValueError`` up front.
- ``num_classes=0`` returns the pooled, normed features ``(b, dim)`` (``mlp_head.1`` an ``nn.Identity``);
  vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastvit.layers import Linear, ReAttention, ViTBody
from fastvit.layers import Transformer as BaseTransformer

from .base import VisionModel
from .registry import register_model

__all__ = ["DeepViT", "ReAttention", "Transformer"]


class Transformer(BaseTransformer):
    """vit-pytorch's ``deepvit.Transformer``: ``depth`` x (re-attention + MLP, each residual, norm inside);
    no final norm. Keys ``layers.{i}.0.{norm, to_qkv, reattn_weights, reattn_norm.1, to_out.0}``,
    ``layers.{i}.1.net.{0,1,4}``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__(dim, depth, heads, dim_head, mlp_dim, dropout, final_norm=False, attention=ReAttention)


class DeepViT(ViTBody, VisionModel):
    """DeepViT with vit-pytorch's constructor: ``ViT``'s arguments, except that ``pool="mean"`` averages
    all tokens, CLS included (the CLS token is always there), as vit-pytorch does."""

    classifier_path = "mlp_head.1"
    intermediates_from = "transformer"

    transformer_class = Transformer

    def make_head(self, dim: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))

    def forward_features(self, img: Tensor) -> Tensor:
        """Tokens ``(b, 1 + n, dim)``, CLS first, not normed (the head norms the pooled token)."""
        return self.transformer(self.dropout(self.embed(img)))

    def pool_features(self, x: Tensor) -> Tensor:
        return self.mlp_head[0](self.to_latent(self.pool_tokens(x)))


_SMALL = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=4, dim_head=8, mlp_dim=64, num_classes=10)

# Widths after the paper's DeepViT-S / DeepViT-L (Table 6: 12 heads, MLP ratio 3); unlike the paper,
# which keeps plain attention in the first blocks, vit-pytorch uses re-attention in every block.
for _name, _kw in {
    "deepvit_small_patch16_224": dict(dim=396, depth=16, heads=12, dim_head=33, mlp_dim=1188),
    "deepvit_large_patch16_224": dict(dim=420, depth=32, heads=12, dim_head=35, mlp_dim=1260),
}.items():
    register_model(_name, DeepViT, vit_pytorch="vit_pytorch.deepvit:DeepViT", test_overrides=_SMALL,
                   description="DeepViT (re-attention in every block)",
                   image_size=224, patch_size=16, num_classes=1000, **_kw)
