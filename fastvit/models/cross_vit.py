"""CrossViT: "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification"
(Chen, Fan, Panda, arXiv 2103.14899).

Two ViT branches see the image at two patch sizes (small patches: many tokens, narrow; large
patches: few tokens, wide). After each branch's encoder, the CLS token of each branch is projected
into the other branch's width and attends over that branch's patch tokens plus itself
(``kv_include_self``): a one-query cross attention (``Nq = 1``). The logits are the sum of the two
branches' heads.

vit-pytorch 1.26.x layout and numerics: per-branch dual-patchnorm embedding with 3-D
``pos_embedding (1, N + 1, dim)`` / ``cls_token (1, 1, dim)``, attention with separate ``to_q`` and
``to_kv`` projections, every branch encoder ending in its own LayerNorm, vit-pytorch's **non-zero
dropout defaults** (``dropout=0.1, emb_dropout=0.1``), ``channels``.

Deliberate differences from vit-pytorch:

- ``image_size`` and both patch sizes accept ``(h, w)`` pairs (vit-pytorch: int only).
- Images smaller than ``image_size`` take the positions of the top-left crop of each branch's 2-D
  position grid. vit-pytorch slices the flat table (``pos_embedding[:, :n + 1]``), which gives a
  non-square or narrower image the positions of the wrong grid cells. Same-size inputs are
  unaffected; ``legacy_pos_slicing=True`` restores vit-pytorch's behaviour.
- Wrong channel counts, too-large images and images not divisible by both patch sizes raise a
  ``ValueError`` up front (vit-pytorch fails inside einops or silently mis-slices).
- ``num_classes=0`` returns the two normed CLS tokens concatenated, ``(b, sm_dim + lg_dim)`` (timm's
  CrossViT ``pre_logits``; both heads' Linears are ``nn.Identity``); vit-pytorch's ``Linear(dim, 0)``
  heads return ``(b, 0)``: ``legacy_num_classes_zero=True``.

``forward_intermediates`` gives the small-patch branch's tokens after each multi-scale block (the
finer of the two grids); the large branch's are in ``forward_features``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastvit.layers import BlockRunner, ContextAttention, FeedForward, Linear, ResidualBlocks, ViTStem, pair

from .base import VisionModel
from .registry import register_model

__all__ = ["CrossViT", "Attention", "Transformer", "CrossTransformer", "MultiScaleEncoder", "ImageEmbedder"]


Attention = ContextAttention  # vit-pytorch's cross_vit.Attention: to_q / to_kv apart, optional context


class Transformer(ResidualBlocks):
    """A branch encoder: ``depth`` x (attention + MLP, residual), then its own LayerNorm (registered after
    the layers, as in vit-pytorch)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__([(Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                           FeedForward(dim, mlp_dim, dropout=dropout)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)


class ProjectInOut(nn.Module):
    """Run ``fn`` in another width: Linear in, ``fn``, Linear out (identities when the widths agree)."""

    def __init__(self, dim_in: int, dim_out: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        need_projection = dim_in != dim_out
        self.project_in = Linear(dim_in, dim_out) if need_projection else nn.Identity()
        self.project_out = Linear(dim_out, dim_in) if need_projection else nn.Identity()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.project_out(self.fn(self.project_in(x), *args, **kwargs))


class CrossTransformer(nn.Module):
    """``depth`` rounds of: small CLS attends over large patches, large CLS over small patches."""

    def __init__(self, sm_dim: int, lg_dim: int, depth: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                ProjectInOut(sm_dim, lg_dim, Attention(lg_dim, heads, dim_head, dropout)),
                ProjectInOut(lg_dim, sm_dim, Attention(sm_dim, heads, dim_head, dropout)),
            ]))

    def forward(self, sm_tokens: Tensor, lg_tokens: Tensor) -> tuple[Tensor, Tensor]:
        sm_cls, sm_patch_tokens = sm_tokens[:, :1], sm_tokens[:, 1:]  # (b, 1, sm_dim), (b, n_sm, sm_dim)
        lg_cls, lg_patch_tokens = lg_tokens[:, :1], lg_tokens[:, 1:]
        for sm_attend_lg, lg_attend_sm in self.layers:
            sm_cls = sm_attend_lg(sm_cls, context=lg_patch_tokens, kv_include_self=True) + sm_cls
            lg_cls = lg_attend_sm(lg_cls, context=sm_patch_tokens, kv_include_self=True) + lg_cls
        return torch.cat((sm_cls, sm_patch_tokens), dim=1), torch.cat((lg_cls, lg_patch_tokens), dim=1)


class MultiScaleEncoder(BlockRunner, nn.Module):
    """``depth`` x (small encoder, large encoder, cross attention); the small branch's tokens after each
    go to ``tap``."""

    def __init__(self, *, depth: int, sm_dim: int, lg_dim: int, sm_enc_params: dict, lg_enc_params: dict,
                 cross_attn_heads: int, cross_attn_depth: int, cross_attn_dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                Transformer(dim=sm_dim, dropout=dropout, **sm_enc_params),
                Transformer(dim=lg_dim, dropout=dropout, **lg_enc_params),
                CrossTransformer(sm_dim=sm_dim, lg_dim=lg_dim, depth=cross_attn_depth, heads=cross_attn_heads,
                                 dim_head=cross_attn_dim_head, dropout=dropout),
            ]))

    def forward(self, sm_tokens: Tensor, lg_tokens: Tensor) -> tuple[Tensor, Tensor]:
        for sm_enc, lg_enc, cross_attend in self.layers:
            sm_tokens, lg_tokens = sm_enc(sm_tokens), lg_enc(lg_tokens)
            sm_tokens, lg_tokens = cross_attend(sm_tokens, lg_tokens)
            self.tap(sm_tokens)
        return sm_tokens, lg_tokens


class ImageEmbedder(ViTStem, nn.Module):
    """Patches -> tokens, a CLS token, positions, dropout. Keys ``to_patch_embedding.{1,2,3}``,
    ``pos_embedding (1, N + 1, dim)``, ``cls_token (1, 1, dim)``."""

    def __init__(self, *, dim: int, image_size, patch_size, dropout: float = 0.0, channels: int = 3,
                 legacy_pos_slicing: bool = False):
        super().__init__()
        self.build_stem(image_size=image_size, patch_size=patch_size, channels=channels, dim=dim, emb_dropout=dropout,
                        legacy_pos_slicing=legacy_pos_slicing)

    def forward(self, img: Tensor) -> Tensor:
        """Checks the image; ``(b, 1 + n, dim)`` tokens after the embedding dropout."""
        return self.dropout(self.embed(img))


class CrossViT(VisionModel):
    """CrossViT with vit-pytorch's constructor (plus ``legacy_pos_slicing``).

    Args:
        image_size: int or (h, w); the largest input size, divisible by both patch sizes.
        num_classes: width of both heads (their logits are summed).
        sm_dim, lg_dim: token widths of the small-patch and large-patch branches.
        sm_patch_size, lg_patch_size: int or (ph, pw) patch sizes of the two branches.
        sm_enc_depth, sm_enc_heads, sm_enc_mlp_dim, sm_enc_dim_head: the small branch's encoder.
        lg_enc_depth, lg_enc_heads, lg_enc_mlp_dim, lg_enc_dim_head: the large branch's encoder.
        cross_attn_depth, cross_attn_heads, cross_attn_dim_head: CLS cross attention rounds per block.
        depth: number of multi-scale blocks (both encoders + cross attention).
        dropout: attention/MLP dropout (vit-pytorch default 0.1). emb_dropout: after the positions (0.1).
        channels: input channels.
        legacy_pos_slicing: slice the flat position tables for smaller inputs, as vit-pytorch does.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)`` heads.
    """

    classifier_path = ("sm_mlp_head.1", "lg_mlp_head.1")
    intermediates_from = "multi_scale_encoder"
    num_prefix_tokens = 1

    def __init__(self, *, image_size, num_classes, sm_dim, lg_dim,
                 sm_patch_size=12, sm_enc_depth=1, sm_enc_heads=8, sm_enc_mlp_dim=2048, sm_enc_dim_head=64,
                 lg_patch_size=16, lg_enc_depth=4, lg_enc_heads=8, lg_enc_mlp_dim=2048, lg_enc_dim_head=64,
                 cross_attn_depth=2, cross_attn_heads=8, cross_attn_dim_head=64,
                 depth=3, dropout=0.1, emb_dropout=0.1, channels=3, legacy_pos_slicing=False,
                 legacy_num_classes_zero=False):
        super().__init__()
        self.image_size = pair(image_size)
        self.channels = channels
        self.sm_image_embedder = ImageEmbedder(dim=sm_dim, channels=channels, image_size=image_size,
                                               patch_size=sm_patch_size, dropout=emb_dropout,
                                               legacy_pos_slicing=legacy_pos_slicing)
        self.lg_image_embedder = ImageEmbedder(dim=lg_dim, channels=channels, image_size=image_size,
                                               patch_size=lg_patch_size, dropout=emb_dropout,
                                               legacy_pos_slicing=legacy_pos_slicing)
        self.multi_scale_encoder = MultiScaleEncoder(
            depth=depth, sm_dim=sm_dim, lg_dim=lg_dim, cross_attn_heads=cross_attn_heads,
            cross_attn_dim_head=cross_attn_dim_head, cross_attn_depth=cross_attn_depth,
            sm_enc_params=dict(depth=sm_enc_depth, heads=sm_enc_heads, mlp_dim=sm_enc_mlp_dim,
                               dim_head=sm_enc_dim_head),
            lg_enc_params=dict(depth=lg_enc_depth, heads=lg_enc_heads, mlp_dim=lg_enc_mlp_dim,
                               dim_head=lg_enc_dim_head),
            dropout=dropout,
        )
        self.sm_mlp_head = nn.Sequential(nn.LayerNorm(sm_dim), Linear(sm_dim, num_classes))
        self.lg_mlp_head = nn.Sequential(nn.LayerNorm(lg_dim), Linear(lg_dim, num_classes))
        self.set_head(sm_dim + lg_dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info([sm_dim] * depth, [pair(sm_patch_size)[0]] * depth, "multi_scale_encoder.layers")

    @property
    def legacy_pos_slicing(self) -> bool:
        return self.sm_image_embedder.legacy_pos_slicing

    @legacy_pos_slicing.setter
    def legacy_pos_slicing(self, value: bool) -> None:
        self.sm_image_embedder.legacy_pos_slicing = self.lg_image_embedder.legacy_pos_slicing = value

    def forward_features(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """``(sm_tokens (b, 1 + n_sm, sm_dim), lg_tokens (b, 1 + n_lg, lg_dim))``, CLS first."""
        sm_tokens = self.sm_image_embedder(img)
        lg_tokens = self.lg_image_embedder(img)
        return self.multi_scale_encoder(sm_tokens, lg_tokens)

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        return self.sm_image_embedder.token_grid(h, w)  # the intermediates' branch

    def pool_features(self, x: tuple[Tensor, Tensor]) -> Tensor:
        """The two normed CLS tokens, concatenated: ``(b, sm_dim + lg_dim)``."""
        sm_tokens, lg_tokens = x
        return torch.cat((self.sm_mlp_head[0](sm_tokens[:, 0]), self.lg_mlp_head[0](lg_tokens[:, 0])), dim=-1)

    def classify(self, x: Tensor) -> Tensor:
        """The sum of the two branches' logits."""
        sm_head, lg_head = self.get_classifier()
        sm_cls, lg_cls = x.split([self.classifier_widths[p] for p in self.classifier_path], dim=-1)
        return sm_head(sm_cls) + lg_head(lg_cls)


# Paper configs (Table 1): K=3 multi-scale blocks, N=1 small / M=4 large encoder layers, L=1 cross
# attention, MLP ratio 4, head width dim/heads (32 for the small branch, 64 for the large one).
_SMALL = dict(image_size=32, num_classes=10, depth=1,
              sm_dim=32, sm_patch_size=8, sm_enc_depth=1, sm_enc_heads=2, sm_enc_mlp_dim=64,
              sm_enc_dim_head=16,
              lg_dim=48, lg_patch_size=16, lg_enc_depth=1, lg_enc_heads=2, lg_enc_mlp_dim=64,
              lg_enc_dim_head=16,
              cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=16)

for _name, (_sm_dim, _lg_dim, _heads) in {
    "crossvit_tiny_240": (96, 192, 3),
    "crossvit_small_240": (192, 384, 6),
    "crossvit_base_240": (384, 768, 12),
}.items():
    register_model(_name, CrossViT, vit_pytorch="vit_pytorch.cross_vit:CrossViT", timm=_name, test_overrides=_SMALL,
                   input_size=(3, 240, 240), pretrained_cfg=dict(crop_pct=0.875), image_size=240, num_classes=1000,
                   depth=3,
                   sm_dim=_sm_dim, sm_patch_size=12, sm_enc_depth=1, sm_enc_heads=_heads,
                   sm_enc_mlp_dim=4 * _sm_dim, sm_enc_dim_head=_sm_dim // _heads,
                   lg_dim=_lg_dim, lg_patch_size=16, lg_enc_depth=4, lg_enc_heads=_heads,
                   lg_enc_mlp_dim=4 * _lg_dim, lg_enc_dim_head=_lg_dim // _heads,
                   cross_attn_depth=1, cross_attn_heads=_heads, cross_attn_dim_head=_lg_dim // _heads)
