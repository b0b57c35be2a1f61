"""Invalid inputs raise ValueError naming the shapes and values, before any backend runs."""

from __future__ import annotations

import pytest
import torch

from fastvit.attention import DenseBias, HeadMix, KeyPaddingMask, RelPosBias, attend


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=t(2, 3, 5), k=t(2, 3, 5), v=t(2, 3, 5)), r"q must be \[B, H, N, D\], got shape \(2, 3, 5\)"),
        (dict(q=t(2, 3, 5, 8), k=t(2, 3, 5, 8), v=t(2, 3, 6, 8)), r"k and v sequence lengths differ"),
        (dict(q=t(2, 3, 5, 8), k=t(2, 3, 5, 4), v=t(2, 3, 5, 8)), r"q and k head dims differ"),
        (dict(q=t(2, 3, 5, 8), k=t(1, 3, 5, 8), v=t(1, 3, 5, 8)), r"batch and head dims must match"),
        (dict(q=t(2, 3, 5, 8), k=t(2, 3, 5, 8, dtype=torch.bfloat16), v=t(2, 3, 5, 8)), r"dtypes differ"),
        (dict(q=t(2, 3, 5, 8).long(), k=t(2, 3, 5, 8).long(), v=t(2, 3, 5, 8).long()), r"floating point"),
        (dict(q=t(2, 3, 5, 8), k=t(2, 3, 5, 8), v=t(2, 3, 5, 8), dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (dict(q=t(2, 3, 5, 8), k=t(2, 3, 5, 8), v=t(2, 3, 5, 8), bias=t(1, 3, 5, 5)), r"not raw tensors"),
    ],
)
def test_bad_tensors(kwargs, match):
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, **kwargs)


def test_relpos_index_out_of_range_names_the_range():
    with pytest.raises(ValueError, match=r"index values span \[0, 12\] but the table has 10 rows"):
        RelPosBias(t(10, 3), torch.tensor([[0, 12], [3, 4]]))
    with pytest.raises(ValueError, match=r"span \[-1, 4\]"):
        RelPosBias(t(10, 3), torch.tensor([[0, -1], [3, 4]]))


def test_relpos_checks_reuse_cached_range_but_see_in_place_edits():
    index = torch.zeros(4, 4, dtype=torch.long)
    RelPosBias(t(3, 2), index)
    index[0, 0] = 7  # bumps the version counter: the cached range must not be trusted
    with pytest.raises(ValueError, match="span"):
        RelPosBias(t(3, 2), index)


@pytest.mark.parametrize(
    "bias,match",
    [
        (lambda: RelPosBias(t(10, 4), torch.zeros(5, 5, dtype=torch.long)), r"table has 4 heads, q has 3"),
        (lambda: RelPosBias(t(10, 3), torch.zeros(5, 6, dtype=torch.long)), r"index has shape \(5, 6\), expected"),
        (lambda: RelPosBias(t(10, 3), torch.zeros(5, 5)), r"integer tensor"),
        (lambda: DenseBias(t(2, 3, 5, 4)), r"DenseBias of shape \(2, 3, 5, 4\) does not broadcast to"),
        (lambda: DenseBias(t(3, 3, 5, 5)), r"does not broadcast"),
        (lambda: KeyPaddingMask(torch.ones(2, 6, dtype=torch.bool)), r"KeyPaddingMask has shape \(2, 6\), expected"),
        (lambda: KeyPaddingMask(torch.ones(2, 5)), r"must be a bool tensor"),
        (lambda: KeyPaddingMask(torch.ones(2, 1, 5, dtype=torch.bool)), r"must be \[B, Nk\]"),
    ],
)
def test_bad_bias(bias, match):
    with pytest.raises(ValueError, match=match):
        attend(t(2, 3, 5, 8), t(2, 3, 5, 8), t(2, 3, 5, 8), bias=bias())


def test_bad_head_mix():
    with pytest.raises(ValueError, match=r"square \[H, H\]"):
        HeadMix(pre=t(3, 4))
    with pytest.raises(ValueError, match=r"HeadMix.post is \(4, 4\) but q has 3 heads"):
        attend(t(2, 3, 5, 8), t(2, 3, 5, 8), t(2, 3, 5, 8), head_mix=HeadMix(post=t(4, 4)))
