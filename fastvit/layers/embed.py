"""Patch and position embeddings, the size checks every model shares, and the ViT stem.

``ViTStem`` is the start of every ViT-like model (ViT, DeepViT, CaiT, ATS-ViT, the pluggable ViT,
CrossViT's branches, PiT, T2T-ViT): a patch embedding, CLS token(s) and a learned position table,
with the image check and the position crop for smaller inputs. It is a mixin that sets its modules on
the model itself, so the checkpoint keys stay vit-pytorch's (``to_patch_embedding``,
``pos_embedding``, ``cls_token``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from ..runtime import tracing
from .linear import Linear

__all__ = ["pair", "cast_tuple", "PatchEmbed", "ViTStem", "ViTBody", "check_image", "posemb_sincos_2d",
           "patch_grid", "crop_positions"]

IntOrPair = Union[int, tuple]


def pair(x: IntOrPair) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(224, 160)`` stays; anything else is a ValueError."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or an (h, w) pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def cast_tuple(value, length: int, name: str, pad: bool = False) -> tuple:
    """A per-stage setting: a tuple of ``length`` as given, or one value repeated; else a ValueError.

    With ``pad`` a shorter tuple (or list) is padded with its last value (LeViT: ``(1, 2) -> (1, 2, 2)``)
    and only a longer one is an error.
    """
    if pad:
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        out = (*value, *((value[-1],) * max(length - len(value), 0)))
        if len(out) != length:
            raise ValueError(f"{name} {value} has more entries than stages={length}")
        return out
    out = value if isinstance(value, tuple) else (value,) * length
    if len(out) != length:
        raise ValueError(f"{name} must be a single value or a tuple of length {length}, got {value!r}")
    return out


def patch_grid(image_size: IntOrPair, patch_size: IntOrPair) -> tuple[int, int]:
    """Number of patches along (h, w); raises if the image is not divisible by the patch."""
    (ih, iw), (ph, pw) = pair(image_size), pair(patch_size)
    if ih % ph or iw % pw:
        raise ValueError(f"image size {(ih, iw)} must be divisible by the patch size {(ph, pw)}")
    return ih // ph, iw // pw


def check_image(img: Tensor, *, channels: int, max_size: Optional[IntOrPair], patch_size: IntOrPair = 1,
                allow_smaller: bool = True) -> None:
    """Fail early and clearly on the wrong channel count, size or divisibility (``max_size=None``: any size,
    for fully convolutional models)."""
    if not isinstance(img, Tensor) or img.dim() != 4:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"expected an image batch (b, c, h, w), got {shape}")
    _, c, h, w = img.shape
    if c != channels:
        raise ValueError(f"expected {channels} channels, got {c} (image shape {tuple(img.shape)})")
    ph, pw = pair(patch_size)
    if h % ph or w % pw:
        raise ValueError(f"image size {(h, w)} is not divisible by the patch size {(ph, pw)}")
    if max_size is None:
        return
    mh, mw = pair(max_size)
    too_big = h > mh or w > mw
    if too_big or (not allow_smaller and (h, w) != (mh, mw)):
        want = f"at most {(mh, mw)}" if allow_smaller else f"exactly {(mh, mw)}"
        raise ValueError(f"image size {(h, w)} does not fit the model: expected {want}")


class PatchEmbed(nn.Sequential):
    """vit-pytorch's dual-patchnorm embedding: ``Rearrange -> LayerNorm -> Linear -> LayerNorm``.

    Patches are flattened channel-last, ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``, as in
    vit-pytorch (timm's conv stem flattens ``(c p1 p2)``). Keys ``1``, ``2``, ``3``.
    """

    def __init__(self, patch_size: IntOrPair, channels: int, dim: int, norms: bool = True):
        ph, pw = pair(patch_size)
        patch_dim = channels * ph * pw
        super().__init__(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw),
            nn.LayerNorm(patch_dim) if norms else nn.Identity(),
            Linear(patch_dim, dim),
            nn.LayerNorm(dim) if norms else nn.Identity(),
        )


class ViTStem:
    """Mixin for an ``nn.Module``: patch embedding, CLS token(s), positions (vit-pytorch's keys).

    Call ``build_stem`` in ``__init__``; ``embed(img)`` then checks the image and returns
    ``(b, num_cls + n, dim)`` tokens with their positions, before ``self.dropout`` (the embedding
    dropout, which the model applies where vit-pytorch does).
    """

    def build_stem(self, *, image_size, patch_size: Optional[IntOrPair], channels: int, dim: int,
                   num_cls_tokens: int = 1, cls_in_positions: bool = True, flat: bool = False,
                   emb_dropout: float = 0.0, legacy_pos_slicing: bool = False,
                   patch_embedding: Optional[nn.Module] = None, grid: Optional[tuple] = None,
                   pool: Optional[str] = None) -> None:
        """Set the stem's modules and sizes on the model.

        Args:
            image_size: int or (h, w); the largest input.
            patch_size: int or (ph, pw), which the image sides must divide (None: any size, T2T).
            channels: input channels. dim: token width.
            num_cls_tokens: CLS tokens (ViT with ``pool='mean'``: 0).
            cls_in_positions: the position table has rows for the CLS tokens (CaiT's has not, and its
                CLS token joins later: ``embed`` then returns the patches alone).
            flat: vit-pytorch's ViT layout, ``cls_token (num_cls, dim)`` and ``pos_embedding
                (num_cls + N, dim)``, created in that order; otherwise ``pos_embedding (1, [1 +] N, dim)``
                then ``cls_token (1, 1, dim)``.
            emb_dropout: rate of ``self.dropout``.
            legacy_pos_slicing: smaller inputs slice the flat position table, as vit-pytorch does,
                instead of taking the top-left crop of the 2-D grid.
            patch_embedding: replaces the dual-patchnorm ``PatchEmbed`` (PiT's unfold, T2T's soft splits).
            grid: the token grid of an ``image_size`` input (default: image over patch size); models with
                another grid override ``token_grid`` too.
            pool: ``"cls"`` or ``"mean"`` for ``pool_tokens`` (checked; None: the model pools itself).
        """
        if pool is not None and pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.image_size = pair(image_size)
        self.patch_size = None if patch_size is None else pair(patch_size)
        self.grid = patch_grid(image_size, patch_size) if grid is None else tuple(grid)
        self.channels = channels
        self.dim = dim
        self.legacy_pos_slicing = legacy_pos_slicing
        self.num_cls_tokens = num_cls_tokens
        self.cls_in_positions = cls_in_positions
        self.pos_prefix = num_cls_tokens if cls_in_positions else 0  # rows before the grid in pos_embedding
        self.num_prefix_tokens = self.pos_prefix  # timm's name: tokens before the grid in a block's output
        num_positions = self.pos_prefix + self.grid[0] * self.grid[1]
        self.to_patch_embedding = PatchEmbed(self.patch_size, channels, dim) if patch_embedding is None else \
            patch_embedding
        if flat:
            self.cls_token = nn.Parameter(torch.randn(num_cls_tokens, dim))
            self.pos_embedding = nn.Parameter(torch.randn(num_positions, dim))
        else:
            self.pos_embedding = nn.Parameter(torch.randn(1, num_positions, dim))
            self.cls_token = nn.Parameter(torch.randn(1, num_cls_tokens, dim))
        self.dropout = nn.Dropout(emb_dropout)

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h, w)`` token grid of an ``h x w`` image (patches; PiT and T2T override it)."""
        return h // self.patch_size[0], w // self.patch_size[1]

    def position_embedding(self, h: int, w: int) -> Tensor:
        """Positions for an ``h x w`` token grid: ``([1,] pos_prefix + h*w, dim)``."""
        return crop_positions(self.pos_embedding, self.grid, h, w, num_prefix=self.pos_prefix,
                              legacy=self.legacy_pos_slicing)

    def embed(self, img: Tensor) -> Tensor:
        """Image check, patch embedding, CLS token(s) and positions: ``(b, num_cls + n, dim)``."""
        check_image(img, channels=self.channels, max_size=self.image_size, patch_size=self.patch_size or 1)
        pos = self.position_embedding(*self.token_grid(img.shape[-2], img.shape[-1]))
        x = self.to_patch_embedding(img)  # (b, n, dim)
        if not self.cls_in_positions:  # CaiT: the CLS token joins later, without a position
            return x + pos
        if self.num_cls_tokens == 0 and tracing():
            # pool='mean' while traced or exported: no zero-length concat (legacy ONNX export mis-sizes it).
            # Eager keeps the concat so the empty cls_token gets its (empty) gradient, as in vit-pytorch.
            return x + pos
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)  # (b, num_cls, dim)
        return torch.cat((cls_tokens, x), dim=1) + pos

    def pool_tokens(self, x: Tensor) -> Tensor:
        """``(b, n, dim) -> (b, dim)``: the mean over all tokens (CLS included, if any), or the first token."""
        return x.mean(dim=1) if self.pool == "mean" else x[:, 0]


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0, dtype=torch.float32) -> Tensor:
    """2-D sin-cos position embedding ``(h*w, dim)`` (SimpleViT / Big Vision)."""
    if dim % 4:
        raise ValueError(f"feature dimension must be a multiple of 4 for sincos embedding, got {dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = torch.arange(dim // 4) / (dim // 4 - 1)
    omega = 1.0 / (temperature ** omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    pe = torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1)
    return pe.type(dtype)


def crop_positions(pos: Tensor, grid: tuple, h: int, w: int, *, num_prefix: int = 1, legacy: bool = False) -> Tensor:
    """Positions for an ``h x w`` token grid out of a table laid out for ``grid``.

    Args:
        pos: ``(..., num_prefix + gh * gw, dim)``: prefix tokens (CLS) first, then the grid row-major.
        grid: ``(gh, gw)`` the table was made for.
        h, w: the (smaller) grid of the input.
        num_prefix: tokens before the grid (1 for a CLS slot, 0 for none).
        legacy: slice the flat table as vit-pytorch does (token ``(r, c)`` then gets the position of
            flat index ``r * w + c``, the wrong cell whenever ``w < gw``).

    Returns:
        ``(..., num_prefix + h * w, dim)``: the top-left ``h x w`` crop of the 2-D grid.
    """
    if (h, w) == tuple(grid) or legacy:
        return pos[..., : num_prefix + h * w, :]
    patches = pos[..., num_prefix:, :].unflatten(-2, tuple(grid))[..., :h, :w, :]  # (..., h, w, dim)
    return torch.cat((pos[..., :num_prefix, :], patches.flatten(-3, -2)), dim=-2)


class ViTBody(ViTStem):
    """vit-pytorch's ViT constructor and layout on the stem, for the models that share them (ViT,
    DeepViT): ``transformer`` (blocks in ``transformer.layers``), ``to_latent`` (an identity) and
    ``mlp_head``, then the model's head and feature info (``VisionModel.set_head`` /
    ``set_feature_info``). A subclass says what differs: ``transformer_class`` (built as
    ``(dim, depth, heads, dim_head, mlp_dim, dropout)``), ``make_head`` and ``stem_options``."""

    transformer_class: type = None

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool="cls",
                 channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0, legacy_pos_slicing=False,
                 legacy_num_classes_zero=False):
        super().__init__()
        self.build_stem(image_size=image_size, patch_size=patch_size, channels=channels, dim=dim, pool=pool,
                        emb_dropout=emb_dropout, legacy_pos_slicing=legacy_pos_slicing, **self.stem_options(pool))
        self.transformer = self.transformer_class(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.to_latent = nn.Identity()
        self.mlp_head = self.make_head(dim, num_classes)
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info([dim] * depth, [self.patch_size[0]] * depth, "transformer.layers")

    def stem_options(self, pool: str) -> dict:
        """Extra ``build_stem`` keywords (CLS tokens, the flat table layout)."""
        return {}

    def make_head(self, dim: int, num_classes: int) -> Optional[nn.Module]:
        """``mlp_head``."""
        return Linear(dim, num_classes)
