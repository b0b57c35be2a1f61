"""Model registry: ``create_model(name, **overrides)``, ``list_models(pattern)``.

Each entry is a preset: a constructor plus a small ``dict`` of arguments. Entries may also say
which vit-pytorch class builds the same model (for parity tests and benchmarks) and which smaller
arguments keep a CPU test fast (``test_overrides``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .base import VisionModel, default_pretrained_cfg

__all__ = ["ModelEntry", "register_model", "create_model", "list_models", "get_model_entry", "model_entries"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    kwargs: dict = field(default_factory=dict)
    vit_pytorch: Optional[str] = None  # "module:attr" of the equivalent vit-pytorch constructor
    test_overrides: dict = field(default_factory=dict)
    input_size: tuple = (3, 224, 224)
    description: str = ""
    test_input_size: Optional[tuple] = None
    # fastvit arguments that restore vit-pytorch's behaviour where a deliberate fix changes outputs
    # (the parity test builds the fastvit side with them).
    vit_pytorch_compat: dict = field(default_factory=dict)
    # timm's model of the same sizes (benchmarks compare against it) and its extra create_model kwargs
    timm: Optional[str] = None
    timm_kwargs: dict = field(default_factory=dict)
    # what differs from default_pretrained_cfg's data config (e.g. the paper's crop_pct)
    pretrained_cfg: dict = field(default_factory=dict)
    # where timm's model differs in the work it does (benchmarks print it beside the ratio)
    timm_note: str = ""

    def input_size_for(self, overrides: dict) -> tuple:
        """``(c, h, w)`` of an input for the model built with ``overrides`` (tests use test_overrides)."""
        kwargs = {**self.kwargs, **overrides}
        size = kwargs.get("image_size", kwargs.get("img_size"))
        channels = kwargs.get("in_channels", kwargs.get("channels", kwargs.get("n_input_channels", self.input_size[0])))
        if not isinstance(channels, int):  # MobileViT's ``channels`` lists its conv widths
            channels = self.input_size[0]
        if size is None:
            return self.input_size
        h, w = size if isinstance(size, (tuple, list)) else (size, size)
        return (channels, h, w)

    def test_input(self) -> tuple:
        return self.test_input_size or self.input_size_for(self.test_overrides)

    def build(self, **overrides) -> nn.Module:
        model = self.constructor(**{**self.kwargs, **overrides})
        if isinstance(model, VisionModel):
            model.pretrained_cfg = self.pretrained_cfg_for(overrides, num_classes=model.num_classes)
        return model

    def pretrained_cfg_for(self, overrides: dict, **extra) -> dict:
        """timm's data config of the preset built with ``overrides`` (``timm.data.resolve_data_config``)."""
        return default_pretrained_cfg(self.input_size_for(overrides), architecture=self.name, **self.pretrained_cfg,
                                      **extra)

    def build_vit_pytorch(self, **overrides) -> nn.Module:
        """The same preset built with vit-pytorch (which must be installed)."""
        if self.vit_pytorch is None:
            raise ValueError(f"{self.name} has no vit-pytorch equivalent")
        import importlib

        module, attr = self.vit_pytorch.split(":")
        return getattr(importlib.import_module(module), attr)(**{**self.kwargs, **overrides})


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, constructor: Callable[..., nn.Module], *, vit_pytorch: Optional[str] = None,
                   test_overrides: Optional[dict] = None, input_size: tuple = (3, 224, 224),
                   test_input_size: Optional[tuple] = None, description: str = "",
                   vit_pytorch_compat: Optional[dict] = None, timm: Optional[str] = None,
                   timm_kwargs: Optional[dict] = None, pretrained_cfg: Optional[dict] = None, timm_note: str = "",
                   **kwargs) -> ModelEntry:
    """Register a preset. ``kwargs`` are the constructor arguments of the preset.

    Args:
        name: preset name (``vit_small_patch16_224``).
        constructor: a class or factory taking keyword arguments.
        vit_pytorch: ``"module:attr"`` of vit-pytorch's equivalent constructor, if any.
        test_overrides: small arguments that keep a CPU test fast.
        input_size: ``(c, h, w)`` of the preset's input.
        test_input_size: ``(c, h, w)`` of the input for ``test_overrides`` (derived from its
            ``image_size`` / ``img_size`` when not given).
        description: one line for listings.
        vit_pytorch_compat: fastvit arguments that reproduce vit-pytorch's outputs where a documented
            bug fix changes them (e.g. ``{"legacy_dpb_offsets": True}``).
        timm: the name of timm's model of the same sizes, if any (``timm.create_model(timm,
            **timm_kwargs)``); its own block details (qkv bias, conv patch embedding) stay timm's.
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. mean pooling).
        pretrained_cfg: data-config values that differ from ``default_pretrained_cfg`` (``crop_pct``).
        timm_note: where timm's model does different work (benchmarks print it beside the x timm ratio).
    """
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    entry = ModelEntry(name, constructor, dict(kwargs), vit_pytorch, dict(test_overrides or {}),
                       tuple(input_size), description, tuple(test_input_size) if test_input_size else None,
                       dict(vit_pytorch_compat or {}), timm, dict(timm_kwargs or {}), dict(pretrained_cfg or {}),
                       timm_note)
    _REGISTRY[name] = entry
    return entry


def get_model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = fnmatch.filter(_REGISTRY, f"*{name}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see fastvit.list_models())") from None


TIMM_PREFIX = "timm/"


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered preset, with any constructor argument overridden.

    ``"timm/<name>"`` builds timm's model instead (``timm.create_model(name, pretrained=..., **overrides)``,
    timm's own weights download) and patches it in place with ``fastvit.patch_timm`` (``linear=True``
    also swaps its Linear layers).
    """
    if name.startswith(TIMM_PREFIX):
        from fastvit.compat.timm import create_timm_model

        return create_timm_model(name[len(TIMM_PREFIX):], **overrides)
    return _build(name, **overrides)


def _build(name: str, *, features_only: bool = False, out_indices=None, **overrides) -> nn.Module:
    """A preset; with ``features_only`` its feature maps (``fastvit.models.features.FeaturesOnly``:
    ``forward`` returns a list of ``(b, c, h, w)`` maps, ``feature_info.channels()`` / ``.reduction()``)."""
    model = get_model_entry(name).build(**overrides)
    if not features_only:
        return model
    from .features import FeaturesOnly

    return FeaturesOnly(model, out_indices)


def model_entries() -> list[ModelEntry]:
    """Every registered preset's entry, in registration order (one model file after another)."""
    return list(_REGISTRY.values())


def list_models(pattern: str = "*") -> list[str]:
    """Registered preset names matching a glob pattern, sorted."""
    return sorted(fnmatch.filter(_REGISTRY, pattern))
