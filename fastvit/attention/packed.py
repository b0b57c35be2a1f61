"""Packed variable-length sequences: many sequences of different lengths in one call, no padding.

    from fastvit.attention import Packed, attend
    packed = Packed([196, 49, 120])             # three images' tokens, concatenated
    out = attend(q, k, v, packed=packed)        # q, k, v: [1, H, 365, D]

Sequence ``i`` holds queries ``offsets[i]:offsets[i + 1]`` and keys ``kv_offsets[i]:kv_offsets[i + 1]``
(cross attention: ``kv_lengths``, e.g. one pooling query per image over the image's tokens) and
attends only to its own keys. A ``Packed`` is validated once, when it is built, and caches its
offsets, its maximum lengths and, per device, what backends derive from it (the document ids of
each token, a FlexAttention block mask), so build it once per batch layout and pass it to every
layer.

Biases compose where they are per sequence: a ``DenseBias``, ``KeyBias`` or ``RelPosBias`` over the packed
tokens (broadcastable to ``[1, H, sum(lengths), sum(kv_lengths)]``) is read in each sequence's own
diagonal block only. A ``KeyPaddingMask`` is refused (packing has no padding: leave the padded tokens
out of the lengths), and so is a window. ``return_cls_probs`` gives, packed as ``[1, H,
sum(kv_lengths)]``, the probabilities of each sequence's first query over its own keys;
``return_probs`` gives ``[1, H, Nq, Nk]`` with zeros outside the diagonal blocks.

Backends without a variable-length kernel serve a packed call with the helpers below:
``per_sequence`` (one call per sequence: the reference, the ground truth) and ``bucketed`` (the
sequences of equal lengths stacked into one batch, one call per distinct length pair: SDPA).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .bias import ADDITIVE, DenseBias, KeyBias, KeyPaddingMask, RelPosBias

__all__ = ["Packed", "per_sequence", "bucketed", "validate_packed"]


def _as_lengths(values, name: str) -> tuple[int, ...]:
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor or a list of ints, got a tensor of shape "
                             f"{tuple(values.shape)} and dtype {values.dtype}")
        values = values.tolist()  # one host sync, when the layout is built
    try:
        lengths = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a 1-D integer tensor or a list of ints, "
                         f"got {type(values).__name__}") from None
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"{name}[{i}] = {n!r} is not an int")
        if n <= 0:
            raise ValueError(f"{name}[{i}] = {n}: every sequence needs at least one token")
    if not lengths:
        raise ValueError(f"{name} is empty: a packed call needs at least one sequence")
    return lengths


def _offsets(lengths: tuple[int, ...]) -> tuple[int, ...]:
    out, total = [0], 0
    for n in lengths:
        total += n
        out.append(total)
    return tuple(out)


class Packed:
    """The layout of a packed call: ``lengths`` query tokens per sequence and ``kv_lengths`` keys.

    Args:
        lengths: the number of tokens of each sequence (a list of ints or a 1-D integer tensor).
        kv_lengths: the number of keys of each sequence (cross attention); default ``lengths``.

    Raises:
        ValueError: a length is not a positive int (naming its index), there are none, or
            ``kv_lengths`` has a different number of sequences.

    Two layouts with the same lengths are equal (and hash alike), so a model may build its
    ``Packed`` per call and still reuse ``attend``'s cached plans.
    """

    __slots__ = ("lengths", "kv_lengths", "offsets", "kv_offsets", "max_len", "kv_max_len", "_hash", "_cache",
                 "__weakref__")

    def __init__(self, lengths: Union[Sequence[int], Tensor], kv_lengths: Union[Sequence[int], Tensor, None] = None):
        self.lengths = _as_lengths(lengths, "lengths")
        self.kv_lengths = self.lengths if kv_lengths is None else _as_lengths(kv_lengths, "kv_lengths")
        if len(self.kv_lengths) != len(self.lengths):
            raise ValueError(f"kv_lengths has {len(self.kv_lengths)} sequences, lengths has {len(self.lengths)}: "
                             f"each query sequence needs its keys")
        self.offsets, self.kv_offsets = _offsets(self.lengths), _offsets(self.kv_lengths)
        self.max_len, self.kv_max_len = max(self.lengths), max(self.kv_lengths)
        self._hash = hash((self.lengths, self.kv_lengths))
        self._cache: dict = {}

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        """Query tokens of the call: ``sum(lengths)``."""
        return self.offsets[-1]

    @property
    def kv_total(self) -> int:
        """Keys of the call: ``sum(kv_lengths)``."""
        return self.kv_offsets[-1]

    @property
    def is_self(self) -> bool:
        """Queries and keys have the same lengths (self-attention)."""
        return self.kv_lengths == self.lengths

    def __eq__(self, other) -> bool:
        return isinstance(other, Packed) and self.lengths == other.lengths and self.kv_lengths == other.kv_lengths

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        kv = "" if self.is_self else f", kv_lengths={list(self.kv_lengths)}"
        return f"Packed(lengths={list(self.lengths)}{kv})"

    def describe(self) -> str:
        """A short id such as ``packed3-max196`` (``packed3-max196-kv1`` for one-query cross attention)."""
        kv = "" if self.is_self else f"-kvmax{self.kv_max_len}"
        return f"packed{self.num_sequences}-max{self.max_len}{kv}"

    def cached(self, name: str, device: torch.device, build: Callable[[], object]):
        """``build()`` once per (name, device) for this layout (document ids, block masks, ...)."""
        key = (name, device)
        try:
            return self._cache[key]
        except KeyError:
            return self._cache.setdefault(key, build())

    def document_ids(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(doc_q [total], doc_k [kv_total])`` int32: the sequence of each query and key token."""
        def build():
            ids = torch.arange(self.num_sequences, dtype=torch.int32, device=device)
            doc_q = torch.repeat_interleave(ids, torch.tensor(self.lengths, device=device))
            doc_k = doc_q if self.is_self else torch.repeat_interleave(ids, torch.tensor(self.kv_lengths,
                                                                                          device=device))
            return doc_q, doc_k

        return self.cached("document_ids", device, build)

    def buckets(self) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
        """``((length, kv_length), sequence indices)`` per distinct length pair, in order of first sight."""
        found: dict = {}
        for i, pair in enumerate(zip(self.lengths, self.kv_lengths)):
            found.setdefault(pair, []).append(i)
        return tuple((pair, tuple(seqs)) for pair, seqs in found.items())


def validate_packed(inp) -> None:
    """The checks of a packed call (``inputs.validate_inputs`` calls it): ``ValueError`` naming the values."""
    packed, q, k = inp.packed, inp.q, inp.k
    if not isinstance(packed, Packed):
        raise ValueError(f"packed must be a fastvit.attention.Packed, got {type(packed).__name__}")
    if inp.window is not None:
        raise ValueError("packed sequences cannot be combined with a window")
    if q.shape[0] != 1:
        raise ValueError(f"a packed call holds every sequence on the token axis of one batch element: q must be "
                         f"[1, H, sum(lengths), D], got {tuple(q.shape)}")
    if q.shape[2] != packed.total or k.shape[2] != packed.kv_total:
        raise ValueError(f"{packed!r} needs Nq = sum(lengths) = {packed.total} and Nk = sum(kv_lengths) = "
                         f"{packed.kv_total}, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    H, target = q.shape[1], (1, q.shape[1], packed.total, packed.kv_total)
    for b in inp.bias:
        for name, t in (("table", getattr(b, "table", None)), ("index", getattr(b, "index", None)),
                        ("tensor", getattr(b, "tensor", None)), ("mask", getattr(b, "mask", None))):
            if t is not None and t.device != q.device:
                raise ValueError(f"{type(b).__name__} {name} is on {t.device} but q is on {q.device}")
        if isinstance(b, KeyPaddingMask):
            raise ValueError("KeyPaddingMask cannot be combined with packed sequences: packing has no padding, "
                             "leave the padded tokens out of the lengths")
        if isinstance(b, RelPosBias):
            if b.table.shape[1] != H:
                raise ValueError(f"RelPosBias table has {b.table.shape[1]} heads, q has {H}")
            if tuple(b.index.shape) != target[2:]:
                raise ValueError(f"RelPosBias index has shape {tuple(b.index.shape)}; a packed call's index is over "
                                 f"the packed tokens: expected (sum(lengths), sum(kv_lengths)) = {target[2:]}")
        elif isinstance(b, ADDITIVE):
            t, name = b.materialize(), type(b).__name__
            if any(s not in (1, want) for s, want in zip(t.shape, target)):
                raise ValueError(f"{name} of shape {tuple(b.tensor.shape)} does not broadcast to [1, H, "
                                 f"sum(lengths), sum(kv_lengths)] = {target} (a packed bias is over the packed "
                                 f"tokens; each sequence reads its own diagonal block)")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {t.dtype}")


def _slice_bias(bias: tuple, q0: int, q1: int, k0: int, k1: int) -> tuple:
    """The descriptors of one sequence: its diagonal block of each bias."""
    out = []
    for b in bias:
        if isinstance(b, RelPosBias):
            out.append(RelPosBias(b.table, b.index[q0:q1, k0:k1]))
        elif isinstance(b, KeyBias):  # its keys: the sequence's columns
            t = b.tensor
            out.append(KeyBias(t[..., k0:k1] if t.shape[-1] != 1 else t))
        elif isinstance(b, DenseBias):
            t = b.tensor
            rows = slice(q0, q1) if t.dim() >= 2 and t.shape[-2] != 1 else slice(None)
            cols = slice(k0, k1) if t.shape[-1] != 1 else slice(None)
            out.append(DenseBias(t[..., rows, cols]))
        else:
            out.append(b)
    return tuple(out)


def _sequence_inputs(inp, q, k, v, bias):
    return dataclasses.replace(inp, q=q, k=k, v=v, bias=bias, packed=None)


def _output(out: Tensor, probs: Optional[Tensor], cls_probs: Optional[Tensor]):
    from .inputs import AttnOutput  # inputs.py imports this module to validate

    return AttnOutput(out, probs, cls_probs)


def _assemble(inp, outs: list, probs: Optional[list], cls_rows: Optional[list]):
    """The packed call's ``AttnOutput`` from each sequence's, in sequence order."""
    packed = inp.packed
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    full = None
    if probs is not None:  # zeros outside the diagonal blocks
        full = inp.q.new_zeros((1, inp.q.shape[1], packed.total, packed.kv_total), dtype=probs[0].dtype)
        for i, p in enumerate(probs):
            full[..., packed.offsets[i]:packed.offsets[i + 1], packed.kv_offsets[i]:packed.kv_offsets[i + 1]] = p[0]
    cls = torch.cat(cls_rows, dim=2) if cls_rows is not None else None
    return _output(out, full, cls)


def per_sequence(inp, fn: Callable):
    """Serve a packed call with one ``fn(inputs)`` call per sequence (its slices of q, k, v and its
    diagonal block of each bias), outputs concatenated: the ground truth, and what any backend's
    single-sequence path gives."""
    packed = inp.packed
    outs, probs, cls_rows = [], [] if inp.return_probs else None, [] if inp.return_cls_probs else None
    for i in range(packed.num_sequences):
        q0, q1, k0, k1 = packed.offsets[i], packed.offsets[i + 1], packed.kv_offsets[i], packed.kv_offsets[i + 1]
        res = fn(_sequence_inputs(inp, inp.q[:, :, q0:q1], inp.k[:, :, k0:k1], inp.v[:, :, k0:k1],
                                  _slice_bias(inp.bias, q0, q1, k0, k1)))
        outs.append(res.out)
        if probs is not None:
            probs.append(res.probs)
        if cls_rows is not None:
            cls_rows.append(res.cls_probs)
    return _assemble(inp, outs, probs, cls_rows)


def bucketed(inp, fn: Callable):
    """Serve a packed call with one ``fn(inputs)`` call per distinct (length, kv_length): the sequences
    of a bucket stacked on the batch axis (a single sequence, or all of them when every length is
    the same, is a view: no copy). Biases are per sequence, so a biased call runs `per_sequence`."""
    packed = inp.packed
    if inp.bias or inp.return_probs or inp.head_mix is not None:
        return per_sequence(inp, fn)
    q, k, v = inp.q, inp.k, inp.v
    if len(packed.buckets()) == 1:  # every sequence alike: [1, H, n * L, D] is [n, H, L, D] as a strided view
        n = packed.num_sequences
        (length, kv_length), _ = packed.buckets()[0]

        def batch(t, size):
            return t[0].unflatten(1, (n, size)).transpose(0, 1)  # (n, h, size, d)

        res = fn(_sequence_inputs(inp, batch(q, length), batch(k, kv_length), batch(v, kv_length), ()))
        out = res.out.transpose(0, 1).flatten(1, 2).unsqueeze(0)  # (1, h, n * length, dv)
        cls = res.cls_probs.transpose(0, 1).flatten(1, 2).unsqueeze(0) if res.cls_probs is not None else None
        return _output(out, None, cls)
    # Each bucket's outputs are written into one buffer in token-major memory, (1, total, h, dv) seen as
    # (1, h, total, dv): a sequence's rows are one contiguous block there, and the model's head merge
    # (transpose + reshape) is then a view, not a copy. A concatenation along the token axis of the
    # head-major pieces cost a copy here and another one in the merge (NaViT: 11% of its forward on a CPU).
    out = cls = None
    for (length, kv_length), seqs in packed.buckets():
        def stack(t, offsets, size, seqs=seqs):
            if len(seqs) == 1:
                return t[:, :, offsets[seqs[0]]:offsets[seqs[0]] + size]
            return torch.cat([t[:, :, offsets[i]:offsets[i] + size] for i in seqs], dim=0)

        res = fn(_sequence_inputs(inp, stack(q, packed.offsets, length), stack(k, packed.kv_offsets, kv_length),
                                  stack(v, packed.kv_offsets, kv_length), ()))
        if out is None:  # the backend's output dtype (autocast may differ from q's)
            heads, dv = res.out.shape[1], res.out.shape[-1]
            out = res.out.new_empty((1, packed.total, heads, dv)).transpose(1, 2)
            if res.cls_probs is not None:
                cls = res.cls_probs.new_empty((1, heads, packed.kv_total))
        for j, i in enumerate(seqs):
            start = packed.offsets[i]
            out[:, :, start:start + length] = res.out[j:j + 1]
            if cls is not None:
                kv_start = packed.kv_offsets[i]
                cls[:, :, kv_start:kv_start + kv_length] = res.cls_probs[j:j + 1]
    return _output(out, None, cls)
