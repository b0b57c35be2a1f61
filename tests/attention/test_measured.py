"""Measured backend orders (``fastvit tune``'s "dispatch" section) reorder CUDA auto dispatch per bucket."""

from __future__ import annotations

import json

import pytest
import torch

from fastvit.attention import RelPosBias, make_inputs, measured
from fastvit.attention.dispatch import auto_order

kattn = pytest.importorskip("fastvit.kernels.attention")
kattn_configs = pytest.importorskip("fastvit.kernels.attention_configs")


class _CudaInputs:
    """Real inputs that report device type "cuda" (no GPU here): auto_order looks at the device type only."""

    def __init__(self, inp):
        self._inp = inp

    def __getattr__(self, name):
        return getattr(self._inp, name)

    @property
    def device_type(self):
        return "cuda"


def _inputs(n=49, bias=False):
    q = torch.randn(2, 3, n, 32)
    table, index = torch.randn(2 * n, 3), torch.randint(0, 2 * n, (n, n))
    return make_inputs(q, q, q, bias=RelPosBias(table, index) if bias else None)


def _write_table(tmp_path, monkeypatch, section):
    monkeypatch.setattr(kattn_configs, "TUNED_DIR", str(tmp_path))
    path = tmp_path / (kattn.device_slug("cpu") + ".json")
    path.write_text(json.dumps({"device": "test", "entries": {}, "dispatch": section}))
    measured._CACHE.clear()
    return path


def test_key_names_dtype_bias_buckets_and_widths():
    assert measured.key_of(_inputs(49, bias=True)) == "fp32|relpos|q64|k64|d32x32"
    assert measured.key_of(_inputs(197)) == "fp32|none|q256|k256|d32x32"
    assert measured.order_key(torch.bfloat16, (), 1, 16, 64, 64) == "bf16|none|q16|k16|d64x64"


def test_a_measured_bucket_goes_first_and_the_rest_keep_the_default_order(tmp_path, monkeypatch):
    inp = _inputs(49, bias=True)
    _write_table(tmp_path, monkeypatch, {measured.key_of(inp): ["sdpa", "triton"]})
    default = ("triton", "flex", "xformers", "sdpa", "reference")
    assert measured.ordered(inp, default) == ("sdpa", "triton", "flex", "xformers", "reference")
    other = _inputs(197)  # another bucket: untouched
    assert measured.ordered(other, default) == default
    assert auto_order(_CudaInputs(inp)) == ("sdpa", "triton", "flex", "xformers", "reference")
    # unmeasured: a plain call goes to SDPA first, one that needs a fused kernel (CLS probabilities) to triton
    assert auto_order(_CudaInputs(other)) == ("sdpa", "triton", "flex", "xformers", "reference")
    q = torch.randn(2, 3, 197, 32)
    fused = make_inputs(q, q, q, return_cls_probs=True)
    assert auto_order(_CudaInputs(fused)) == ("triton", "flex", "xformers", "sdpa", "reference")


def test_no_table_or_a_broken_one_keeps_the_default(tmp_path, monkeypatch):
    inp = _inputs()
    monkeypatch.setattr(kattn_configs, "TUNED_DIR", str(tmp_path / "none"))
    measured._CACHE.clear()
    assert measured.ordered(inp, ("triton", "sdpa")) == ("triton", "sdpa")
    path = _write_table(tmp_path, monkeypatch, {})
    path.write_text("{not json")
    measured._CACHE.clear()
    with pytest.warns(RuntimeWarning, match="default CUDA order"):
        assert measured.ordered(inp, ("triton", "sdpa")) == ("triton", "sdpa")
