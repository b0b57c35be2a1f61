"""ATS-ViT: "Adaptive Token Sampling for Efficient Vision Transformers" (Fayyaz et al., arXiv 2111.15667).

A ViT whose attention layers keep at most ``max_tokens_per_depth[i]`` patch tokens. A layer with
more scores every patch by the CLS token's attention to it, weighted by the norm of its value and
summed over heads, samples ``max_tokens`` tokens from those scores (with replacement), and keeps the
distinct ones: the number of tokens adapts to the image. vit-pytorch 1.26.x layout and numerics:
dual-patchnorm embedding, 3-D ``cls_token (1, 1, dim)`` / ``pos_embedding (1, N + 1, dim)``, pre-norm
blocks with the norm inside, no final norm, ``mlp_head = LayerNorm + Linear``.

How it runs (vit-pytorch's results, without its per-image Python loop, ``torch.unique`` and full maps):

- A sampling layer asks ``attend`` for the CLS query's probabilities (``return_cls_probs=True``, one
  query row; the full attention map is never built by the model), samples, then attends with the
  kept queries only (vit-pytorch attends with every query and gathers the kept rows of the map).
  Queries are projected only for the tokens that use them (``Linear.forward_rows``): keys and values
  for every token, queries for CLS and the kept tokens; vit-pytorch projects all three for all.
- How far this can go on a CPU: vit-pytorch's and fastvit's work is then the same GEMMs bar those
  query rows, and those GEMMs are ~85-90% of both runs. fastvit's oneDNN GEMMs run at the machine's
  peak (~215 GFLOP/s fp32 on a 2-core Zen 4), 1.15-1.3x ``F.linear``'s, so the measured speed-up
  (1.2-1.66x, ``benchmarks/ats_profile.py``) is bounded by about 1.85x at the seed configuration
  (batch 8: its GEMMs alone take ~370 ms, vit-pytorch's whole forward ~684 ms).
- Sampling is vit-pytorch's Gumbel-max over ``log(score / sum + eps)``, vectorised over the batch:
  the sampled positions are scattered into a ``(b, n)`` keep mask and compacted in order with a
  cumulative sum (vit-pytorch: ``torch.unique`` per image, then ``pad_sequence``).
- Kept sets are laid out CLS first, kept tokens in ascending order, then padding. Padding slots hold
  a copy of the CLS token, as in vit-pytorch, and are excluded as keys with ``KeyPaddingMask``.
  Their width is ``trim_padding``'s choice:
  - trimmed (default on the CPU): cut to the batch's widest set, as vit-pytorch does. That width is
    read on the host, which on the CPU is a plain memory read; the later layers then compute only
    as many tokens as the images keep, which is what makes ATS cheaper.
  - fixed (default on accelerators and under ``torch.compile``): ``min(max_tokens, tokens) + 1``, so
    no shape depends on data and nothing waits for the device; padding costs compute instead.
  Both give the same logits and kept ids; returned ids are padded with -1 to the width in force
  (vit-pytorch: its widest set).
- ``forward`` (logits) updates only the CLS token in the last layer, the one token the head reads
  (the layer still samples, for the returned ids); ``forward_features`` computes every token.
  ``Recorder`` therefore records, per layer, the maps of the queries it computes: the kept tokens'
  rows, and the CLS row alone in the last layer (vit-pytorch's Recorder records nothing for ATS).
- Random numbers: vit-pytorch draws ``torch.empty(b, k, n - 1).uniform_()`` in each sampling layer,
  ``n`` being its widest set. fastvit draws the same where that width is known on the host; where it
  is not (fixed widths after the first sampling layer) it draws one buffer for the remaining layers
  and reads each layer's numbers at the offsets vit-pytorch's draws would have (computed on the
  device). On the CPU, where the generator fills tensors in order, a model in eval mode therefore
  samples the very tokens vit-pytorch samples under the same seed. (With fixed widths the generator
  ends up further advanced than vit-pytorch leaves it; on CUDA the numbers differ from
  vit-pytorch's but have the same distribution.)

Deliberate differences from vit-pytorch:

- Whether a layer samples is decided per image: an image with at most ``max_tokens`` tokens left
  keeps them all. vit-pytorch samples every image of the batch as soon as the batch's widest token
  set has more than ``max_tokens``, so an image's tokens (and logits) depend on the other images in
  its batch. ``batch_wide_sampling=True`` restores vit-pytorch's behaviour.
- Scores come from the attention probabilities before dropout; vit-pytorch scores the probabilities
  after attention dropout (training with ``dropout > 0`` only; eval is unaffected).
- Padding tokens are masked as keys only. vit-pytorch also masks them as queries (their attention
  becomes uniform); this changes the (meaningless) features of padding slots only, never a real
  token, the logits or the token ids.
- Images smaller than ``image_size`` take the positions of the top-left crop of the 2-D position
  grid, as fastvit's ViT does; vit-pytorch slices the flat table. ``legacy_pos_slicing=True``
  restores vit-pytorch's behaviour.
- ``max_tokens_per_depth`` that is not ``depth`` long, not non-increasing or not positive, wrong
  channel counts, non-divisible or too-large images raise ``ValueError`` (vit-pytorch: assertions or
  shape errors deep inside).
- ``num_classes=0`` returns the pooled, normed CLS token ``(b, dim)`` (``mlp_head.1`` an ``nn.Identity``);
  vit-pytorch's ``Linear(dim, 0)`` returns ``(b, 0)``: ``legacy_num_classes_zero=True``.

Packed kept sets (``packed=True``): after each sampling layer the kept tokens of each image are
packed into one sequence (``fastvit.attention.Packed``, one sequence per image of its CLS token and
kept tokens) instead of padded and masked with ``KeyPaddingMask``; every later block attends with
``attend(..., packed=...)``, so no compute goes to padding slots. The CLS probabilities come packed
(each image's first query over its own keys) and are laid out per image for the sampling, so an image
samples exactly what it samples padded: the same logits and token ids as ``trim_padding=True``
(within fp32 rounding), whose widths and random draws it shares, since a packed layout is built from
the kept counts read on the host (``trim_padding=False`` is refused with it). ``forward_features``
lays the tokens out padded again (zeros in the padding slots); the blocks before the first sampling
layer run unpacked, as all images have every token there.

Gradient checkpointing recomputes the blocks that do not sample; a sampling block runs as is (its
random numbers come from a stream that a recomputation would read further on). Its intermediates are
the kept tokens: ``forward_intermediates`` gives maps (``NCHW``) only while no token was dropped, and
the kept tokens with ``output_fmt='NLC'`` (padding slots included).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from fastvit.attention import KeyPaddingMask, Packed
from fastvit.layers import Attention as SelfAttention
from fastvit.layers import (
    BlockRunner,
    FeedForward,
    Linear,
    ViTStem,
    gather_tokens,
    merge_heads,
    split_heads,
    split_qkv,
)

from .base import VisionModel
from .registry import register_model

__all__ = ["ViT", "Transformer", "Attention", "AdaptiveTokenSampling"]


class UniformStream:
    """The uniform numbers of the sampling layers of one forward, as vit-pytorch draws them.

    vit-pytorch draws ``torch.empty(b, k, n - 1).uniform_(0, 1)`` in each sampling layer, ``n`` being
    its batch's widest token set. While that width is known on the host (before any padding, or with
    ``trim_padding``) a layer draws exactly that. Once it is known only on the device, the numbers of
    all remaining layers come from one buffer drawn then, sized for the fixed widths: layer ``i``
    reads element ``(img, s, j)`` at ``offset + (img * k + s) * (n - 1) + j``, and the offset moves on
    by ``b * k * (n - 1)`` when vit-pytorch would have drawn. The CPU generator fills a tensor in order,
    so both give the numbers vit-pytorch gets from the same generator state.

    Args:
        plan: per sampling layer, in order, the most numbers it may take (``b * k * fixed width``).
    """

    def __init__(self, plan: list):
        self.plan = plan
        self.layer = 0  # index of the next sampling layer in plan
        self.buffer: Optional[Tensor] = None
        self.offset: Union[int, Tensor] = 0

    def take(self, b: int, k: int, width: int, widest: Union[int, Tensor], draws: Union[bool, Tensor],
             like: Tensor) -> Tensor:
        """``(b, k, width)`` uniforms; columns past ``widest`` hold numbers the caller must mask.

        Args:
            b, k, width: shape of the result (``width``: tokens in the layer, CLS excluded).
            widest: vit-pytorch's width for this layer, ``width`` or a 0-d device tensor ``<= width``.
            draws: whether vit-pytorch draws in this layer (a bool, or a 0-d bool tensor).
            like: gives the device and dtype of the numbers.
        """
        remaining = sum(self.plan[self.layer:])
        self.layer += 1
        if self.buffer is None and isinstance(widest, int):
            return torch.empty(b, k, width, device=like.device, dtype=like.dtype).uniform_(0, 1)
        if self.buffer is None:
            self.buffer = torch.empty(remaining, device=like.device, dtype=like.dtype).uniform_(0, 1)
        rows = torch.arange(b * k, device=like.device).unsqueeze(1) * widest  # (b*k, 1)
        index = rows + torch.arange(width, device=like.device) + self.offset  # (b*k, width)
        index = index.clamp_(max=self.buffer.numel() - 1)
        self.offset = self.offset + draws * (b * k * widest)
        return self.buffer[index].view(b, k, width)


class AdaptiveTokenSampling(nn.Module):
    """Picks the tokens a layer keeps from the CLS attention; no parameters (as in vit-pytorch).

    Args:
        output_num_tokens: number of samples ``k`` (the most patch tokens kept).
        eps: vit-pytorch's epsilon in the normalisation and the logarithms.
        batch_wide_sampling: sample every image once any image has more than ``k`` tokens (vit-pytorch).
    """

    def __init__(self, output_num_tokens: int, eps: float = 1e-6, batch_wide_sampling: bool = False):
        super().__init__()
        self.eps = eps
        self.output_num_tokens = output_num_tokens
        self.batch_wide_sampling = batch_wide_sampling

    def forward(self, cls_probs: Tensor, value: Tensor, mask: Optional[Tensor], uniforms: UniformStream,
                trimmed: bool = False) -> tuple[Tensor, Tensor]:
        """Sample.

        Args:
            cls_probs: ``(b, h, n)`` probabilities of the CLS query (token 0) over the ``n`` tokens.
            value: ``(b, h, n, d)`` values of the layer.
            mask: ``(b, n)`` bool, True = real token (padding last), or None when there is no padding.
            uniforms: the forward's random numbers.
            trimmed: the token sets are cut to the widest one (some image has ``n - 1`` tokens).

        Returns:
            ``ids (b, k + 1)``: positions kept, CLS (0) first, then ascending, padding = 0;
            ``mask (b, k + 1)``: True for CLS and the kept tokens.
        """
        value_norms = value[..., 1:, :].norm(dim=-1)  # (b, h, n-1)
        return self.sample(cls_probs, value_norms, mask, uniforms, trimmed)

    def sample(self, cls_probs: Tensor, value_norms: Tensor, mask: Optional[Tensor], uniforms: UniformStream,
               trimmed: bool = False) -> tuple[Tensor, Tensor]:
        """``forward`` given the value norms of the patch tokens, ``(b, h, n - 1)`` (the packed path
        computes them on the packed values)."""
        b, _, n = cls_probs.shape
        k, eps = self.output_num_tokens, self.eps
        width = n - 1

        # Significance: CLS attention weighted by the value norms, summed over heads, normalised.
        scores = torch.einsum("bhn,bhn->bn", cls_probs[..., 1:], value_norms)  # (b, n-1)
        normed = scores / (scores.sum(dim=-1, keepdim=True) + eps)
        pseudo_logits = torch.log(normed + eps)

        if mask is None:
            valid, count, widest, draws = None, None, width, True
        else:
            valid = mask[:, 1:]  # (b, n-1)
            pseudo_logits = pseudo_logits.masked_fill(~valid, -torch.finfo(pseudo_logits.dtype).max / 2)
            count = valid.sum(dim=1)  # (b,) tokens per image
            widest = width if trimmed else count.max()  # vit-pytorch's width
            draws = widest > k

        # Gumbel-max, k draws per image (vit-pytorch's sample_gumbel): (b, k) positions in [0, n-1).
        u = uniforms.take(b, k, width, widest, draws, like=pseudo_logits)  # (b, k, n-1)
        gumbel = -torch.log(-torch.log(u + eps) + eps)
        sampled = (pseudo_logits.unsqueeze(1) + gumbel).argmax(dim=-1)  # (b, k)

        # Distinct samples as a keep mask; images that need no sampling keep all their tokens.
        keep = torch.zeros(b, width, dtype=torch.bool, device=cls_probs.device).scatter_(1, sampled, True)
        if valid is not None and not (self.batch_wide_sampling and trimmed):
            resample = draws if self.batch_wide_sampling else (count > k).unsqueeze(1)
            keep = torch.where(resample, keep, valid)

        # Compact in order: kept token j goes to slot cumsum(keep)[j] (1..k); the rest to a dump slot.
        slot = torch.where(keep, keep.cumsum(dim=1), k + 1)  # (b, n-1)
        positions = torch.arange(1, n, device=cls_probs.device).expand(b, width)
        ids = torch.zeros(b, k + 2, dtype=torch.long, device=cls_probs.device).scatter_(1, slot, positions)
        ids = ids[:, : k + 1]  # (b, k+1), CLS (0) first, padding 0
        kept = keep.sum(dim=1, keepdim=True)  # (b, 1)
        new_mask = torch.arange(k + 1, device=cls_probs.device) <= kept  # (b, k+1)
        return ids, new_mask


class PackedLayout(NamedTuple):
    """Index tensors of a ``Packed`` layout of images (one sequence each, CLS first), on one device."""

    image: Tensor  # (total,) the image of each packed token
    slot: Tensor  # (total,) its position in its image's sequence (0 = CLS)
    starts: Tensor  # (b,) the packed row of each image's CLS token
    lengths: Tensor  # (b,) tokens per image


def packed_layout(packed: Packed, device: torch.device) -> PackedLayout:
    """The index tensors of ``packed`` (built once per layout and device, cached on it)."""
    def build():
        image = packed.document_ids(device)[0].long()
        starts = torch.tensor(packed.offsets[:-1], device=device)
        return PackedLayout(image, torch.arange(packed.total, device=device) - starts[image], starts,
                            torch.tensor(packed.lengths, device=device))

    return packed.cached("ats_layout", device, build)


def pad_packed(rows: Tensor, layout: PackedLayout, width: int) -> Tensor:
    """Packed ``rows (total, *rest)`` -> ``(b, width, *rest)`` per image, zeros past each image's tokens."""
    out = rows.new_zeros(layout.starts.shape[0], width, *rows.shape[1:])
    return out.index_put((layout.image, layout.slot), rows)


class Attention(SelfAttention):
    """vit-pytorch's ATS attention (pre-norm inside). Keys: ``norm``, ``to_qkv``, ``to_out.0`` (always).

    Args:
        dim: token width. heads: attention heads. dim_head: width per head.
        dropout: dropout on the probabilities and the output projection.
        output_num_tokens: sample down to this many patch tokens when there are more (None: never).
        batch_wide_sampling: see ``AdaptiveTokenSampling``.
        trim_padding: cut the kept sets to the batch's widest one, which reads that width on the host
            (None: on the CPU outside ``torch.compile``, where the read costs nothing).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 output_num_tokens: Optional[int] = None, batch_wide_sampling: bool = False,
                 trim_padding: Optional[bool] = None):
        super().__init__(dim, heads, dim_head, dropout, project_out=True)
        self.trim_padding = trim_padding
        self.output_num_tokens = output_num_tokens
        self.ats = (AdaptiveTokenSampling(output_num_tokens, batch_wide_sampling=batch_wide_sampling)
                    if output_num_tokens is not None else None)

    def samples(self, num_tokens: int) -> bool:
        """Whether this layer samples a sequence of ``num_tokens`` (CLS included)."""
        return self.ats is not None and num_tokens - 1 > self.output_num_tokens

    def trims(self, x: Tensor) -> bool:
        """Whether kept sets are cut to the widest (``trim_padding``; None = on the CPU, eager)."""
        if self.trim_padding is not None:
            return self.trim_padding
        return x.device.type == "cpu" and not torch.compiler.is_compiling()

    def forward(self, x: Tensor, *, mask: Optional[Tensor] = None, uniforms: Optional[UniformStream] = None,
                cls_only: bool = False):
        """``x (b, n, dim)``, ``mask (b, n)`` or None -> ``(out, mask, ids)``.

        Without sampling ``out`` is ``(b, n, dim)`` and ``ids`` None; with sampling ``out`` is
        ``(b, m, dim)`` for the kept tokens ``ids (b, m)`` and ``mask`` is theirs. With ``cls_only``
        ``out`` is the CLS token's alone, ``(b, 1, dim)`` (the last layer of a logits-only forward).
        """
        b, n, _ = x.shape
        h, inner = self.heads, self.to_qkv.out_features // 3
        x = self.norm(x)
        bias = KeyPaddingMask(mask) if mask is not None else None
        samples = self.samples(n)
        if not samples and not cls_only:
            q, k, v = split_qkv(self.to_qkv(x), h)  # (b, h, n, d) each
            out = self.attend(q, k, v, scale=self.scale, bias=bias)
            return self.to_out(merge_heads(out)), mask, None

        # Keys and values of every token, but queries only for the tokens whose output is used: the
        # CLS token, then the kept ones (vit-pytorch projects queries for all, a third of to_qkv).
        k, v = split_qkv(self.to_qkv.forward_rows(x, inner, 3 * inner), h, parts=2)  # (b, h, n, d) each
        q_cls = split_heads(self.to_qkv.forward_rows(x[:, :1], 0, inner), h)  # (b, h, 1, d)
        if not samples:  # cls_only, nothing to sample: the CLS token's update alone
            out = self.attend(q_cls, k, v, scale=self.scale, bias=bias)
            return self.to_out(merge_heads(out)), mask, None

        trim = self.trims(x)
        cls = self.attend(q_cls, k, v, scale=self.scale, bias=bias, return_cls_probs=True)
        ids, new_mask = self.ats(cls.cls_probs, v, mask, uniforms, trimmed=trim)  # (b, k+1) each
        if trim:
            # The widest kept set, read on the host (free on the CPU, a sync on an accelerator).
            width = int(new_mask.sum(dim=1).max())
            ids, new_mask = ids[:, :width], new_mask[:, :width]
        if cls_only:
            return self.to_out(merge_heads(cls.out)), new_mask, ids
        # Only the kept queries attend; rows of (attn @ v) are (attn @ v) of those rows.
        q = split_heads(self.to_qkv.forward_rows(gather_tokens(x, ids), 0, inner), h)  # (b, h, m, d)
        out = self.attend(q, k, v, scale=self.scale, bias=bias)  # (b, h, m, d)
        return self.to_out(merge_heads(out)), new_mask, ids

    def forward_packed(self, x: Tensor, packed: Packed, *, uniforms: Optional[UniformStream] = None,
                       cls_only: bool = False) -> tuple[Tensor, Optional[Tensor], Packed, Optional[Tensor]]:
        """``forward`` on packed images: ``x (1, total, dim)``, one sequence per image, CLS first.

        Returns:
            ``(out, rows, kept, ids)``: ``out (1, m, dim)`` updates the rows ``rows (m,)`` of ``x``
            (None: every row); ``kept`` is the layout of the image tokens after the layer (a sampling
            layer's kept sets, whose per-image positions are ``ids (b, w)``, padded with 0, or None
            when it did not sample). With ``cls_only`` the rows are the CLS tokens alone.
        """
        h, inner = self.heads, self.to_qkv.out_features // 3
        x = self.norm(x)
        samples = self.samples(packed.max_len)
        if not samples and not cls_only:
            q, k, v = split_qkv(self.to_qkv(x), h)  # (1, h, total, d) each
            out = self.attend(q, k, v, scale=self.scale, packed=packed)
            return self.to_out(merge_heads(out)), None, packed, None

        layout = packed_layout(packed, x.device)
        k, v = split_qkv(self.to_qkv.forward_rows(x, inner, 3 * inner), h, parts=2)  # (1, h, total, d) each
        q_cls = split_heads(self.to_qkv.forward_rows(x[:, layout.starts], 0, inner), h)  # (1, h, b, d)
        one_query = Packed([1] * packed.num_sequences, packed.lengths)  # each CLS over its image's tokens
        if not samples:  # cls_only, nothing to sample
            out = self.attend(q_cls, k, v, scale=self.scale, packed=one_query)
            return self.to_out(merge_heads(out)), layout.starts, packed, None

        cls = self.attend(q_cls, k, v, scale=self.scale, packed=one_query, return_cls_probs=True)
        # The sampling reads each image's scores laid out per image, padding masked, as the padded path.
        width = packed.max_len
        cls_probs = pad_packed(cls.cls_probs[0].t(), layout, width).transpose(1, 2)  # (b, h, n)
        value_norms = pad_packed(v[0].norm(dim=-1).t(), layout, width).transpose(1, 2)[..., 1:]  # (b, h, n-1)
        mask = torch.arange(width, device=x.device) < layout.lengths.unsqueeze(1)  # (b, n)
        ids, new_mask = self.ats.sample(cls_probs, value_norms, mask, uniforms, trimmed=True)  # (b, k+1)
        kept = Packed(new_mask.sum(dim=1))  # the kept counts, read on the host: the new layout
        ids = ids[:, :kept.max_len]
        if cls_only:
            return self.to_out(merge_heads(cls.out)), layout.starts, kept, ids
        new = packed_layout(kept, x.device)
        rows = layout.starts[new.image] + ids[new.image, new.slot]  # (total',) the kept rows of x, in order
        q = split_heads(self.to_qkv.forward_rows(x[:, rows], 0, inner), h)  # (1, h, total', d)
        out = self.attend(q, k, v, scale=self.scale, packed=Packed(kept.lengths, packed.lengths))
        return self.to_out(merge_heads(out)), rows, kept, ids


def check_max_tokens(max_tokens_per_depth, depth: int) -> tuple:
    """vit-pytorch's asserts on ``max_tokens_per_depth`` as ValueErrors."""
    tokens = tuple(max_tokens_per_depth)
    if len(tokens) != depth:
        raise ValueError(f"max_tokens_per_depth must have one entry per layer (depth={depth}), "
                         f"got {len(tokens)}: {tokens}")
    if list(tokens) != sorted(tokens, reverse=True):
        raise ValueError(f"max_tokens_per_depth must be non-increasing, got {tokens}")
    if min(tokens) <= 0:
        raise ValueError(f"max_tokens_per_depth must keep at least 1 token at every layer, got {tokens}")
    return tokens


def ats_block(block: nn.ModuleList, x: Tensor, mask: Optional[Tensor], uniforms: UniformStream,
              cls_only: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """One block: ``(x, mask, ids)`` after it (``ids`` the kept positions when it sampled, else None)."""
    attn, ff = block
    attn_out, mask, ids = attn(x, mask=mask, uniforms=uniforms, cls_only=cls_only)
    if cls_only:
        x = x[:, :1]
    elif ids is not None:  # the residual stream keeps the sampled tokens
        x = gather_tokens(x, ids)
    x = x + attn_out
    return ff(x) + x, mask, ids


def ats_block_packed(block: nn.ModuleList, x: Tensor, packed: Packed, uniforms: UniformStream,
                     cls_only: bool) -> tuple[Tensor, Packed, Packed, Optional[Tensor]]:
    """One block on packed images: ``(x, layout of x, layout of the kept tokens, ids)`` after it."""
    attn, ff = block
    attn_out, rows, kept, ids = attn.forward_packed(x, packed, uniforms=uniforms, cls_only=cls_only)
    if rows is not None:  # the residual stream keeps the sampled tokens (or the CLS tokens alone)
        x = x[:, rows]
    x = x + attn_out
    layout = Packed([1] * packed.num_sequences) if cls_only else kept
    return ff(x) + x, layout, kept, ids


class Transformer(BlockRunner, nn.Module):
    """``depth`` x (ATS attention + MLP, each residual, norm inside); no final norm (vit-pytorch).

    Keys: ``layers.{i}.0`` (Attention), ``layers.{i}.1`` (FeedForward). With ``packed`` the blocks
    from the first sampling layer on run on the kept tokens packed (see the module docstring).
    """

    def __init__(self, dim: int, depth: int, max_tokens_per_depth, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float = 0.0, batch_wide_sampling: bool = False,
                 trim_padding: Optional[bool] = None, packed: bool = False):
        super().__init__()
        if packed and trim_padding is False:
            raise ValueError("packed=True lays out the kept tokens from their counts, read on the host; "
                             "trim_padding=False (fixed widths, no host read) cannot be combined with it")
        self.packed = packed
        self.max_tokens_per_depth = check_max_tokens(max_tokens_per_depth, depth)
        self.layers = nn.ModuleList([
            nn.ModuleList([
                Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout, output_num_tokens=num_tokens,
                          batch_wide_sampling=batch_wide_sampling, trim_padding=trim_padding),
                FeedForward(dim, mlp_dim, dropout=dropout),
            ])
            for num_tokens in self.max_tokens_per_depth
        ])

    def sampling_plan(self, batch: int, num_tokens: int) -> list:
        """Per layer that may sample, the most random numbers it draws: ``b * k * (fixed width)``."""
        plan = []
        for attn, _ in self.layers:
            if attn.samples(num_tokens):
                plan.append(batch * attn.output_num_tokens * (num_tokens - 1))
                num_tokens = attn.output_num_tokens + 1
        return plan

    def forward(self, x: Tensor, cls_only: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``x (b, n, dim)`` -> ``(x (b, m, dim), token_ids (b, m), mask (b, m) or None)``; padding id 0.

        With ``cls_only`` the last layer updates the CLS token alone (the only one the logits read),
        and ``x`` is ``(b, 1, dim)``; the token ids are the same.
        """
        b, n, _ = x.shape
        uniforms = UniformStream(self.sampling_plan(b, n))
        mask = None  # (b, m) bool once a layer has sampled; padding is last
        token_ids = torch.arange(n, device=x.device).expand(b, n)
        packed = kept = None  # with self.packed, from the first sampling layer: the layouts of x and of the kept
        for i, block in enumerate(self.layers):
            last = cls_only and i == len(self.layers) - 1
            if self.packed and packed is None and block[0].samples(x.shape[1]):
                # Every image has all its tokens until now: the batch is b packed sequences as it is.
                packed = kept = Packed([x.shape[1]] * b)
                x = x.reshape(1, -1, x.shape[-1])  # (1, b * n, dim)
            # A sampling block reads the stateful random stream: never recomputed.
            if packed is None:
                run = ats_block if block[0].samples(x.shape[1]) else partial(self.run_block, ats_block)
                x, mask, ids = run(block, x, mask, uniforms, last)
            else:
                run = ats_block_packed if block[0].samples(packed.max_len) else partial(self.run_block,
                                                                                        ats_block_packed)
                x, packed, kept, ids = run(block, x, packed, uniforms, last)
            if ids is not None:
                token_ids = token_ids.gather(1, ids)
            if self.taps is not None:
                self.tap(x if packed is None else pad_packed(x[0], packed_layout(packed, x.device), packed.max_len))
        if packed is not None:  # padded again for the head and forward_features: zeros in the padding slots
            x = pad_packed(x[0], packed_layout(packed, x.device), packed.max_len)
            lengths = packed_layout(kept, x.device).lengths
            mask = torch.arange(kept.max_len, device=x.device) < lengths.unsqueeze(1)
        return x, token_ids, mask


class ViT(ViTStem, VisionModel):
    """Adaptive token sampling ViT with vit-pytorch's constructor (``vit_pytorch.ats_vit.ViT``).

    Args:
        image_size, patch_size, num_classes, dim, depth, heads, mlp_dim: as ``ViT``'s.
        max_tokens_per_depth: per layer, the most patch tokens it keeps (non-increasing, length depth).
        channels: input channels. dim_head: width per head. dropout: attention/MLP dropout.
        emb_dropout: dropout after the position embedding.
        batch_wide_sampling: vit-pytorch's batch-wide sampling decision (see the module docstring).
        trim_padding: cut kept sets to the batch's widest (None: on the CPU; see the module docstring).
        packed: from the first sampling layer on, run the kept tokens of each image packed into one
            sequence instead of padded and masked (the same outputs; see the module docstring).
        legacy_pos_slicing: slice the flat position table for smaller inputs, as vit-pytorch does.
        legacy_num_classes_zero: ``num_classes=0`` keeps vit-pytorch's ``Linear(dim, 0)``.
    """

    classifier_path = "mlp_head.1"
    intermediates_from = "transformer"

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, max_tokens_per_depth, heads,
                 mlp_dim, channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0, batch_wide_sampling=False,
                 trim_padding=None, legacy_pos_slicing=False, legacy_num_classes_zero=False, packed=False):
        super().__init__()
        check_max_tokens(max_tokens_per_depth, depth)
        self.build_stem(image_size=image_size, patch_size=patch_size, channels=channels, dim=dim,
                        emb_dropout=emb_dropout, legacy_pos_slicing=legacy_pos_slicing)
        self.transformer = Transformer(dim, depth, max_tokens_per_depth, heads, dim_head, mlp_dim, dropout,
                                       batch_wide_sampling=batch_wide_sampling, trim_padding=trim_padding,
                                       packed=packed)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_classes))
        self.set_head(dim, num_classes, legacy_num_classes_zero)
        self.set_feature_info([dim] * depth, [self.patch_size[0]] * depth, "transformer.layers")

    def forward_tokens(self, img: Tensor, cls_only: bool = False) -> tuple[Tensor, Tensor]:
        """``(tokens (b, m, dim), token_ids (b, m - 1))``: CLS first, then the kept patches in order.

        ``token_ids`` are patch indices, ``-1`` for padding (whose token rows are meaningless). With
        ``cls_only`` the tokens are the CLS token alone, ``(b, 1, dim)`` (what the head reads).
        """
        x, token_ids, _ = self.transformer(self.dropout(self.embed(img)), cls_only=cls_only)
        return x, token_ids[:, 1:] - 1  # drop CLS; padding (id 0 = CLS) becomes -1

    def forward_features(self, img: Tensor) -> Tensor:
        """Every kept token ``(b, m, dim)``, CLS first then the kept patches (padding last), not normed."""
        return self.forward_tokens(img)[0]

    def pool_features(self, x: Tensor) -> Tensor:
        return self.mlp_head[0](x[:, 0])

    def forward(self, img: Tensor, return_sampled_token_ids: bool = False):
        """Logits ``(b, num_classes)``, and with ``return_sampled_token_ids`` the kept patch ids
        ``(b, k)`` of the last sampling layer (``-1`` = padding)."""
        x, token_ids = self.forward_tokens(img, cls_only=True)
        logits = self.forward_head(x)
        if return_sampled_token_ids:
            return logits, token_ids
        return logits


# Small enough for CPU tests; 16 patches and 16 tokens per layer, so no layer samples and the generic
# tests (which compare runs under different generator states) are deterministic. Sampling has its own
# tests in tests/models/test_ats_vit.py.
_SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, max_tokens_per_depth=(16, 16),
              heads=2, dim_head=16, mlp_dim=64)

for _name, _kw in {
    # DeiT-S / DeiT-B shapes with token budgets halving every three blocks from block 4 (196 patches).
    "ats_vit_small_patch16_224": dict(dim=384, heads=6, mlp_dim=1536,
                                      max_tokens_per_depth=(196,) * 3 + (128,) * 3 + (64,) * 3 + (32,) * 3),
    "ats_vit_base_patch16_224": dict(dim=768, heads=12, mlp_dim=3072,
                                     max_tokens_per_depth=(196,) * 3 + (128,) * 3 + (64,) * 3 + (32,) * 3),
}.items():
    register_model(_name, ViT, vit_pytorch="vit_pytorch.ats_vit:ViT", test_overrides=_SMALL,
                   image_size=224, patch_size=16, num_classes=1000, depth=12, **_kw)

# The seed README's example.
register_model("ats_vit_seed_patch16_256", ViT, vit_pytorch="vit_pytorch.ats_vit:ViT", test_overrides=_SMALL,
               input_size=(3, 256, 256), image_size=256, patch_size=16, num_classes=1000, dim=1024, depth=6,
               max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=16, mlp_dim=2048, dropout=0.1,
               emb_dropout=0.1)
