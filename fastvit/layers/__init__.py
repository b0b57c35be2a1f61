"""Modules the models share. They build attention inputs and call ``attend()``."""

from .attention import Attention, AttentionBase, merge_heads, split_heads
from .embed import PatchEmbed, cast_tuple, check_image, crop_positions, pair, patch_grid, posemb_sincos_2d
from .linear import Linear
from .mlp import FeedForward
from .transformer import Transformer

__all__ = [
    "Attention", "AttentionBase", "merge_heads", "split_heads",
    "PatchEmbed", "cast_tuple", "check_image", "crop_positions", "pair", "patch_grid", "posemb_sincos_2d",
    "FeedForward", "Transformer", "Linear",
]
