"""Export of every registered preset (built with its small test_overrides; presets whose test build is
the same model are exported once): ``torch.jit.trace`` (outputs equal to eager within 1e-5 on the traced
input and on another one) and legacy ``torch.onnx.export`` (TorchScript-based), whose graph onnxruntime
runs within 1e-4 of eager; ``torch.onnx.export(dynamo=True)`` on a ViT and a hierarchical model (it
takes seconds per model; a one-off run exported all 49 presets with it, every one within 1e-6).

The CPU Linear's oneDNN prepacked path (``fastvit.layers.linear``) must step aside while tracing: every
test forces it on for every Linear (``PREPACK_MIN_WEIGHT = 0``; the small test models would otherwise
stay under the size where it starts) and checks that eager used it, so the exports are the real case.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import assert_close

import fastvit
import fastvit.layers.linear as linear_module
from fastvit.models import get_model_entry, list_models

MODELS = list_models()


def _distinct_builds() -> list:
    """Presets grouped by the model their test arguments build (same constructor and arguments): the
    five ViT presets differ only in sizes that their test_overrides replace, so one export tests them all."""
    groups = {}
    for name in MODELS:
        entry = get_model_entry(name)
        key = (entry.constructor, repr(sorted({**entry.kwargs, **entry.test_overrides}.items())), entry.test_input())
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def group_id(names: list) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"


BUILDS = _distinct_builds()
DYNAMO_MODELS = ["vit_tiny_patch16_224", "cvt_13"]  # a ViT and a hierarchical model (conv projections)

# Exports are for one input size: the shape checks a trace turns into constants are expected, and the
# legacy exporter's deprecation notice is what this file tests on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]


@pytest.fixture(autouse=True)
def _prepack_every_linear(monkeypatch):
    monkeypatch.setattr(linear_module, "PREPACK_MIN_WEIGHT", 0)
    monkeypatch.delenv("FASTVIT_CPU_PREPACK", raising=False)


def build(name: str, seed: int = 0):
    entry = get_model_entry(name)
    torch.manual_seed(seed)
    return entry, entry.build(**entry.test_overrides).eval()


def inputs(entry, batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(0)
    size = entry.test_input()
    return torch.randn(batch, *size, generator=g), torch.randn(batch, *size, generator=g)


def first(out):
    """Models with extra outputs (distillation heads) return tuples; the logits come first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def eager(model, *xs) -> list:
    """Eager outputs, checking that the prepacked path served them where this CPU has it."""
    with torch.no_grad():
        outs = [first(model(x)) for x in xs]
    linears = [m for m in model.modules() if isinstance(m, linear_module.Linear)]
    if linears and linear_module.prepack_enabled():
        assert any(m._packed for m in linears), "eager inference did not take the prepacked path"
    return outs


def run_onnxruntime(model_bytes: bytes, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]))


def assert_standard_onnx(model_bytes: bytes, what: str) -> None:
    """Only operators of the standard ONNX domain: nothing of oneDNN or a custom domain leaked in."""
    graph = onnx.load_from_string(model_bytes).graph
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    assert not foreign, f"{what}: non-standard ONNX operators {foreign}"


@pytest.mark.parametrize("names", BUILDS, ids=[group_id(g) for g in BUILDS])
def test_jit_trace_and_legacy_onnx_match_eager(names):
    name = names[0]
    entry, model = build(name)
    x, other = inputs(entry)
    expected = eager(model, x, other)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        for inp, ref, which in ((x, expected[0], "traced input"), (other, expected[1], "another input")):
            assert_close(first(traced(inp)), ref, atol=1e-5, rtol=1e-5, what=f"{name} jit.trace, {which}")
    assert "mkldnn" not in str(traced.inlined_graph), f"{name}: the traced graph calls oneDNN's prepacked op"

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    model_bytes = buffer.getvalue()
    assert_standard_onnx(model_bytes, name)
    for inp, ref, which in ((x, expected[0], "exported input"), (other, expected[1], "another input")):
        assert_close(run_onnxruntime(model_bytes, inp), ref, atol=1e-4, rtol=1e-4,
                     what=f"{name} legacy ONNX in onnxruntime, {which}")


def test_the_builds_cover_every_preset():
    assert sorted(n for names in BUILDS for n in names) == MODELS


@pytest.mark.parametrize("name", DYNAMO_MODELS)
def test_dynamo_onnx_export_runs_in_onnxruntime(name):
    entry, model = build(name)
    x, other = inputs(entry)
    expected = eager(model, x, other)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    model_bytes = program.model_proto.SerializeToString()
    assert_standard_onnx(model_bytes, name)
    for inp, ref, which in ((x, expected[0], "exported input"), (other, expected[1], "another input")):
        assert_close(run_onnxruntime(model_bytes, inp), ref, atol=1e-4, rtol=1e-4,
                     what=f"{name} dynamo ONNX in onnxruntime, {which}")


def test_full_size_vit_tiny_exports_with_the_default_prepack_threshold(monkeypatch):
    """The reported case: vit_tiny_patch16_224 at full size ("Unsupported value kind: Tensor" before)."""
    monkeypatch.setattr(linear_module, "PREPACK_MIN_WEIGHT", 256 * 256)
    torch.manual_seed(0)
    model = fastvit.create_model("vit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    (expected,) = eager(model, x)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    assert_close(run_onnxruntime(buffer.getvalue(), x), expected, atol=1e-4, rtol=1e-4, what="vit_tiny legacy ONNX")


def test_linear_traces_to_a_plain_linear_under_fx_and_torch_export():
    layer = linear_module.Linear(64, 32).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = layer(x)
        if linear_module.prepack_enabled():
            assert layer._packed, "eager inference did not take the prepacked path"
        fx_graph = torch.fx.symbolic_trace(layer)
        exported = torch.export.export(layer, (x,))
    assert "mkldnn" not in fx_graph.code and "mkldnn" not in str(exported.graph)
    assert_close(fx_graph(x), expected, atol=1e-6, rtol=1e-6, what="fx-traced Linear")
    assert_close(exported.module()(x), expected, atol=1e-6, rtol=1e-6, what="torch.export-ed Linear")
