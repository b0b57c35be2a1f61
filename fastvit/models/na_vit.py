"""NaViT: "Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution"
(Dehghani et al., arXiv 2307.06304).

vit-pytorch 1.26.x layout and numerics (``vit_pytorch.na_vit``): images of any size (sides divisible
by the patch) cut into patches, a LayerNorm -> Linear -> LayerNorm patch embedding, a factorised 2-D
position embedding (``pos_embed_height[row] + pos_embed_width[col]``), pre-norm blocks whose queries
and keys are RMS-normed per head (so the softmax scale is 1), LayerNorms without a bias, token
dropout in training, and attention pooling: one learned query per image over the image's tokens.

Deliberate differences from vit-pytorch:

- Every image of a call is packed into one sequence (``fastvit.attention.Packed``): no padding and
  no ``[b, 1, n, n]`` boolean mask, each image attending only to its own tokens. vit-pytorch packs
  images into groups, pads the groups and hands SDPA a dense mask, so its cost grows with the square
  of a group's length. The outputs are the same for the same list of images: ``group_images`` and
  ``group_max_seq_len`` are accepted (a flat list or a list of groups, one row of logits per image
  in order) and only checked, since the grouping changes nothing once each image is its own sequence.
- A ``(b, c, h, w)`` batch is accepted as ``b`` images of one size.
- Bad images raise ``ValueError`` up front (a wrong channel count, a side not divisible by the patch,
  an image larger than the position tables), naming the image.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastvit.attention import Packed
from fastvit.layers import (
    AttentionBase,
    BiasFreeLayerNorm,
    BlockRunner,
    HeadRMSNorm,
    Linear,
    merge_heads,
    mlp,
    pair,
    split_heads,
    split_qkv,
)
from fastvit.layers.packing import pack_images

from .base import VisionModel

__all__ = ["NaViT", "PackedTokens", "Attention", "Transformer", "group_images_by_max_seq_len", "LayerNorm", "RMSNorm"]

# vit-pytorch's names for the two norms (``from fastvit.na_vit import LayerNorm, RMSNorm``)
LayerNorm, RMSNorm = BiasFreeLayerNorm, HeadRMSNorm


class PackedTokens(NamedTuple):
    """``NaViT.forward_features``'s output: every image's tokens packed, and the layout.

    Attributes:
        tokens: ``(1, sum(lengths), dim)``, image after image (``fastvit.unpack(tokens, packed.lengths)``
            splits them).
        packed: the layout, one sequence per image.
    """

    tokens: Tensor
    packed: Packed


class Attention(AttentionBase):
    """NaViT's attention: bias-free LayerNorm on the queries' input, ``to_q`` and ``to_kv`` apart (no
    bias; keys and values from a ``context`` for the pooling), per-head RMS norms on q and k, scale 1,
    packed sequences. Keys ``norm``, ``q_norm``, ``k_norm``, ``to_q``, ``to_kv``, ``to_out.0``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__(attn_dropout=dropout)
        inner_dim = dim_head * heads
        self.heads = heads
        self.norm = BiasFreeLayerNorm(dim)
        self.q_norm = HeadRMSNorm(heads, dim_head)
        self.k_norm = HeadRMSNorm(heads, dim_head)
        self.to_q = Linear(dim, inner_dim, bias=False)
        self.to_kv = Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: Tensor, packed: Packed, context: Optional[Tensor] = None) -> Tensor:
        """``x (1, sum(lengths), dim)`` queries; ``context (1, sum(kv_lengths), dim)`` keys and values
        (None: ``x`` after the norm; a context is used as it is, as vit-pytorch does)."""
        x = self.norm(x)
        q = self.q_norm(split_heads(self.to_q(x), self.heads))  # (1, h, nq, d)
        k, v = split_qkv(self.to_kv(x if context is None else context), self.heads, parts=2)  # (1, h, nk, d)
        out = self.attend(q, self.k_norm(k), v, scale=1.0, packed=packed)
        return self.to_out(merge_heads(out))


class Transformer(BlockRunner, nn.Module):
    """``depth`` x (attention, MLP), each residual, then a bias-free LayerNorm. Keys ``layers.{i}.0``
    (attention), ``layers.{i}.1`` (the MLP as vit-pytorch's ``Sequential``), ``norm``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([
            Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
            mlp(dim, mlp_dim, dropout=dropout, norm_layer=BiasFreeLayerNorm),
        ]) for _ in range(depth))
        self.norm = BiasFreeLayerNorm(dim)

    def forward(self, x: Tensor, packed: Packed) -> Tensor:
        for attn, ff in self.layers:
            x = self.run_block(lambda x, attn=attn, ff=ff: _block(attn, ff, x, packed), x)
            self.tap(x)
        return self.norm(x)


def _block(attn: Attention, ff: nn.Module, x: Tensor, packed: Packed) -> Tensor:
    x = attn(x, packed) + x
    return ff(x) + x


def _patch_count(image: Tensor, patch_size: int) -> int:
    return (image.shape[-2] // patch_size) * (image.shape[-1] // patch_size)


def group_images_by_max_seq_len(images: Sequence[Tensor], patch_size: int,
                                calc_token_dropout: Optional[Callable] = None,
                                max_seq_len: int = 2048) -> List[List[Tensor]]:
    """vit-pytorch's grouping: consecutive images into groups of at most ``max_seq_len`` tokens
    (after token dropout). fastvit packs every image on its own, so it only checks the bound.

    Raises:
        ValueError: an image has more tokens than ``max_seq_len``.
    """
    groups, group, length = [], [], 0
    for i, image in enumerate(images):
        n = _patch_count(image, patch_size)
        if calc_token_dropout is not None:
            n = int(n * (1 - calc_token_dropout(*image.shape[-2:])))
        if n > max_seq_len:
            raise ValueError(f"image {i} of size {tuple(image.shape[-2:])} has {n} tokens, more than "
                             f"group_max_seq_len={max_seq_len}")
        if length + n > max_seq_len:
            groups.append(group)
            group, length = [], 0
        group.append(image)
        length += n
    if group:
        groups.append(group)
    return groups


class NaViT(VisionModel):
    """NaViT with vit-pytorch's constructor.

    Args:
        image_size: int or (h, w): the largest image (sizes the position tables).
        patch_size: the side of a square patch.
        num_classes: classifier width; 0 returns the pooled features ``(num_images, dim)``.
        dim, depth, heads, mlp_dim, dim_head: widths as in ``ViT``.
        channels: input channels. dropout: attention / MLP dropout. emb_dropout: after the embedding.
        token_dropout_prob: in training, the fraction of each image's tokens dropped at random: a
            float, or ``f(height, width) -> float``.
    """

    classifier_path = "mlp_head.1"
    intermediates_from = "transformer"

    def __init__(self, *, image_size, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
                 token_dropout_prob: Union[float, Callable, None] = None):
        super().__init__()
        image_height, image_width = pair(image_size)
        if image_height % patch_size or image_width % patch_size:
            raise ValueError(f"image_size {(image_height, image_width)} is not divisible by patch_size {patch_size}")
        if callable(token_dropout_prob):
            self.calc_token_dropout = token_dropout_prob
        elif isinstance(token_dropout_prob, (float, int)) and not isinstance(token_dropout_prob, bool):
            if not 0.0 <= token_dropout_prob < 1.0:
                raise ValueError(f"token_dropout_prob must be in [0, 1), got {token_dropout_prob}")
            prob = float(token_dropout_prob)
            self.calc_token_dropout = lambda height, width: prob
        elif token_dropout_prob is None:
            self.calc_token_dropout = None
        else:
            raise ValueError(f"token_dropout_prob must be a float, a callable or None, got {token_dropout_prob!r}")
        self.image_size = (image_height, image_width)
        self.channels, self.patch_size = channels, patch_size
        patch_dim = channels * patch_size ** 2
        self.to_patch_embedding = nn.Sequential(BiasFreeLayerNorm(patch_dim), Linear(patch_dim, dim),
                                                BiasFreeLayerNorm(dim))
        self.pos_embed_height = nn.Parameter(torch.randn(image_height // patch_size, dim))
        self.pos_embed_width = nn.Parameter(torch.randn(image_width // patch_size, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.attn_pool_queries = nn.Parameter(torch.randn(dim))
        self.attn_pool = Attention(dim, heads=heads, dim_head=dim_head)
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(BiasFreeLayerNorm(dim), Linear(dim, num_classes, bias=False))
        self.set_head(dim, num_classes)

    # -- the images of a call ---------------------------------------------------------------------------

    def _images(self, batched_images, group_images: bool, group_max_seq_len: int) -> list:
        """The images of a call in order: a ``(b, c, h, w)`` batch, a flat list, or a list of groups."""
        if isinstance(batched_images, Tensor):
            if batched_images.dim() != 4:
                raise ValueError(f"expected a (b, c, h, w) batch or a list of (c, h, w) images, got a tensor of "
                                 f"shape {tuple(batched_images.shape)}")
            images = list(batched_images.unbind(0))
        elif len(batched_images) and not isinstance(batched_images[0], Tensor):
            images = [img for group in batched_images for img in group]
        else:
            images = list(batched_images)
        if not images:
            raise ValueError("NaViT needs at least one image")
        max_h, max_w = self.image_size
        for i, img in enumerate(images):
            if isinstance(img, Tensor) and img.dim() == 3 and (img.shape[1] > max_h or img.shape[2] > max_w):
                raise ValueError(f"image {i} of size {tuple(img.shape[1:])} is larger than image_size "
                                 f"{self.image_size} (the position tables' extent)")
        if group_images:  # vit-pytorch's bound on a group; the packing ignores the groups
            group_images_by_max_seq_len(images, self.patch_size, self.calc_token_dropout if self.training else None,
                                        group_max_seq_len)
        return images

    def forward_features(self, batched_images, group_images: bool = False,
                         group_max_seq_len: int = 2048) -> PackedTokens:
        """The normed tokens of every image, packed: ``PackedTokens((1, sum(lengths), dim), packed)``."""
        images = self._images(batched_images, group_images, group_max_seq_len)
        patches, lengths, positions = pack_images(images, self.patch_size, self.channels)
        if self.calc_token_dropout is not None and self.training:
            patches, lengths, positions = self._drop_tokens(images, patches, lengths, positions)
        x = self.to_patch_embedding(patches)  # (total, dim)
        x = x + self.pos_embed_height[positions[:, 0]] + self.pos_embed_width[positions[:, 1]]
        packed = Packed(lengths)
        x = self.transformer(self.dropout(x).unsqueeze(0), packed)  # (1, total, dim)
        return PackedTokens(x, packed)

    def _drop_tokens(self, images, patches: Tensor, lengths: tuple, positions: Tensor) -> tuple:
        """Keep ``max(1, int(n * (1 - p)))`` random tokens of each image (vit-pytorch's draw: the top
        scores of one ``randn`` per image, in image order)."""
        keep, offset, kept = [], 0, []
        for img, n in zip(images, lengths):
            num_keep = max(1, int(n * (1 - self.calc_token_dropout(*img.shape[-2:]))))
            keep.append(torch.randn((n,), device=patches.device).topk(num_keep, dim=-1).indices + offset)
            kept.append(num_keep)
            offset += n
        index = torch.cat(keep)
        return patches[index], tuple(kept), positions[index]

    def pool_features(self, x: PackedTokens) -> Tensor:
        """Attention pooling: one learned query per image over its own tokens, then the head's norm:
        ``(num_images, dim)``."""
        tokens, packed = x
        n = packed.num_sequences
        queries = self.attn_pool_queries.expand(1, n, -1)  # (1, images, dim)
        pooled = self.attn_pool(queries, Packed([1] * n, packed.lengths), context=tokens) + queries
        return self.mlp_head[0](self.to_latent(pooled[0]))

    def forward(self, batched_images, group_images: bool = False, group_max_seq_len: int = 2048) -> Tensor:
        """Logits ``(num_images, num_classes)``, one row per image in the order given."""
        return self.forward_head(self.forward_features(batched_images, group_images, group_max_seq_len))

    def check_input(self, img) -> None:
        images = img.unbind(0) if isinstance(img, Tensor) and img.dim() == 4 else img
        if isinstance(images, (list, tuple)):
            for image in images:
                if isinstance(image, Tensor):
                    super().check_input(image)

    def forward_intermediates(self, x, *args, **kwargs):
        """Not served yet: NaViT's blocks see packed tokens of images of several sizes (use
        ``forward_features``: the packed tokens with their lengths)."""
        raise ValueError("NaViT.forward_intermediates is not supported: its blocks see the packed tokens of images "
                         "of several sizes; use forward_features (packed tokens with their lengths)")
