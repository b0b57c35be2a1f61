"""The pre-norm transformer encoder of vit-pytorch's ViT family, and the residual loop it shares."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import Tensor, nn

from .attention import Attention
from .checkpoint import BlockRunner
from .mlp import FeedForward

__all__ = ["ResidualBlocks", "Transformer", "residual_block"]


def residual_block(block: nn.ModuleList, x: Tensor) -> Tensor:
    """``x = attn(x) + x; x = ff(x) + x`` for one ``(attn, ff)`` pair."""
    attn, ff = block
    x = attn(x) + x
    return ff(x) + x


class ResidualBlocks(BlockRunner, nn.Module):
    """``x = attn(x) + x; x = ff(x) + x`` per block, then ``norm`` if the module has one.

    Keys: ``layers.{i}.0`` (attention), ``layers.{i}.1`` (feed-forward), ``norm``. Models whose blocks
    are these two residuals on tokens or maps (ViT, CvT, NesT, CrossViT) build on it; a subclass that
    registers other modules first (NesT's ``pos_emb``), or the norm after the layers (CrossViT), passes
    nothing here and calls ``set_blocks`` where vit-pytorch creates them, so the state_dict order is
    vit-pytorch's. Blocks run through ``BlockRunner.run_block`` (gradient checkpointing) and their
    outputs, before ``norm``, go to ``tap`` (a ViT's intermediates).

    Args:
        blocks: ``(attention, feed_forward)`` module pairs, in order.
        norm: the final norm, registered before the blocks (``None``: none, and no key).
    """

    def __init__(self, blocks: Optional[Iterable[tuple]] = None, norm: Optional[nn.Module] = None):
        super().__init__()
        if norm is not None:
            self.norm = norm
        if blocks is not None:
            self.set_blocks(blocks)

    def set_blocks(self, blocks: Iterable[tuple]) -> None:
        self.layers = nn.ModuleList([nn.ModuleList(block) for block in blocks])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = self.tap(self.run_block(residual_block, block, x))
        norm = self._modules.get("norm")
        return x if norm is None else norm(x)


class Transformer(ResidualBlocks):
    """``depth`` x (attention + MLP, each residual, norm inside), then a final LayerNorm.

    Keys: ``layers.{i}.0`` (Attention), ``layers.{i}.1`` (FeedForward), ``norm``. SimpleViT's variant
    is ``dropout=None, out_bias=False`` (no dropout layers, bias-free output projection); MobileViT's is
    ``final_norm=False, activation=nn.SiLU``; DeepViT's ``attention=ReAttention, final_norm=False``;
    CrossViT's branch encoder ``attention=ContextAttention``.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: Optional[float] = 0.0,
                 final_norm: bool = True, out_bias: bool = True, activation: Callable[[], nn.Module] = nn.GELU,
                 attention: Callable[..., nn.Module] = Attention):
        super().__init__(
            [(attention(dim, heads=heads, dim_head=dim_head, dropout=dropout or 0.0, out_bias=out_bias),
              FeedForward(dim, mlp_dim, dropout=dropout, activation=activation))
             for _ in range(depth)],
            norm=nn.LayerNorm(dim) if final_norm else None,
        )
