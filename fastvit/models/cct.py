"""CCT: "Escaping the Big Data Paradigm with Compact Transformers" (Hassani et al., arXiv 2104.05704).

A convolutional tokenizer (``[Conv -> ReLU -> MaxPool] x n_conv_layers``) replaces patching, and
sequence pooling (a softmax-weighted average of the tokens, weights from a Linear) replaces the CLS
token. The encoder block is not the usual pre-norm one: ``x = x + drop_path(attn(pre_norm(x)))``,
then ``x = norm1(x)`` (the residual stream itself is normalised), then the MLP residual.

vit-pytorch 1.26.x layout and numerics: modules ``tokenizer.conv_layers.{i}.0`` (bias-free conv) and
``classifier`` (``positional_emb``, ``attention_pool``, ``blocks.{i}.{pre_norm, self_attn.qkv,
self_attn.proj, linear1, norm1, linear2}``, ``norm``, ``fc``); ``q`` is pre-scaled; the sine table is
an ``nn.Parameter(requires_grad=False)``, so it is in the state_dict; init is trunc_normal(0.02) on
Linear, kaiming_normal on the convs, trunc_normal(0.2) on a learnable position table, and the
constructors and the ``cct_2 ... cct_16`` factories take vit-pytorch's arguments (the factories
default to a 3x3 tokenizer with ``stride = max(1, k // 2 - 1)``, ``padding = max(1, k // 2)``).
Sequence pooling is a plain softmax over a Linear's per-token scores (no query/key product), so it
does not go through ``attend()``.

Deliberate differences from vit-pytorch:

- Unknown keyword arguments raise ``TypeError`` naming them (vit-pytorch's ``**kwargs`` swallow any
  misspelling silently). One exception: ``mlp_radio``, the typo of the vit-pytorch README's CCT
  example, is accepted and *ignored* with a ``UserWarning``, exactly as vit-pytorch ignores it (the
  MLP keeps ``mlp_ratio``, default 4), so the README example runs and builds the same model, and its
  vit-pytorch checkpoints load. Pass ``mlp_ratio=`` to change the MLP width.
- ``positional_embedding='none'`` with an image smaller than ``img_size`` works: the tokens are used
  as they are (the model has no positions, so nothing depends on the sequence length). vit-pytorch
  raises ``AttributeError: n_channels`` there: its code meant to zero-pad the sequence to the
  ``img_size`` length, which would have let phantom zero tokens into the attention and the pooling.
  Larger images work too, as in vit-pytorch.
- ``'learnable'`` / ``'sine'`` with an image smaller than ``img_size`` take the positions of the
  top-left crop of the 2-D token grid (vit-pytorch raises a shape error); larger images are a
  ``ValueError``.
- Wrong channel counts and images too small for the tokenizer raise ``ValueError`` up front, as does
  an ``embedding_dim`` not divisible by ``num_heads``.
- ``num_classes=0`` returns the sequence-pooled features ``(b, embedding_dim)`` (``classifier.fc`` an
  ``nn.Identity``); vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastvit.layers import AttentionBase, BlockRunner, DropPath, Linear, check_image, merge_heads, pair, split_qkv

from .base import VisionModel
from .registry import register_model

__all__ = ["CCT", "Tokenizer", "TransformerClassifier", "TransformerEncoderLayer", "Attention", "DropPath",
           "sinusoidal_embedding", "cct_2", "cct_4", "cct_6", "cct_7", "cct_8", "cct_14", "cct_16"]

_POSITIONAL = ("sine", "learnable", "none")


def sinusoidal_embedding(n_channels: int, dim: int) -> Tensor:
    """vit-pytorch's 1-D sinusoid table ``(1, n_channels, dim)`` (angles in float64, then float32)."""
    position = torch.arange(n_channels, dtype=torch.float64)[:, None]
    i = torch.arange(dim)
    pe = (position / 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / dim).double()).float()
    pe[:, 0::2] = torch.sin(pe[:, 0::2])
    pe[:, 1::2] = torch.cos(pe[:, 1::2])
    return pe[None]


class Attention(AttentionBase):
    """CCT's multi-head self-attention: ``qkv`` (no bias), ``proj``; head dim ``dim // num_heads``."""

    def __init__(self, dim: int, num_heads: int = 8, attention_dropout: float = 0.1,
                 projection_dropout: float = 0.1):
        super().__init__(attn_dropout=attention_dropout)
        if dim % num_heads:
            raise ValueError(f"embedding_dim {dim} must be divisible by num_heads {num_heads}")
        self.heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=False)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(projection_dropout)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = split_qkv(self.qkv(x), self.heads)  # (b, h, n, d) each
        out = self.attend(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(merge_heads(out)))


class TransformerEncoderLayer(nn.Module):
    """``x + drop_path(attn(pre_norm(x)))``, ``norm1``, then ``x + drop_path(mlp(x))``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 attention_dropout: float = 0.1, drop_path_rate: float = 0.1):
        super().__init__()
        self.pre_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(dim=d_model, num_heads=nhead, attention_dropout=attention_dropout,
                                   projection_dropout=dropout)
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, src: Tensor) -> Tensor:
        src = src + self.drop_path(self.self_attn(self.pre_norm(src)))
        src = self.norm1(src)
        src2 = self.linear2(self.dropout1(F.gelu(self.linear1(src))))
        return src + self.drop_path(self.dropout2(src2))


class Tokenizer(nn.Module):
    """``[Conv(bias=False) -> activation -> MaxPool] x n_conv_layers``, then ``(b, h*w, c)`` tokens."""

    def __init__(self, kernel_size, stride, padding, pooling_kernel_size=3, pooling_stride=2,
                 pooling_padding=1, n_conv_layers=1, n_input_channels=3, n_output_channels=64, in_planes=64,
                 activation=None, max_pool=True, conv_bias=False):
        super().__init__()
        n_filter_list = [n_input_channels] + [in_planes] * (n_conv_layers - 1) + [n_output_channels]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(
                nn.Conv2d(chan_in, chan_out, kernel_size=(kernel_size, kernel_size), stride=(stride, stride),
                          padding=(padding, padding), bias=conv_bias),
                nn.Identity() if activation is None else activation(),
                nn.MaxPool2d(kernel_size=pooling_kernel_size, stride=pooling_stride, padding=pooling_padding)
                if max_pool else nn.Identity(),
            )
            for chan_in, chan_out in zip(n_filter_list[:-1], n_filter_list[1:])
        ])
        self.apply(self.init_weight)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid ``(h, w)`` for a ``height x width`` image (arithmetic, no forward pass)."""
        size = [height, width]
        for layer in self.conv_layers.modules():
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                k, s, p, d = (pair(getattr(layer, attr)) for attr in ("kernel_size", "stride", "padding",
                                                                      "dilation"))
                size = [(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
        return size[0], size[1]

    def sequence_length(self, n_channels: int = 3, height: int = 224, width: int = 224) -> int:
        """Number of tokens for an image of this size (vit-pytorch's method; ``n_channels`` is unused)."""
        h, w = self.output_grid(height, width)
        return h * w

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_layers(x)  # (b, c, h, w)
        return x.flatten(2).transpose(1, 2)  # (b, h*w, c)

    @staticmethod
    def init_weight(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)


class TransformerClassifier(BlockRunner, nn.Module):
    """The encoder, final norm, sequence pooling (or a class token) and ``fc`` of CCT.

    Args:
        seq_pool: sequence pooling (True) or a zero-initialised class token (False).
        embedding_dim, num_layers, num_heads, mlp_ratio, num_classes: sizes.
        dropout_rate, attention_dropout, stochastic_depth_rate: regularisation (drop path rates grow
            linearly from 0 to ``stochastic_depth_rate`` over the blocks).
        positional_embedding: ``'sine'``, ``'learnable'`` or ``'none'``.
        sequence_length: number of tokens of an ``img_size`` image (needed unless ``'none'``).
        grid: the ``(h, w)`` token grid of an ``img_size`` image, so smaller images can take a 2-D
            crop of the positions; ``None`` = a 1-D sequence (only the full length is accepted).
    """

    def __init__(self, seq_pool=True, embedding_dim=768, num_layers=12, num_heads=12, mlp_ratio=4.0,
                 num_classes=1000, dropout_rate=0.1, attention_dropout=0.1, stochastic_depth_rate=0.1,
                 positional_embedding="sine", sequence_length=None, *, grid: Optional[tuple] = None):
        super().__init__()
        if positional_embedding not in _POSITIONAL:
            raise ValueError(f"positional_embedding must be one of {_POSITIONAL}, "
                             f"got {positional_embedding!r}")
        if sequence_length is None and positional_embedding != "none":
            raise ValueError(f"positional_embedding={positional_embedding!r} needs sequence_length")
        dim_feedforward = int(embedding_dim * mlp_ratio)
        self.embedding_dim = embedding_dim
        self.sequence_length = sequence_length
        self.seq_pool = seq_pool
        self.grid = tuple(grid) if grid is not None else None

        if not seq_pool:
            sequence_length += 1 if sequence_length is not None else 0
            self.class_emb = nn.Parameter(torch.zeros(1, 1, self.embedding_dim), requires_grad=True)
        else:
            self.attention_pool = Linear(self.embedding_dim, 1)

        if positional_embedding == "none":
            self.positional_emb = None
        elif positional_embedding == "learnable":
            self.positional_emb = nn.Parameter(torch.zeros(1, sequence_length, embedding_dim),
                                               requires_grad=True)
            nn.init.trunc_normal_(self.positional_emb, std=0.2)
        else:
            self.positional_emb = nn.Parameter(sinusoidal_embedding(sequence_length, embedding_dim),
                                               requires_grad=False)

        self.dropout = nn.Dropout(p=dropout_rate)
        dpr = torch.linspace(0, stochastic_depth_rate, num_layers).tolist()
        self.blocks = nn.ModuleList([
            TransformerEncoderLayer(d_model=embedding_dim, nhead=num_heads, dim_feedforward=dim_feedforward,
                                    dropout=dropout_rate, attention_dropout=attention_dropout,
                                    drop_path_rate=layer_dpr)
            for layer_dpr in dpr
        ])
        self.norm = nn.LayerNorm(embedding_dim)
        self.fc = Linear(embedding_dim, num_classes)
        self.apply(self.init_weight)

    def position_embedding(self, n: int, grid: Optional[tuple]) -> Tensor:
        """Positions for ``n`` tokens on a ``grid`` (the full table, or a top-left 2-D crop of it)."""
        pos = self.positional_emb
        full = self.sequence_length
        if n == full and (grid is None or self.grid is None or tuple(grid) == self.grid):
            return pos
        if grid is None or self.grid is None:
            raise ValueError(f"got {n} tokens but the position table holds {full} "
                             f"(pass the token grid to crop it)")
        h, w = grid
        if h > self.grid[0] or w > self.grid[1]:
            raise ValueError(f"token grid {(h, w)} is larger than the position grid {self.grid}")
        cls_pos, patch_pos = pos[:, : pos.shape[1] - full], pos[:, pos.shape[1] - full:]
        patch_pos = patch_pos.view(1, *self.grid, -1)[:, :h, :w].reshape(1, h * w, -1)  # (1, h*w, dim)
        return torch.cat((cls_pos, patch_pos), dim=1) if cls_pos.shape[1] else patch_pos

    def forward_features(self, x: Tensor, grid: Optional[tuple] = None) -> Tensor:
        """Tokens ``(b, n, dim)`` -> normed tokens ``(b, n (+1), dim)``."""
        n = x.shape[1]
        if not self.seq_pool:
            x = torch.cat((self.class_emb.expand(x.shape[0], -1, -1), x), dim=1)
        if self.positional_emb is not None:
            x = x + self.position_embedding(n, grid)
        x = self.dropout(x)
        for blk in self.blocks:
            x = self.tap(self.run_block(blk, x))
        return self.norm(x)

    def pool_features(self, x: Tensor) -> Tensor:
        """Sequence pooling (or the class token): ``(b, n, dim) -> (b, dim)``."""
        if self.seq_pool:
            weights = self.attention_pool(x).softmax(dim=1)  # (b, n, 1), over the tokens
            return (weights.transpose(1, 2) @ x).squeeze(1)  # (b, dim)
        return x[:, 0]

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool_features(x))

    def forward(self, x: Tensor, grid: Optional[tuple] = None) -> Tensor:
        return self.forward_head(self.forward_features(x, grid))

    @staticmethod
    def init_weight(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)


_CLASSIFIER_KWARGS = ("num_layers", "num_heads", "mlp_ratio", "num_classes", "positional_embedding")


def _stacklevel_outside_this_file() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this module (through the
    ``cct_N`` factories, ``CCT.__init__`` and ``_check_kwargs``)."""
    frame, level = sys._getframe(1), 1  # the caller of this function is level 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _check_kwargs(kwargs: dict, owner: str) -> dict:
    """The TransformerClassifier arguments out of ``kwargs``; ``mlp_radio`` warns; anything else raises."""
    kwargs = dict(kwargs)
    if "mlp_radio" in kwargs:
        value = kwargs.pop("mlp_radio")
        warnings.warn(
            f"{owner}: 'mlp_radio={value!r}' is a typo (from the vit-pytorch README) that vit-pytorch "
            f"silently ignores; fastvit ignores it too, so the MLP ratio stays "
            f"mlp_ratio={kwargs.get('mlp_ratio', 4.0)!r}. Pass mlp_ratio= to change it.",
            UserWarning, stacklevel=_stacklevel_outside_this_file())
    unknown = sorted(k for k in kwargs if k not in _CLASSIFIER_KWARGS)
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword argument(s): {', '.join(map(repr, unknown))} "
                        f"(accepted besides the tokenizer's: {', '.join(_CLASSIFIER_KWARGS)})")
    return kwargs


class CCT(VisionModel):
    """Compact Convolutional Transformer with vit-pytorch's constructor.

    Args:
        img_size: int or (h, w); the input size the position table is built for.
        embedding_dim: token width. n_input_channels: input channels.
        n_conv_layers, kernel_size, stride, padding: the tokenizer convolutions.
        pooling_kernel_size, pooling_stride, pooling_padding: the tokenizer max-pools.
        dropout_rate, attention_dropout, stochastic_depth_rate: regularisation.
        num_layers, num_heads, mlp_ratio, num_classes, positional_embedding: keyword-only, passed to
            ``TransformerClassifier`` (``positional_embedding`` in ``'sine'``, ``'learnable'``, ``'none'``).
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = "classifier.fc"
    final_norm_path = "classifier.norm"
    intermediates_from = "classifier"

    def __init__(self, img_size=224, embedding_dim=768, n_input_channels=3, n_conv_layers=1, kernel_size=7,
                 stride=2, padding=3, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1,
                 dropout_rate=0.0, attention_dropout=0.1, stochastic_depth_rate=0.1, legacy_num_classes_zero=False,
                 **kwargs):
        super().__init__()
        classifier_kwargs = _check_kwargs(kwargs, type(self).__name__)
        self.image_size = pair(img_size)
        self.channels = n_input_channels
        self.dim = embedding_dim
        self.tokenizer = Tokenizer(n_input_channels=n_input_channels, n_output_channels=embedding_dim,
                                   kernel_size=kernel_size, stride=stride, padding=padding,
                                   pooling_kernel_size=pooling_kernel_size, pooling_stride=pooling_stride,
                                   pooling_padding=pooling_padding, max_pool=True, activation=nn.ReLU,
                                   n_conv_layers=n_conv_layers, conv_bias=False)
        self.grid = self.tokenizer.output_grid(*self.image_size)
        if min(self.grid) < 1:
            raise ValueError(f"img_size {self.image_size} is too small for the tokenizer "
                             f"(token grid {self.grid})")
        self.classifier = TransformerClassifier(
            sequence_length=self.grid[0] * self.grid[1], grid=self.grid, embedding_dim=embedding_dim,
            seq_pool=True, dropout_rate=dropout_rate, attention_dropout=attention_dropout,
            stochastic_depth_rate=stochastic_depth_rate, **classifier_kwargs)
        self.set_head(embedding_dim, classifier_kwargs.get("num_classes", 1000), legacy_num_classes_zero)
        depth = len(self.classifier.blocks)
        self.set_feature_info([embedding_dim] * depth, [self.image_size[0] // self.grid[0]] * depth,
                              "classifier.blocks")

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        return self.tokenizer.output_grid(h, w)

    def forward_features(self, img: Tensor) -> Tensor:
        """Normed tokens ``(b, h*w, dim)``."""
        has_positions = self.classifier.positional_emb is not None
        # Without positions any image size works (as in vit-pytorch); with them, at most img_size.
        check_image(img, channels=self.channels, max_size=self.image_size if has_positions else sys.maxsize)
        grid = self.tokenizer.output_grid(img.shape[-2], img.shape[-1])
        if min(grid) < 1:
            raise ValueError(f"image size {tuple(img.shape[-2:])} is too small for the tokenizer "
                             f"(token grid {grid})")
        return self.classifier.forward_features(self.tokenizer(img), grid)

    def pool_features(self, x: Tensor) -> Tensor:
        return self.classifier.pool_features(x)


def _cct(name, args, num_layers, num_heads, mlp_ratio, embedding_dim, kernel_size=3, stride=None,
         padding=None, **kwargs):
    if args:
        # vit-pytorch's factories pass positional arguments after num_layers=..., so any of them is a
        # "multiple values" TypeError there; say so plainly.
        raise TypeError(f"{name}() takes keyword arguments only, got {len(args)} positional argument(s)")
    stride = max(1, (kernel_size // 2) - 1) if stride is None else stride
    padding = max(1, (kernel_size // 2)) if padding is None else padding
    return CCT(num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, embedding_dim=embedding_dim,
               kernel_size=kernel_size, stride=stride, padding=padding, **kwargs)


def _factory(name: str, num_layers: int, num_heads: int, mlp_ratio: float, embedding_dim: int, doc: str):
    """vit-pytorch's ``cct_N(*args, **kwargs)``: a CCT of fixed depth, heads, MLP ratio and width."""
    def factory(*args, **kwargs) -> CCT:
        return _cct(name, args, num_layers, num_heads, mlp_ratio, embedding_dim, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    return factory


cct_2 = _factory("cct_2", 2, 2, 1, 128, "CCT-2: 2 layers, 2 heads, MLP ratio 1, width 128 (3x3 tokenizer unless "
                 "overridden).")
cct_4 = _factory("cct_4", 4, 2, 1, 128, "CCT-4: 4 layers, 2 heads, MLP ratio 1, width 128.")
cct_6 = _factory("cct_6", 6, 4, 2, 256, "CCT-6: 6 layers, 4 heads, MLP ratio 2, width 256.")
cct_7 = _factory("cct_7", 7, 4, 2, 256, "CCT-7: 7 layers, 4 heads, MLP ratio 2, width 256.")
cct_8 = _factory("cct_8", 8, 4, 2, 256, "CCT-8: 8 layers, 4 heads, MLP ratio 2, width 256.")
cct_14 = _factory("cct_14", 14, 6, 3, 384, "CCT-14: 14 layers, 6 heads, MLP ratio 3, width 384.")
cct_16 = _factory("cct_16", 16, 6, 3, 384, "CCT-16: 16 layers, 6 heads, MLP ratio 3, width 384.")


# Small test configs: the factories fix the widths and depths (vit-pytorch's raise on overriding them), so
# only the image shrinks: 32 px through two conv+pool stages gives an 8 x 8 token grid.
_SMALL = dict(img_size=32, n_conv_layers=2, num_classes=10)
for _factory in (cct_2, cct_4, cct_6, cct_7, cct_8, cct_14, cct_16):
    register_model(_factory.__name__, _factory, vit_pytorch=f"vit_pytorch.cct:{_factory.__name__}",
                   test_overrides=_SMALL, description=_factory.__doc__.split(":")[1].strip().rstrip("."))
