"""Accelerate timm's models in place: ``patch_timm(model)`` routes their attention through ``attend()``.

    import timm, fastvit
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True)
    fastvit.patch_timm(model)               # in place; returns the model
    fastvit.patch_timm(model, linear=True)  # also fastvit.layers.Linear + fused GELU in timm's Mlp
    fastvit.unpatch_timm(model)             # timm's classes again (debugging)

Each known timm module gets its class swapped for a fastvit subclass of that exact class (one small
module per family here, listed in ``FAMILIES``). Parameters, buffers, state_dict keys and
``isinstance`` are unchanged; unknown modules are left alone; call arguments with no mapping
(``is_causal``, bool masks) run timm's own forward. timm's ``fused_attn`` flags no longer choose the
kernel: fastvit's dispatch does, so ``fastvit.use_backend(...)`` applies to patched models.
``patch_summary(model)`` says what was patched, what was refused and why, and which calls fell back.
``torch.jit.script`` works on a patched model and compiles timm's own computation (``attend()`` does not
script; see ``_patch``); the eager model keeps fastvit's.
"""

from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from fastvit.extras import require

__all__ = ["patch_timm", "unpatch_timm", "patch_summary", "PatchSummary", "create_timm_model"]

FAMILIES = ("vit", "beit", "eva", "nest", "cait", "crossvit", "levit", "efficientformer", "swin", "swin_v2", "twins",
            "maxvit", "mobilevit", "naflexvit", "linear")


def _load() -> tuple:
    """The patch tables, after importing every family module (each registers its classes)."""
    require("timm", "fastvit.patch_timm")
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
    from ._patch import PATCHES, REFUSED

    return PATCHES, REFUSED


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class PatchSummary:
    """What ``patch_timm`` did to a model, as data (``str()`` gives the printed form).

    Attributes:
        patched: ``{timm class: modules now served by fastvit}``.
        refused: ``{timm class: (modules, reason)}``: known modules left as timm's.
        left_alone: ``{class: modules}``: attention-like modules fastvit has no mapping for.
        fallbacks: ``{timm class: {reason: calls}}``: calls that ran timm's own forward so far.
    """

    patched: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    left_alone: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = ["fastvit.patch_timm summary"]
        lines += [f"  patched  {n:4d} x {cls}" for cls, n in self.patched.items()]
        lines += [f"  refused  {n:4d} x {cls}: {why}" for cls, (n, why) in self.refused.items()]
        lines += [f"  unknown  {n:4d} x {cls}: no fastvit mapping, left as is" for cls, n in self.left_alone.items()]
        for cls, reasons in self.fallbacks.items():
            lines += [f"  fallback {n:4d} calls of {cls}: {why}" for why, n in reasons.items()]
        if len(lines) == 1:
            lines.append("  nothing to patch")
        return "\n".join(lines)


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return ("Attn" in name or "Attention" in name) and not type(module).__module__.startswith("torch.")


def patch_summary(model: nn.Module) -> PatchSummary:
    """What is patched in ``model``, what was refused (with reasons), and the calls that fell back."""
    from ._patch import FALLBACKS, Patched

    PATCHES, REFUSED = _load()
    patched, refused, unknown, fallbacks = Counter(), Counter(), Counter(), {}
    reasons = {}
    covered = set()  # modules inside a patched or refused one are not "unknown"
    for module in model.modules():
        cls = type(module)
        if isinstance(module, Patched):
            patched[_name(cls.timm_class)] += 1
            for reason, n in module.__dict__.get(FALLBACKS, {}).items():
                per = fallbacks.setdefault(_name(cls.timm_class), Counter())
                per[reason] += n
        elif cls in REFUSED or module.__dict__.get("_fastvit_refused"):
            why = module.__dict__.get("_fastvit_refused") or REFUSED[cls]
            refused[_name(cls)] += 1
            reasons[_name(cls)] = why
        else:
            continue
        # a model-level patch drives its submodules but serves none of them: they are counted on their own
        covered.update([id(module)] if isinstance(module, Patched) and cls.kind == "model" else
                       (id(m) for m in module.modules()))
    for module in model.modules():
        if id(module) not in covered and _looks_like_attention(module) and type(module) not in PATCHES:
            if not any(id(m) in covered for m in module.modules()):
                unknown[_name(type(module))] += 1
    return PatchSummary(dict(patched), {c: (n, reasons[c]) for c, n in refused.items()}, dict(unknown),
                        {c: dict(r) for c, r in fallbacks.items()})


def patch_timm(model: nn.Module, *, linear: bool = False, verbose: bool = False) -> nn.Module:
    """Serve a timm model's attention (and with ``linear=True`` its Linear / Mlp) from fastvit, in place.

    Args:
        model: a timm model (or any module containing timm modules); patching twice is harmless.
        linear: also swap ``nn.Linear`` for ``fastvit.layers.Linear`` (CPU inference: prepacked
            oneDNN weights) and fuse the exact GELU of timm's ``Mlp`` into ``fc1``.
        verbose: print ``patch_summary(model)``.

    Returns:
        ``model``.

    TorchScript: the patched modules script as they are (``torch.jit.script`` compiles timm's own
    computation for them, and leaves the eager model as it was), so timm's ``set_scriptable(True)``
    needs nothing different and is not consulted.
    """
    PATCHES, _ = _load()
    for module in model.modules():
        target = PATCHES.get(type(module))
        if target is None or (target.kind in ("linear", "mlp") and not linear) or not target.applies(module):
            continue
        why = target.unsupported(module)
        if why is not None:
            module.__dict__["_fastvit_refused"] = why
            continue
        module.__class__ = target
        target.adopt(module)
    if verbose:
        print(patch_summary(model))
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Restore timm's classes (and drop fastvit's caches): bit-identical to the unpatched model."""
    from ._patch import Patched

    for module in model.modules():
        if isinstance(module, Patched):
            module.__class__ = type(module).timm_class
        for key in [k for k in module.__dict__ if k.startswith("_fastvit") or k == "_packed"]:
            del module.__dict__[key]
    return model


def create_timm_model(name: str, *, pretrained: bool = False, linear: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=..., **kwargs)`` then ``patch_timm`` (``fastvit.create_model("timm/...")``).

    Weights come from timm's own download (Hugging Face Hub). Offline, a ``RuntimeError`` says the
    weights could not be downloaded and how to pass a local file instead.
    """
    require("timm", f"fastvit.create_model('timm/{name}')")
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:  # huggingface_hub's offline / not-found errors, URLError, a missing local file
        if not pretrained:
            raise
        raise RuntimeError(
            f"the pretrained weights of timm model {name!r} could not be downloaded or read ({type(e).__name__}: "
            f"{e}). Offline, pass a local checkpoint: fastvit.create_model('timm/{name}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='/path/to/model.safetensors')), or build it with pretrained=False"
        ) from e
    return patch_timm(model, linear=linear)
