"""Patch and position embeddings, and the size checks every model shares."""

from __future__ import annotations

from typing import Optional, Union

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from .linear import Linear

__all__ = ["pair", "cast_tuple", "PatchEmbed", "check_image", "posemb_sincos_2d", "patch_grid", "crop_positions"]

IntOrPair = Union[int, tuple]


def pair(x: IntOrPair) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(224, 160)`` stays; anything else is a ValueError."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or an (h, w) pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def cast_tuple(value, length: int, name: str) -> tuple:
    """A per-stage setting: a tuple of ``length`` as given, or one value repeated; else a ValueError."""
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
