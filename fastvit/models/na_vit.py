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
- A ``(b, c, h, w)`` batch is accepted as ``b`` images of one size, each its own sequence (vit-pytorch
  reads such a batch as one group of ``b`` images: the same outputs).
- ``num_classes=0`` returns the pooled features ``(num_images, dim)``; vit-pytorch keeps a
  ``Linear(dim, 0)`` that returns ``(num_images, 0)``, which ``legacy_num_classes_zero=True`` restores.
- ``forward_features`` returns ``PackedTokens`` (the packed tokens and their ``Packed`` layout) and
  ``forward_head`` takes it; ``forward_intermediates`` is refused (``intermediates_unsupported``).
- Bad images raise ``ValueError`` up front (a wrong channel count, a side not divisible by the patch,
  an image larger than the position tables), naming the image.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastvit.attention import KeyPaddingMask, Packed
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
from .registry import register_model

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


class _PaddedTokens(NamedTuple):
    """``forward(pack=False)``'s tokens: ``(images, longest, dim)`` and the mask of each row's real ones."""

    tokens: Tensor
    mask: KeyPaddingMask


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

    def forward(self, x: Tensor, packed: Union[Packed, KeyPaddingMask], context: Optional[Tensor] = None) -> Tensor:
        """``x (1, sum(lengths), dim)`` queries; ``context (1, sum(kv_lengths), dim)`` keys and values
        (None: ``x`` after the norm; a context is used as it is, as vit-pytorch does). With a
        ``KeyPaddingMask`` instead of a ``Packed`` layout the call is padded: ``x (b, n, dim)``, a row
        per image, and the mask marks each row's real keys (``NaViT.forward(pack=False)``)."""
        x = self.norm(x)
        q = self.q_norm(split_heads(self.to_q(x), self.heads))  # (b, h, nq, d)
        k, v = split_qkv(self.to_kv(x if context is None else context), self.heads, parts=2)  # (b, h, nk, d)
        # The per-head norms' fp32 gammas promote q and k under autocast; attend needs one dtype
        # (vit-pytorch's SDPA call casts them to autocast's dtype itself).
        layout = dict(bias=packed) if isinstance(packed, KeyPaddingMask) else dict(packed=packed)
        out = self.attend(q.to(v.dtype), self.k_norm(k).to(v.dtype), v, scale=1.0, **layout)
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

    def forward(self, x: Tensor, packed: Union[Packed, KeyPaddingMask]) -> Tensor:
        for attn, ff in self.layers:
            x = self.run_block(lambda x, attn=attn, ff=ff: _block(attn, ff, x, packed), x)
            self.tap(x)
        return self.norm(x)


def _block(attn: Attention, ff: nn.Module, x: Tensor, packed: Union[Packed, KeyPaddingMask]) -> Tensor:
    x = attn(x, packed) + x
    return ff(x) + x


def _padded_rows(packed: Packed, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(rows, keep)``: each real token's flat index in an ``(images, longest)`` padded grid, and the
    grid's mask of real tokens (cached per layout and device)."""
    def build():
        doc, _ = packed.document_ids(device)
        starts = torch.tensor(packed.offsets[:-1], device=device)
        position = torch.arange(packed.total, device=device) - starts[doc.long()]
        rows = doc.long() * packed.max_len + position
        keep = torch.zeros(packed.num_sequences * packed.max_len, dtype=torch.bool, device=device)
        return rows, keep.index_fill(0, rows, True).view(packed.num_sequences, packed.max_len)

    return packed.cached("navit_padded_rows", device, build)


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
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.

    ``forward`` takes a list of ``(c, h, w)`` images of any sizes, a list of such lists (vit-pytorch's
    groups), or a ``(b, c, h, w)`` batch (``b`` images of one size); every image is its own sequence.
    ``pack=False`` runs the same computation padded instead, each image a row of a batch padded to
    the longest with a ``KeyPaddingMask`` (the baseline packing is measured against: ``fastvit bench
    --packed``); its outputs equal the packed ones within fp32 rounding.
    """

    classifier_path = "mlp_head.1"
    # Why forward_intermediates refuses (a model without this attribute serves it; the registry
    # tests check the refusal for the models that declare one).
    intermediates_unsupported = ("its blocks see the packed tokens of images of several sizes (and, in training, "
                                 "of token dropout), not a (b, n, dim) grid; use forward_features (the packed "
                                 "tokens with their lengths)")

    def __init__(self, *, image_size, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
                 token_dropout_prob: Union[float, Callable, None] = None, legacy_num_classes_zero: bool = False):
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
        self.set_head(dim, num_classes, legacy_num_classes_zero)

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

    def forward_features(self, batched_images, group_images: bool = False, group_max_seq_len: int = 2048,
                         pack: bool = True) -> PackedTokens:
        """The normed tokens of every image, packed: ``PackedTokens((1, sum(lengths), dim), packed)``,
        image after image in the order given (``forward_head`` takes it). ``pack=False``: computed
        padded (see the class docstring), returned packed all the same."""
        tokens, packed, rows = self._features(batched_images, group_images, group_max_seq_len, pack)
        if rows is not None:  # padded: the real rows, image after image
            tokens = tokens.flatten(0, 1)[rows].unsqueeze(0)
        return PackedTokens(tokens, packed)

    def _features(self, batched_images, group_images: bool, group_max_seq_len: int, pack: bool) -> tuple:
        """``(tokens, packed, rows)``: packed ``(1, total, dim)`` and ``rows`` None, or with ``pack=False``
        padded ``(images, longest, dim)`` and ``rows`` the flat index of every real token in it."""
        images = self._images(batched_images, group_images, group_max_seq_len)
        patches, lengths, positions = pack_images(images, self.patch_size, self.channels)
        lengths = tuple(int(n) for n in lengths)  # host ints (a trace records image sides as tensors)
        if self.calc_token_dropout is not None and self.training:
            patches, lengths, positions = self._drop_tokens(images, patches, lengths, positions)
        x = self.to_patch_embedding(patches)  # (total, dim)
        x = x + self.pos_embed_height[positions[:, 0]] + self.pos_embed_width[positions[:, 1]]
        packed = Packed(lengths)
        x = self.dropout(x)
        if pack:
            return self.transformer(x.unsqueeze(0), packed), packed, None  # (1, total, dim)
        rows, keep = _padded_rows(packed, x.device)
        padded = x.new_zeros((keep.numel(), x.shape[-1])).index_copy(0, rows, x).unflatten(0, keep.shape)
        return self.transformer(padded, KeyPaddingMask(keep)), packed, rows  # (images, longest, dim)

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
        if isinstance(x, _PaddedTokens):  # forward(pack=False): a padded row per image
            queries = self.attn_pool_queries.expand(x.tokens.shape[0], 1, -1)  # (images, 1, dim)
            pooled = self.attn_pool(queries, x.mask, context=x.tokens) + queries
            return self.mlp_head[0](self.to_latent(pooled[:, 0]))
        tokens, packed = x
        n = packed.num_sequences
        queries = self.attn_pool_queries.expand(1, n, -1)  # (1, images, dim)
        pooled = self.attn_pool(queries, Packed([1] * n, packed.lengths), context=tokens) + queries
        return self.mlp_head[0](self.to_latent(pooled[0]))

    def forward(self, batched_images, group_images: bool = False, group_max_seq_len: int = 2048,
                pack: bool = True) -> Tensor:
        """Logits ``(num_images, num_classes)``, one row per image in the order given (``pack=False``:
        computed padded, see the class docstring)."""
        if pack:
            return self.forward_head(self.forward_features(batched_images, group_images, group_max_seq_len))
        tokens, packed, _ = self._features(batched_images, group_images, group_max_seq_len, pack=False)
        return self.forward_head(_PaddedTokens(tokens, KeyPaddingMask(_padded_rows(packed, tokens.device)[1])))

    def check_input(self, img) -> None:
        images = img.unbind(0) if isinstance(img, Tensor) and img.dim() == 4 else img
        if isinstance(images, (list, tuple)):
            for image in images:
                if isinstance(image, Tensor):
                    super().check_input(image)

    def forward_intermediates(self, x, *args, **kwargs):
        """Refused with ``intermediates_unsupported`` as the reason (after the input checks)."""
        self.check_input(x)
        raise ValueError(f"NaViT.forward_intermediates is not supported: {self.intermediates_unsupported}")


# Small enough for CPU tests: 32 x 32 inputs of 16 patches each.
_SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)

for _name, _kw in {
    # ViT-Ti / ViT-S / ViT-B widths; image_size is the largest image (any smaller one, any aspect ratio, fits).
    "navit_tiny_patch16_256": dict(patch_size=16, dim=192, heads=3, mlp_dim=768),
    "navit_small_patch16_256": dict(patch_size=16, dim=384, heads=6, mlp_dim=1536),
    "navit_base_patch16_256": dict(patch_size=16, dim=768, heads=12, mlp_dim=3072),
    "navit_base_patch32_256": dict(patch_size=32, dim=768, heads=12, mlp_dim=3072),
}.items():
    register_model(_name, NaViT, vit_pytorch="vit_pytorch.na_vit:NaViT", test_overrides=_SMALL,
                   input_size=(3, 256, 256), image_size=256, num_classes=1000, depth=12, **_kw)
