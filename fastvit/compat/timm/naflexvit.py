"""NaFlexViT (timm's NaViT / FlexiViT / SigLIP-2 NaFlex ViT): padded variable-resolution batches, packed.

In NaFlex mode (``patch_coord`` / ``patch_valid`` given, or a dict from timm's NaFlex collator) timm pads
every image's patches to one length and hands every block a float ``[B, 1, N, N]`` mask built from
``patch_valid`` (``create_attention_mask``): each block attends over all ``N`` padded tokens. Patched,
``forward_features`` gathers the valid tokens (prefix tokens + valid patches of each image) into one
packed sequence ``[1, sum(lengths), C]``, runs the blocks on it with ``attend(..., packed=Packed(lengths))``
(each image attends only to its own tokens: no padded query or key is computed) and scatters the
result back into timm's padded ``{'patches', 'patch_valid'}`` layout, zeros at the invalid positions.
timm's pooling never reads those (masked avg / max, the attention pool's key mask, the class token);
``global_pool=''`` returns them as they are, so only the valid positions equal timm's there.

The blocks are called as timm calls them; the layout travels in their ``attn_mask`` argument (a
``Packed``, or a descriptor below), so gradient checkpointing recomputes with it. RoPE (EVA blocks,
axial or mixed, also after patch dropout) is gathered with the tokens; the prefix tokens get the
identity rotation (sin 0, cos 1), which leaves them exactly as timm's unrotated prefix.

Where packing cannot apply the call stays padded and the mask becomes a ``KeyPaddingMask`` (valid
queries see exactly the keys timm's mask lets through; only the invalid query rows, which nothing
reads, differ): training with stochastic depth (``DropPath`` draws once per batch element, and a packed
batch is one element), an image with no token at all, or a caller's ``attn_mask`` (a key padding mask
if it is one, else a ``DenseBias``). Blocks other than timm's ``Block`` / ``EvaBlock`` with a patched
attention (``AttentionRope``, which fastvit does not map; other block types) run timm's own
``forward_features``. Plain image tensors run timm's as before.

Outside ``forward_features`` (``forward_intermediates``, direct calls) the blocks' attention maps a
float ``[B, 1, N, N]`` mask whose rows are all the same, 0 or -inf / ``finfo.min`` (timm's masked
value), to a ``KeyPaddingMask`` instead of a ``DenseBias``; any other mask keeps the ViT / EVA mapping.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from timm.layers import Attention as TimmAttention
from timm.layers import DropPath, register_notrace_module
from timm.layers.pos_embed_sincos import apply_keep_indices_nlc, apply_rot_embed_cat
from timm.models._manipulate import checkpoint
from timm.models.eva import EvaAttention as TimmEvaAttention
from timm.models.eva import EvaBlock
from timm.models.naflexvit import NaFlexRopeIterator
from timm.models.naflexvit import NaFlexVit as TimmNaFlexVit
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from fastvit.attention import DenseBias, KeyPaddingMask, Packed, attend
from fastvit.layers import merge_heads, split_heads, split_qkv
from fastvit.runtime import tracing

from . import eva, vit
from ._common import qkv_with_split_bias, run_module
from ._patch import PATCHES, Patched, patches

__all__ = ["NaFlexVit", "NaFlexAttention", "NaFlexEvaAttention", "key_padding"]

# The blocks fastvit runs packed: token-wise apart from their attention (norms, MLPs, layer scale).
_PACKABLE_BLOCKS = (Block, EvaBlock)

# Handed to timm's ``_forward_embeds`` in place of ``attn_mask=None`` so that it skips building its mask.
_NOT_BUILT = torch.empty(0)

# ``key_padding``'s answers per mask tensor (id, with a weak reference): every block of a forward gets the
# same mask, and the check reads it on the host once. Entries die with their tensor.
_KEY_PADDING: dict = {}


def key_padding(mask: Tensor, batch: int, tokens: int) -> Optional[KeyPaddingMask]:
    """A float ``[B, 1, N, N]`` (or ``[B, 1, 1, N]``) mask as a ``KeyPaddingMask`` when that is what it is.

    Every row must be the same, each entry 0 (attend) or -inf / ``torch.finfo(dtype).min`` (timm's masked
    value, which the softmax turns into an exact 0 as well), with at least one key to attend per image;
    the mask must take no gradient. None otherwise, and while a graph is being traced (the check reads the
    mask on the host: one sync per mask tensor, cached until it changes in place; an inference tensor has
    no version counter, so it is checked at every call).
    """
    if mask.dim() != 4 or not mask.is_floating_point() or mask.requires_grad or tracing():
        return None
    b, h, nq, nk = mask.shape
    if b not in (1, batch) or h != 1 or nq not in (1, tokens) or nk != tokens:
        return None
    tracked = not mask.is_inference()
    stamp = (mask._version, mask.data_ptr(), batch) if tracked else None
    hit = _KEY_PADDING.get(id(mask)) if tracked else None
    if hit is not None and hit[0]() is mask and hit[1] == stamp:
        return hit[2]
    row = mask[:, 0, 0]  # (b, nk)
    valid = row == 0
    ok = (valid | (row == float("-inf")) | (row == torch.finfo(mask.dtype).min)).all() & valid.any(dim=-1).all()
    if nq > 1:
        ok = ok & (mask == mask[:, :, :1]).all()
    found = KeyPaddingMask(valid.expand(batch, nk).contiguous()) if bool(ok) else None
    if tracked:
        key = id(mask)
        ref = weakref.ref(mask, lambda _, key=key: _KEY_PADDING.pop(key, None))
        _KEY_PADDING[key] = (ref, stamp, found)
    return found


class _Tokens(Patched):
    """What the NaFlex-aware attentions share: a call on packed tokens or with a mask descriptor.

    ``attn_mask`` may be a ``Packed`` (tokens ``(1, sum(lengths), c)``), a ``KeyPaddingMask`` or a
    ``DenseBias`` (from ``NaFlexVit.forward_features``), or a float mask that ``key_padding`` maps; any
    other call is the ViT / EVA patch's.
    """

    def _qkv(self, x: Tensor) -> tuple:
        """``(q, k, v)``, each ``(b, h, n, d)``."""
        raise NotImplementedError

    def _served(self, x: Tensor, attn_mask) -> Optional[tuple]:
        """``(bias, packed)`` for ``attend``, or None when the parent patch serves the call."""
        if isinstance(attn_mask, Packed):
            return None, attn_mask
        if isinstance(attn_mask, (KeyPaddingMask, DenseBias)):
            return attn_mask, None
        if isinstance(attn_mask, Tensor):
            found = key_padding(attn_mask, x.shape[0], x.shape[1])
            if found is not None:
                return found, None
        return None

    def _attend_tokens(self, x: Tensor, rope: Optional[Tensor], bias, packed: Optional[Packed]) -> Tensor:
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)  # (b, h, n, d)
        q, k = run_module(self.q_norm, q), run_module(self.k_norm, k)
        if rope is not None:
            half = getattr(self, "rotate_half", False)
            if packed is not None:  # the packed rope covers every token (identity on the prefix tokens)
                q = apply_rot_embed_cat(q, rope, half=half).type_as(v)
                k = apply_rot_embed_cat(k, rope, half=half).type_as(v)
            else:
                npt = self.num_prefix_tokens
                q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2).type_as(v)
                k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2).type_as(v)
        x = attend(q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_dropout(), packed=packed)
        x = run_module(self.norm, merge_heads(x))
        if gate is not None:
            x = x * gate
        return run_module(self.proj_drop, self.proj(x))


class NaFlexAttention(_Tokens, vit.Attention):
    """``timm.layers.Attention`` inside a patched NaFlexVit."""

    def _qkv(self, x: Tensor) -> tuple:
        return split_qkv(self.qkv(x), self.num_heads)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, attn_mask, is_causal)
        served = None if is_causal else self._served(x, attn_mask)
        if served is None:
            return super().forward(x, attn_mask, is_causal)
        return self._attend_tokens(x, None, *served)


class NaFlexEvaAttention(_Tokens, eva.EvaAttention):
    """timm's ``EvaAttention`` inside a patched NaFlexVit."""

    def _qkv(self, x: Tensor) -> tuple:
        if self.qkv is not None:
            return split_qkv(qkv_with_split_bias(self, x), self.num_heads)
        return tuple(split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward (see _patch)
            return self._timm_forward(x, rope, attn_mask, is_causal)
        served = None if is_causal else self._served(x, attn_mask)
        if served is None:
            return super().forward(x, rope, attn_mask, is_causal)
        return self._attend_tokens(x, rope, *served)


# timm class -> the NaFlex-aware subclass of its ViT / EVA patch
_AWARE = {TimmAttention: NaFlexAttention, TimmEvaAttention: NaFlexEvaAttention}
for _cls in _AWARE.values():
    register_notrace_module(_cls)  # as leaves of timm's fx tracer, like every patched module


class _Layout:
    """Where each image's valid tokens sit in the padded ``(b, n, c)`` tokens, built once per call.

    ``index``: the flat positions (``i * n + t``) of the valid tokens, image by image, in token order;
    ``packed``: ``Packed`` of the valid tokens per image (prefix tokens + valid patches).
    """

    def __init__(self, valid: Tensor):
        self.batch, self.tokens = valid.shape
        self.index = valid.reshape(-1).nonzero().squeeze(1)
        self.packed = Packed(valid.sum(dim=1))

    def gather(self, x: Tensor) -> Tensor:
        """``(b, n, ...)`` -> ``(sum(lengths), ...)``."""
        return x.flatten(0, 1).index_select(0, self.index)

    def scatter(self, x: Tensor) -> Tensor:
        """``(1, sum(lengths), c)`` -> ``(b, n, c)``, zeros at the invalid tokens."""
        flat = x.new_zeros((self.batch * self.tokens, x.shape[-1])).index_copy(0, self.index, x[0])
        return flat.view(self.batch, self.tokens, -1)

    def rope(self, rope: Tensor, num_prefix_tokens: int) -> Tensor:
        """timm's NaFlex rope ``(b, h, n_patches, 2d)`` (``h`` 1 or heads; ``[sin | cos]``) over the packed
        tokens, ``(1, h, sum(lengths), 2d)``, with the identity rotation on the prefix tokens."""
        b, h, _, dim = rope.shape
        if num_prefix_tokens:
            identity = torch.cat([rope.new_zeros(dim // 2), rope.new_ones(dim - dim // 2)])  # sin 0, cos 1
            rope = torch.cat([identity.expand(b, h, num_prefix_tokens, dim), rope], dim=2)
        return self.gather(rope.transpose(1, 2)).transpose(0, 1).unsqueeze(0)  # (1, h, sum(lengths), 2d)


@patches(TimmNaFlexVit, kind="model")
class NaFlexVit(Patched, TimmNaFlexVit):
    """timm's NaFlexVit with its NaFlex-mode blocks run on packed tokens."""

    @classmethod
    def adopt(cls, module: nn.Module) -> None:
        for blk in module.blocks:
            attn = getattr(blk, "attn", None)
            timm_class = getattr(type(attn), "timm_class", type(attn))
            aware = _AWARE.get(timm_class)
            if aware is None or type(attn) not in (timm_class, PATCHES.get(timm_class)):
                continue
            if "_fastvit_refused" in attn.__dict__ or PATCHES[timm_class].unsupported(attn) is not None:
                continue
            attn.__class__ = aware

    def _not_served(self) -> Optional[str]:
        """Why the blocks cannot take fastvit's layouts (None: they can)."""
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if type(blk) not in _PACKABLE_BLOCKS:
                return f"block {i} is a {type(blk).__name__} (fastvit packs timm's Block and EvaBlock)"
            if not isinstance(attn, _Tokens):
                return f"block {i}'s {type(attn).__name__} is not served by fastvit"
            if getattr(attn, "num_prefix_tokens", self.num_prefix_tokens) != self.num_prefix_tokens:
                return f"block {i}'s attention counts {attn.num_prefix_tokens} prefix tokens, the model " \
                       f"{self.num_prefix_tokens}"
        return None

    def _not_packed(self, lengths_ok: bool, rope_embeds, x: Tensor) -> Optional[str]:
        """Why this call stays padded (None: it is packed)."""
        if rope_embeds is not None and not self._rope_gatherable(rope_embeds, x):
            return f"rope embeddings of an unexpected form ({type(rope_embeds).__name__}): padded, key padding mask"
        if self.training and any(isinstance(m, DropPath) and m.drop_prob > 0 for m in self.blocks.modules()):
            return "training with stochastic depth (DropPath draws once per batch element; packed images " \
                   "would share one draw): padded, key padding mask"
        if not lengths_ok:
            return "an image with no valid patch and no prefix token: padded, key padding mask"
        return None

    def _rope_gatherable(self, rope_embeds, x: Tensor) -> bool:
        """timm's NaFlex rope: ``(b, 1, n_patches, 2d)`` (axial), or its per-block iterator (mixed)."""
        b, n, _ = x.shape
        if self.rope_is_mixed:
            return isinstance(rope_embeds, NaFlexRopeIterator) and rope_embeds.batch_size == b
        return isinstance(rope_embeds, Tensor) and rope_embeds.dim() == 4 and rope_embeds.shape[0] == b \
            and rope_embeds.shape[2] == n - self.num_prefix_tokens

    def _run_blocks(self, x: Tensor, ropes, attn_mask) -> Tensor:
        """timm's block loop: ``ropes`` yields each block's rope (None: no rope argument)."""
        for blk, rope in zip(self.blocks, ropes):
            kwargs = {"attn_mask": attn_mask} if rope is None else {"rope": rope, "attn_mask": attn_mask}
            x = checkpoint(blk, x, **kwargs) if self.grad_checkpointing else blk(x, **kwargs)
        return x

    def _ropes(self, rope_embeds, keep_indices: Optional[Tensor], x: Tensor, convert=None):
        """Each block's rope as timm computes it (mixed: one per block, patch dropout applied), through
        ``convert`` when given."""
        if rope_embeds is None:
            return itertools.repeat(None)
        if not self.rope_is_mixed:
            return itertools.repeat(rope_embeds if convert is None else convert(rope_embeds))

        def per_block():
            for rope in rope_embeds:
                if self.training and self.patch_drop is not None and keep_indices is not None:
                    rope = apply_keep_indices_nlc(x, rope, keep_indices, pos_embed_has_batch=True)
                yield rope if convert is None else convert(rope)

        return per_block()

    def forward_features(self, patches: Tensor, patch_coord: Optional[Tensor] = None,
                         patch_valid: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None):
        if torch.jit.is_scripting():  # attend() does not script: timm's own forward_features (see _patch)
            return self._timm_forward_features(patches, patch_coord, patch_valid, attn_mask)
        if patch_coord is None or patch_valid is None or tracing():  # nothing padded (or a graph): as timm
            return self._timm_forward_features(patches, patch_coord, patch_valid, attn_mask)
        why = self._not_served()
        if why is not None:
            return self.fallback(why, patches, patch_coord, patch_valid, attn_mask, _method="forward_features")
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            return self.fallback("a bool attn_mask (fastvit maps float masks only)", patches, patch_coord,
                                 patch_valid, attn_mask, _method="forward_features")

        # A mask given, timm builds none: its [B, 1, N, N] mask from patch_valid is never read here.
        embeds = self._forward_embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid,
                                      attn_mask=_NOT_BUILT if attn_mask is None else attn_mask)
        x, valid, rope_embeds = embeds["patches"], embeds["patch_valid"], embeds["rope_embeds"]
        keep_indices = embeds["keep_indices"]
        if attn_mask is not None:  # the caller's: what it says, padded
            self.count_fallback("an attn_mask passed by the caller: padded, key padding mask or dense bias")
            bias = key_padding(attn_mask, x.shape[0], x.shape[1]) or DenseBias(attn_mask)
            x = self._run_blocks(x, self._ropes(rope_embeds, keep_indices, x), bias)
            return {"patches": self.norm(x), "patch_valid": valid}

        tokens = valid.bool()
        if self.num_prefix_tokens:
            tokens = torch.cat([tokens.new_ones(tokens.shape[0], self.num_prefix_tokens), tokens], dim=1)
        lengths_ok = self.num_prefix_tokens > 0 or bool(tokens.any(dim=1).all())
        why = self._not_packed(lengths_ok, rope_embeds, x)
        if why is not None:
            self.count_fallback(why)
            x = self._run_blocks(x, self._ropes(rope_embeds, keep_indices, x), KeyPaddingMask(tokens))
            return {"patches": self.norm(x), "patch_valid": valid}

        layout = _Layout(tokens)
        ropes = self._ropes(rope_embeds, keep_indices, x, lambda r: layout.rope(r, self.num_prefix_tokens))
        x = self._run_blocks(layout.gather(x).unsqueeze(0), ropes, layout.packed)  # (1, sum(lengths), c)
        return {"patches": layout.scatter(self.norm(x)), "patch_valid": valid}
