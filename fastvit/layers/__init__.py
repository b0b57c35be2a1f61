"""The vocabulary every model speaks: stems, attention kinds, MLPs, conv blocks, token helpers.

Model files import their building blocks from here and from nowhere else (never from another model).
"""

from .attention import (
    Attention,
    AttentionBase,
    ContextAttention,
    ReAttention,
    TalkingHeadsAttention,
    merge_heads,
    split_heads,
    split_qkv,
)
from .checkpoint import BlockRunner
from .conv import PEG, ChanLayerNorm, DepthWiseConv2d, DropPath, Residual, conv_output_size
from .distill import DistillTokenMixin
from .embed import (
    PatchEmbed,
    ViTBody,
    ViTStem,
    cast_tuple,
    check_image,
    crop_positions,
    pair,
    patch_grid,
    posemb_sincos_2d,
)
from .linear import Linear
from .mlp import FeedForward, mlp
from .norm import BiasFreeLayerNorm, HeadRMSNorm
from .tokens import gather_tokens
from .transformer import ResidualBlocks, Transformer, residual_block
from .window import WindowAttention, map_heads, merge_map_heads, window_relative_position_index

__all__ = [
    "Attention", "AttentionBase", "ContextAttention", "ReAttention", "TalkingHeadsAttention",
    "merge_heads", "split_heads", "split_qkv",
    "ChanLayerNorm", "DepthWiseConv2d", "PEG", "Residual", "DropPath", "conv_output_size",
    "DistillTokenMixin",
    "PatchEmbed", "ViTBody", "ViTStem", "cast_tuple", "check_image", "crop_positions", "pair", "patch_grid",
    "posemb_sincos_2d",
    "FeedForward", "mlp", "Linear", "BiasFreeLayerNorm", "HeadRMSNorm", "gather_tokens", "ResidualBlocks",
    "Transformer", "residual_block", "BlockRunner",
    "WindowAttention", "map_heads", "merge_map_heads", "window_relative_position_index",
]
