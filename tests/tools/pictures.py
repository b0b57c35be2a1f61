"""What the picture tests check on every PNG they make: its pixel size, and that it shows something."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def assert_picture(path, size: tuple | None = None, min_colours: int = 16) -> np.ndarray:
    """``path`` is a PNG of ``size = (width, height)`` (when given) that is not blank: its pixels vary
    (std > 0) and it has at least ``min_colours`` distinct colours. Returns its RGB pixels."""
    assert os.path.isfile(path), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG", f"{path} is a {img.format}, not a PNG"
        if size is not None:
            assert img.size == tuple(size), f"{path}: {img.size[0]}x{img.size[1]} px, expected {size[0]}x{size[1]}"
        pixels = np.asarray(img.convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.std() > 0 and colours >= min_colours, f"{path} looks blank: std {pixels.std():.3g}, {colours} colours"
    return pixels
