"""TorchScript on patched timm models: timm's own test suite scripts every model, directly and after fx.

Every family of ``test_timm_patch.CASES`` (same tiny builds) and XCiT, with and without
``linear=True``: the patched model scripts, the scripted model gives the patched eager model's outputs,
and scripting leaves the eager model as it was (same module objects, same fastvit classes, still
calling ``attend()``). TorchScript runs timm's computation (``attend()`` does not script, see
``fastvit/compat/timm/_patch.py``); fastvit's own models refuse ``torch.jit.script`` with one sentence.
"""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from helpers import assert_close
from test_timm_patch import CASES, Case, build, image, patched_names

timm = pytest.importorskip("timm")

import fastvit.attention.api as api  # noqa: E402
from fastvit.compat.timm import _load, patch_timm  # noqa: E402
from fastvit.compat.timm._patch import Patched  # noqa: E402
from fastvit.layers import Linear  # noqa: E402
from fastvit.layers.linear import prepack_enabled  # noqa: E402
from fastvit.models import get_model_entry  # noqa: E402

# XCiT's class-attention blocks are CaiT's ClassAttn (its XCA is left alone): a family of its own here.
SCRIPT_CASES = CASES + [Case("xcit", "xcit_nano_12_p16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                                 num_heads=2, cls_attn_layers=1), 32, ("ClassAttn",))]

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@pytest.fixture
def attend_calls(monkeypatch) -> list:
    """Appends one entry per eager ``attend()`` call (each forms its plan signature once)."""
    calls, signature = [], api.plan.signature

    def counting(*args, **kwargs):
        calls.append(1)
        return signature(*args, **kwargs)

    monkeypatch.setattr(api.plan, "signature", counting)
    return calls


def patched_features(case: Case, linear: bool = False) -> torch.nn.Module:
    """The case's model without its classifier (pooled features: timm's random-init heads are near zero
    and would hide a difference), patched."""
    model = build(case)
    model.reset_classifier(0)
    patch_timm(model, linear=linear)
    assert patched_names(model) >= set(case.patched)
    return model


def modules_and_classes(model: torch.nn.Module) -> dict:
    return {name: (id(m), type(m)) for name, m in model.named_modules()}


def script_and_check(model: torch.nn.Module, x: torch.Tensor, attend_calls: list, what: str):
    """Script ``model``; the scripted outputs equal the eager ones and the eager model is untouched."""
    with torch.no_grad():
        expected = model(x)
    before = modules_and_classes(model)
    scripted = torch.jit.script(model)
    # torch.jit.script writes whatever __prepare_scriptable__ returns back into the parents' _modules:
    # the eager model must keep its own module objects and their fastvit classes.
    assert modules_and_classes(model) == before, f"{what}: scripting changed the eager model"
    with torch.no_grad():
        out = scripted(x)
        del attend_calls[:]
        again = model(x)
    assert attend_calls, f"{what}: the eager model no longer calls attend() after scripting"
    assert torch.equal(again, expected)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"{what} scripted vs eager")
    return scripted


@pytest.mark.parametrize("linear", [False, True], ids=["attention", "linear"])
@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c.id for c in SCRIPT_CASES])
def test_patched_model_scripts_and_matches_eager(case, linear, attend_calls):
    model = patched_features(case, linear)
    if linear:  # levit-conv without its head has no Linear
        assert all(isinstance(m, Linear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    script_and_check(model, image(case), attend_calls, f"{case.id} linear={linear}")


def test_scripted_model_saves_and_loads(attend_calls):
    case = CASES[0]
    model = patch_timm(build(case), linear=True)
    x = image(case)
    scripted = script_and_check(model, x, attend_calls, "vit")
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(buffer)(x), scripted(x))


def test_every_patched_method_has_a_torchscript_branch():
    """Each method a fastvit subclass overrides starts with ``torch.jit.is_scripting()`` (attend() cannot
    be compiled) and has timm's own under ``_timm_<name>``: also for families no case above builds."""
    patches, _ = _load()
    checked = 0
    for timm_class, cls in patches.items():
        for klass in cls.__mro__[:cls.__mro__.index(timm_class)]:
            if not issubclass(klass, Patched) or klass is Patched:
                continue
            for name, fn in vars(klass).items():
                if inspect.isfunction(fn) and inspect.isfunction(getattr(timm_class, name, None)) \
                        and not name.startswith("__"):
                    body = inspect.getsource(fn).split(":\n", 1)[1].lstrip()
                    assert body.startswith("if torch.jit.is_scripting():"), f"{klass.__qualname__}.{name}"
                    assert getattr(cls, f"_timm_{name}").__code__ is getattr(timm_class, name).__code__
                    checked += 1
    assert checked >= len(patches) - 1  # every class but the Linear swap (its branch is in fastvit.layers)


def test_linear_with_a_prepacked_cache_scripts():
    layer = Linear(256, 256).eval()  # at PREPACK_MIN_WEIGHT: eager inference fills the oneDNN cache
    x = torch.randn(4, 256)
    with torch.inference_mode():
        expected = layer(x)
    assert layer._packed or not prepack_enabled()
    scripted = torch.jit.script(layer)
    with torch.no_grad():
        assert_close(scripted(x), expected, atol=1e-5, rtol=1e-5, what="scripted Linear")


def test_patch_under_timm_set_scriptable(attend_calls):
    """timm's ``set_scriptable(True)`` changes nothing: the patched modules script as they are."""
    case = next(c for c in CASES if c.id == "swin")
    with timm.layers.set_scriptable(True):
        assert timm.layers.is_scriptable()
        model = patched_features(case, linear=True)
    script_and_check(model, image(case), attend_calls, "swin under set_scriptable(True)")


@pytest.mark.parametrize("case", [CASES[0], next(c for c in CASES if c.id == "swin")], ids=["vit", "swin"])
def test_fx_trace_then_script(case, attend_calls):
    """timm's ``test_model_forward_fx_torchscript``: an fx feature extractor of the model (the patched
    classes are leaves), then ``torch.jit.script``."""
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    from timm.layers import get_notrace_functions, get_notrace_modules

    model = patched_features(case, linear=True)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = fx.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    graph = fx.create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                        eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs).eval()
    x = image(case)
    with torch.no_grad():
        (expected,) = graph(x).values()
        assert_close(expected, model(x), atol=1e-5, rtol=1e-5, what=f"{case.id} fx graph vs model")
    scripted = torch.jit.script(graph)
    assert all(isinstance(m, Patched) for m in graph.modules() if type(m).__name__ in case.patched)
    with torch.no_grad():
        (out,) = scripted(x).values()
        del attend_calls[:]
        graph(x)
    assert attend_calls, f"{case.id}: the fx graph no longer calls attend() after scripting"
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what=f"{case.id} fx + script vs eager")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_fastvit_models_refuse_scripting_with_one_sentence():
    entry = get_model_entry("vit_tiny_patch16_224")
    model = entry.build(**entry.test_overrides).eval()
    for target in (model, torch.nn.Sequential(model)):  # also as a wrapper's submodule
        with pytest.raises(RuntimeError, match=r"^ViT: fastvit models cannot be scripted .*use torch\.jit\.trace, "
                                               r"torch\.export or torch\.compile, which work$"):
            torch.jit.script(target)
    x = torch.randn(1, *entry.test_input())
    with torch.no_grad():
        assert_close(torch.jit.trace(model, x)(x), model(x), atol=1e-5, rtol=1e-5, what="traced fastvit ViT")
