"""The surface every fastvit model shares (timm's), on top of lucidrains-style modules.

A model file declares a few small things; ``VisionModel`` builds timm's model surface from them:

- ``forward_features(img)``: the backbone (documented per model: tokens or the last feature map).
- ``pool_features(x)``: ``forward_features``'s output -> ``(b, num_features)``, everything the head
  computes before its classifier (token or average pooling, a pre-head norm).
- ``classifier_path``: where the classifier sits (``"mlp_head.1"``; a tuple when a model has several
  heads: CrossViT's two, LeViT's distillation head), and ``set_head(...)`` at the end of ``__init__``.
- ``feature_info`` (one ``dict(num_chs, reduction, module)`` per intermediate: a block of a ViT, a
  stage of a hierarchical model), ``intermediates_from`` (the ``BlockRunner`` that ``tap``s them) and,
  for token intermediates, ``num_prefix_tokens`` / ``token_grid`` / ``final_norm_path``.

From these: ``forward_head(x, pre_logits=False)``, ``get_classifier()``, ``reset_classifier(n)``,
``num_features``, ``set_grad_checkpointing()``, ``forward_intermediates(...)`` (and through it
``create_model(..., features_only=True)``), ``pretrained_cfg`` and the input dtype rule.

``num_classes=0`` gives pooled features ``(b, num_features)``: the classifier is an ``nn.Identity``, so
the state_dict has no classifier keys. ``legacy_num_classes_zero=True`` keeps vit-pytorch's behaviour:
a ``Linear(dim, 0)`` that returns ``(b, 0)`` (its keys are in the state_dict, with zero rows), and for
ViT no head at all (``mlp_head = None``), so ``forward`` returns the normed tokens ``(b, n, dim)``.

Input dtype rule (one place, a forward pre-hook, so it holds for every model alike): a floating input
whose dtype differs from the model's parameters raises ``ValueError`` naming both, unless autocast is
on for the input's device (autocast decides the compute dtype then); a non-floating input is a
``ValueError`` too. Nothing is cast silently.

``torch.jit.script`` is refused with one sentence (``__prepare_scriptable__``): ``attend()`` does not
script. ``torch.jit.trace``, ``torch.export`` and ``torch.compile`` work.
"""

from __future__ import annotations

from functools import reduce
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastvit.compat.vit_pytorch import load_vit_pytorch_state_dict
from fastvit.layers import BlockRunner, Linear, pair

__all__ = ["VisionModel", "default_pretrained_cfg", "feature_take_indices", "IMAGENET_DEFAULT_MEAN",
           "IMAGENET_DEFAULT_STD"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def default_pretrained_cfg(input_size: Sequence[int], **overrides) -> dict:
    """timm's data config of a preset: ImageNet mean/std, bicubic, centre crop 0.9 (1.0 from 384 px, the
    convention of timm's fine-tuned high-resolution models); ``overrides`` win."""
    input_size = tuple(int(s) for s in input_size)
    cfg = dict(input_size=input_size, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               crop_pct=1.0 if min(input_size[1:]) >= 384 else 0.9, crop_mode="center")
    cfg.update(overrides)
    return cfg


def feature_take_indices(num_features: int, indices: Union[int, Sequence[int], None] = None) -> tuple[list, int]:
    """timm's rule: ``None`` all, an int the last ``n``, a sequence those indices (negative from the end).

    Returns:
        the absolute indices, in the given order, and the largest.
    """
    if num_features < 1:
        raise ValueError("this model records no intermediates")
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n indices={indices} is out of range (1 to {num_features})")
        take = list(range(num_features - indices, num_features))
    else:
        take = [i + num_features if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < num_features]
        if bad or not take:
            raise ValueError(f"feature indices {list(indices)} out of range (0 to {num_features - 1}, or negative)")
    return take, max(take)


def _get(module: nn.Module, path: str):
    """``module.a.1.b`` for ``path="a.1.b"`` (``""``: the module itself); ``None`` where an attribute is
    ``None`` or missing."""
    return reduce(lambda m, name: getattr(m, name, None) if m is not None else None,
                  path.split(".") if path else [], module)


def _check_input_hook(model: VisionModel, args: tuple) -> None:
    if args:
        model.check_input(args[0])


class VisionModel(BlockRunner, nn.Module):
    """Base class: ``forward = forward_head(forward_features(img))``, timm's surface, vit-pytorch loading.

    Subclasses implement ``forward_features(img)`` and ``pool_features(x)``, set ``classifier_path`` and
    call ``set_head`` and ``set_feature_info`` in ``__init__`` (see the module docstring).
    """

    classifier_path: Union[str, tuple] = "mlp_head"
    intermediates_from: str = ""  # the BlockRunner whose taps are the intermediates ("": the model)
    final_norm_path: Optional[str] = None  # the norm that ``forward_intermediates(norm=True)`` applies
    num_prefix_tokens: int = 0  # tokens before the grid in a token intermediate (CLS)
    num_features: int
    num_classes: int
    feature_info: list

    def __init__(self):
        super().__init__()
        self.feature_info = []
        self.legacy_num_classes_zero = False
        self.register_forward_pre_hook(_check_input_hook)

    # -- what a model implements ------------------------------------------------------------------

    def forward_features(self, img: Tensor):
        raise NotImplementedError

    def pool_features(self, x) -> Tensor:
        """``forward_features``'s output -> ``(b, num_features)``: the head before its classifier."""
        raise NotImplementedError

    def classify(self, x: Tensor):
        """Pooled features -> logits (models with several heads override it)."""
        return self.get_classifier()(x)

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h, w)`` token grid of an ``h x w`` image (token intermediates; patches by default)."""
        return h // self.patch_size[0], w // self.patch_size[1]

    # -- declarations, called in __init__ ----------------------------------------------------------

    def set_head(self, num_features: int, num_classes: int, legacy_num_classes_zero: bool = False) -> None:
        """Record the head's sizes; with ``num_classes=0`` the classifier becomes an ``nn.Identity``
        (pooled features) unless ``legacy_num_classes_zero`` keeps vit-pytorch's module."""
        self.num_features = num_features
        self.num_classes = num_classes
        self.legacy_num_classes_zero = legacy_num_classes_zero
        # Input width of each classifier, so reset_classifier can rebuild one that is an Identity now.
        self.classifier_widths = {p: getattr(_get(self, p), "in_features", num_features) for p in self._paths()}
        if num_classes == 0 and not legacy_num_classes_zero:
            self.reset_classifier(0)

    def set_feature_info(self, num_chs: Sequence[int], reduction: Sequence[int], module: Union[str, Sequence[str]]):
        """One ``dict(num_chs, reduction, module)`` per intermediate; ``module`` a list of paths, or a
        prefix that numbers them (``"transformer.layers"`` -> ``transformer.layers.{i}``)."""
        modules = [f"{module}.{i}" for i in range(len(num_chs))] if isinstance(module, str) else list(module)
        self.feature_info = [dict(num_chs=int(c), reduction=int(r), module=m)
                             for c, r, m in zip(num_chs, reduction, modules)]

    # -- timm's surface ----------------------------------------------------------------------------

    def _paths(self) -> tuple:
        return (self.classifier_path,) if isinstance(self.classifier_path, str) else tuple(self.classifier_path)

    def get_classifier(self):
        """The classifier module (``nn.Identity`` when headless), or a tuple of them for several heads."""
        heads = tuple(h for i, h in enumerate(_get(self, p) for p in self._paths()) if i == 0 or h is not None)
        return heads[0] if len(heads) == 1 else heads

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier of ``num_classes`` outputs (0: an ``nn.Identity``, pooled features).

        Extra heads (LeViT's distillation head, CrossViT's second branch) are reset alike when present.
        ``global_pool`` is timm's argument; fastvit models keep the pooling they were built with.
        """
        if global_pool is not None:
            raise ValueError(f"global_pool={global_pool!r}: fastvit models keep the pooling they were built with "
                             f"(pass global_pool=None)")
        ref = next(p for p in self.parameters() if p.is_floating_point())
        for i, path in enumerate(self._paths()):
            if i > 0 and _get(self, path) is None:  # an optional extra head that is absent
                continue
            width = self.classifier_widths.get(path, self.num_features)
            new = (Linear(width, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0
                   else nn.Identity())
            parent, _, name = path.rpartition(".")
            setattr(_get(self, parent), name, new)
        self.num_classes = num_classes

    def forward_head(self, x, pre_logits: bool = False):
        """``forward_features``'s output -> logits ``(b, num_classes)``; with ``pre_logits`` (or no
        classifier, ``num_classes=0``) the pooled features ``(b, num_features)``."""
        first = _get(self, self._paths()[0])
        if first is None and not pre_logits:  # legacy_num_classes_zero ViT: vit-pytorch returns the tokens
            return x
        x = self.pool_features(x)
        if pre_logits or isinstance(first, nn.Identity):
            return x
        return self.classify(x)

    def forward(self, img: Tensor):
        return self.forward_head(self.forward_features(img))

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given, wrappers' submodules included (and
        # nothing else does): the one place that refuses, before TorchScript fails deep inside attend().
        raise RuntimeError(f"{type(self).__name__}: fastvit models cannot be scripted (attend()'s backend "
                           f"dispatch is Python that TorchScript cannot compile); use torch.jit.trace, "
                           f"torch.export or torch.compile, which work")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block of every ``BlockRunner`` in the model (recomputed in backward)."""
        for module in self.modules():
            if isinstance(module, BlockRunner):
                module.grad_checkpointing = enable

    def forward_intermediates(self, x: Tensor, indices: Union[int, Sequence[int], None] = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ``forward_intermediates``: the outputs of the blocks (ViT-like models) or stages
        (hierarchical models) listed in ``feature_info``.

        Args:
            x: images ``(b, c, h, w)``.
            indices: ``None`` all, an int the last ``n``, a sequence those (negative from the end).
            norm: apply the model's final norm (``final_norm_path``; token models whose blocks end in one)
                to every intermediate; a no-op for the others.
            output_fmt: ``"NCHW"`` maps ``(b, c, h', w')`` or ``"NLC"`` tokens ``(b, h'*w', c)``, prefix
                (CLS) tokens dropped either way.
            intermediates_only: return the list alone.

        Returns:
            ``(forward_features(x), [intermediates])``, or the list with ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self.check_input(x)
        runner = _get(self, self.intermediates_from)
        if not isinstance(runner, BlockRunner):
            raise ValueError(f"{type(self).__name__}.{self.intermediates_from} ({type(runner).__name__}) does not "
                             f"record its blocks' outputs: forward_intermediates needs fastvit's blocks there")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        runner.taps = []
        try:
            final = self.forward_features(x)
            taps = runner.taps
        finally:
            runner.taps = None
        if len(taps) != len(self.feature_info):
            raise RuntimeError(f"{type(self).__name__} ran {len(taps)} of its {len(self.feature_info)} blocks "
                               f"(layer dropout in training?); call forward_intermediates in eval mode")
        norm_layer = _get(self, self.final_norm_path) if norm and self.final_norm_path else None
        out = []
        for i in take:
            t = taps[i] if norm_layer is None else norm_layer(taps[i])
            out.append(self._format_intermediate(t, x.shape[-2:], output_fmt))
        return out if intermediates_only else (final, out)

    def _format_intermediate(self, t: Tensor, image_hw, output_fmt: str) -> Tensor:
        """A map ``(b, c, h, w)`` or tokens ``(b, prefix + n, c)`` in ``output_fmt``."""
        if t.dim() == 4:
            return t if output_fmt == "NCHW" else t.flatten(2).transpose(1, 2)
        t = t[:, self.num_prefix_tokens:]  # (b, n, c)
        if output_fmt == "NLC":
            return t
        gh, gw = self.token_grid(*image_hw)
        if t.shape[1] != gh * gw:
            raise ValueError(f"{t.shape[1]} tokens do not fill the {gh}x{gw} token grid (the model dropped "
                             f"tokens); use output_fmt='NLC'")
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)

    @property
    def pretrained_cfg(self) -> dict:
        """timm's data config (``timm.data.resolve_data_config({}, model=model)`` reads it): the preset's
        when built by ``create_model``, else from the model's ``image_size`` (224 for any-size models)."""
        cfg = self.__dict__.get("_pretrained_cfg")
        if cfg is not None:
            return cfg
        size = pair(getattr(self, "image_size", None) or 224)
        channels = getattr(self, "channels", None)
        channels = channels if isinstance(channels, int) else getattr(self, "in_channels", 3)
        return default_pretrained_cfg((channels, *size), num_classes=self.num_classes,
                                      classifier=self._paths()[0])

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        self.__dict__["_pretrained_cfg"] = dict(cfg)

    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def check_input(self, img) -> None:
        """The dtype rule (module docstring): ``ValueError`` naming both dtypes when they differ."""
        if not isinstance(img, Tensor):
            return
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        if param is None:
            return
        if not img.is_floating_point():
            raise ValueError(f"expected a floating-point image batch ({param.dtype}, the model's dtype), "
                             f"got {img.dtype}")
        if img.dtype != param.dtype and not torch.is_autocast_enabled(img.device.type):
            raise ValueError(f"input dtype {img.dtype} does not match the model's parameters ({param.dtype}): cast "
                             f"the input (img.to({param.dtype})) or the model (model.to({img.dtype})), or run "
                             f"under torch.autocast")

    def load_vit_pytorch_state_dict(self, state_dict, strict: bool = True):
        """Load weights saved from the vit-pytorch 1.26.x model built with the same arguments.

        Raises:
            ValueError: naming the missing, unexpected and mis-shaped keys.
        """
        return load_vit_pytorch_state_dict(self, state_dict, strict=strict)
