"""MaxViT (and the other MaxxViT models' channels-last attention): block attention (non-overlapping
windows) and grid attention (dilated windows: one token every ``H // g`` rows and ``W // g`` columns).

The partition block goes through ``attend(window=Window(...))`` on the raster tokens: block =
``Window(size=p)``, grid = ``Window(size=g, dilation=(H // g, W // g))``; no partition or reverse copies.
Called directly on timm's partitioned windows, ``AttentionCl`` folds them into the batch.
The three relative-position kinds become a ``[T, H]`` table gathered by a window-local index:

- ``bias`` (``RelPosBias``): the table and its index as they are;
- ``bias_tf`` (``RelPosBiasTf``, a one-hot einsum over a ``[H, 2h-1, 2w-1]`` table): the table
  flattened, gathered by ``(x - i + h - 1) * (2w - 1) + (y - j + w - 1)`` (query ``(i, j)``, key ``(x, y)``);
- ``mlp`` (``RelPosMlp``): the MLP's output over the log-spaced offsets, through its activation and gain.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers.pos_embed_rel import RelPosBias as TimmRelPosBias
from timm.layers.pos_embed_rel import RelPosBiasTf, RelPosMlp
from timm.models.maxxvit import AttentionCl as TimmAttentionCl
from timm.models.maxxvit import PartitionAttentionCl as TimmPartitionAttentionCl
from torch import Tensor, nn

from fastvit.attention import DenseBias, RelPosBias, Window, attend

from ._patch import Patched, patches


def tf_index(window_size: tuple, device) -> Tensor:
    """``RelPosBiasTf``'s one-hot lookups as an index into its flattened ``[(2h-1)*(2w-1), H]`` table."""
    h, w = window_size
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (n,) raster order within the window
    return (ys[None, :] - ys[:, None] + h - 1) * (2 * w - 1) + (xs[None, :] - xs[:, None] + w - 1)  # (q, k)


@patches(TimmAttentionCl)
class AttentionCl(Patched, TimmAttentionCl):
    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        rel = module.rel_pos
        if rel is not None and type(rel) not in (TimmRelPosBias, RelPosBiasTf, RelPosMlp):
            return f"relative position module {type(rel).__name__} has no mapping"
        if getattr(rel, "prefix_tokens", 0):
            return "relative position bias with prefix tokens has no mapping"
        return None

    def rel_bias(self, shared_rel_pos: Optional[Tensor]):
        rel = self.rel_pos
        if rel is None:
            return None if shared_rel_pos is None else DenseBias(shared_rel_pos)
        n = rel.window_area
        if isinstance(rel, RelPosBiasTf):
            table = rel.relative_position_bias_table  # (heads, 2h-1, 2w-1)
            index = self.derived("tf_index", (rel.height_lookup,),
                                 lambda: tf_index(rel.window_size, table.device))
            return RelPosBias(table.flatten(1).t(), index)
        index = self.derived("index", (rel.relative_position_index,),
                             lambda: rel.relative_position_index.view(n, n))
        if isinstance(rel, RelPosMlp):
            table = rel.bias_act(rel.mlp(rel.rel_coords_log).view(-1, self.num_heads))
            return RelPosBias(table if rel.bias_gain is None else rel.bias_gain * table, index)
        return RelPosBias(rel.relative_position_bias_table, index)

    def qkv_heads(self, x: Tensor) -> tuple:
        """q, k, v ``(b, heads, n, d)`` from tokens ``(b, ..., c)``."""
        b = x.shape[0]
        if self.head_first:
            return self.qkv(x).view(b, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        return self.qkv(x).reshape(b, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)

    def forward(self, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, shared_rel_pos)
        q, k, v = self.qkv_heads(x)
        out = attend(q, k, v, scale=self.scale, bias=self.rel_bias(shared_rel_pos), dropout_p=self.attn_dropout())
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(x.shape[:-1] + (-1,))))

    def attend_grid(self, x: Tensor, window) -> Tensor:
        """Windowed attention over a whole ``(b, h, w, c)`` map, in place."""
        q, k, v = self.qkv_heads(x)  # (b, heads, h*w, d), raster order
        out = attend(q, k, v, scale=self.scale, bias=self.rel_bias(None), window=window,
                     dropout_p=self.attn_dropout())
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(x.shape[:-1] + (-1,))))


@patches(TimmPartitionAttentionCl, kind="block")
class PartitionAttentionCl(Patched, TimmPartitionAttentionCl):
    def _partition_attn(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own _partition_attn (see _patch)
            return self._timm__partition_attn(x)
        _, h, w, _ = x.shape
        ph, pw = self.partition_size
        if h % ph or w % pw:
            return self.fallback("map not a multiple of the partition", x, _method="_partition_attn")
        if not isinstance(self.attn, AttentionCl):
            return self.fallback("its AttentionCl is not patched", x, _method="_partition_attn")
        if self.partition_block:  # ph x pw blocks
            window = Window(grid=(h, w), size=(ph, pw))
        else:  # a ph x pw grid: tokens h // ph rows and w // pw columns apart
            window = Window(grid=(h, w), size=(ph, pw), dilation=(h // ph, w // pw))
        return self.attn.attend_grid(x, window)
