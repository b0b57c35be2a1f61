"""Images of any size as one packed sequence of patches (NaViT), and back.

    patches, lengths, positions = pack_images([img_a, img_b], patch_size=16)   # no padding
    tokens = model_body(patches)                                               # (total, dim)
    per_image = unpack(tokens, lengths)                                        # [(n_a, dim), (n_b, dim)]
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["pack_images", "unpack", "patch_positions"]


def patch_positions(grid_h: int, grid_w: int, device=None) -> Tensor:
    """``(grid_h * grid_w, 2)`` int64: the (row, column) of each patch in raster order."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.stack((rows, cols), dim=-1)


def pack_images(images: Union[Sequence[Tensor], Tensor], patch_size: int, channels: int = None
                ) -> tuple[Tensor, tuple[int, ...], Tensor]:
    """Cut each ``(c, h, w)`` image into ``patch_size`` patches and concatenate them all.

    Args:
        images: a list of ``(c, h, w)`` images of any sizes divisible by ``patch_size`` (or a
            ``(b, c, h, w)`` batch).
        patch_size: the side of a square patch.
        channels: the channel count every image must have (default: the first image's).

    Returns:
        ``(patches (total, c * p * p), lengths (patches per image), positions (total, 2))``: patches in
        raster order per image, each flattened as ``(c, p1, p2)`` (vit-pytorch's NaViT layout), and
        their (row, column) on the image's patch grid.

    Raises:
        ValueError: no images, an image that is not 3-D, a channel count that differs, or a side not
            divisible by ``patch_size``, naming the image's index and shape.
    """
    if len(images) == 0:
        raise ValueError("pack_images needs at least one image")
    p = patch_size
    channels = images[0].shape[0] if channels is None else channels
    patches, lengths, positions = [], [], []
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3:
            raise ValueError(f"image {i} must be a (c, h, w) tensor, got "
                             f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
        c, h, w = img.shape
        if c != channels:
            raise ValueError(f"image {i} has {c} channels, expected {channels} (shape {tuple(img.shape)})")
        if h % p or w % p:
            raise ValueError(f"image {i} of size {h}x{w} is not divisible by the patch size {p}")
        gh, gw = h // p, w // p
        # (c, gh, p1, gw, p2) -> (gh, gw, c, p1, p2) -> (gh * gw, c * p1 * p2)
        patches.append(img.view(c, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p))
        lengths.append(gh * gw)
        positions.append(patch_positions(gh, gw, img.device))
    return torch.cat(patches), tuple(lengths), torch.cat(positions)


def unpack(tokens: Tensor, lengths: Sequence[int]) -> list[Tensor]:
    """Split packed ``tokens`` (``(total, ...)``, or ``(1, total, ...)``) into one tensor per sequence
    (views, no copy).

    Raises:
        ValueError: the lengths do not sum to the token count.
    """
    lengths = [int(n) for n in lengths]
    if tokens.dim() >= 2 and tokens.shape[0] == 1 and tokens.shape[1] == sum(lengths) != 1:
        tokens = tokens[0]
    if tokens.shape[0] != sum(lengths):
        raise ValueError(f"lengths sum to {sum(lengths)} but there are {tokens.shape[0]} tokens "
                         f"(shape {tuple(tokens.shape)})")
    return list(tokens.split(lengths))
