"""Loading vit-pytorch checkpoints into fastvit models.

fastvit keeps vit-pytorch 1.26.x parameter names wherever the architecture allows, so most models
load a vit-pytorch ``state_dict`` as is. Two older layouts are converted on the way in:

- the pre-1.16 3-D ``cls_token (1, 1, D)`` / ``pos_embedding (1, N, D)`` shapes, squeezed when the
  model expects 2-D (and unsqueezed the other way round);
- model-specific renames, declared by a model as ``_vit_pytorch_key_map(key) -> key``.

Anything that still does not fit raises a ``ValueError`` naming the missing, unexpected and
mis-shaped keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Union

import torch
from torch import nn

from fastvit.files import read_state_dict

__all__ = ["load_vit_pytorch_state_dict", "convert_vit_pytorch_state_dict", "convert_nested_state_dict"]


def _fit_shape(value: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """Squeeze/unsqueeze leading singleton dims so a 3-D (1, N, D) tensor fits (N, D) and back."""
    if value.shape == target:
        return value
    if value.numel() == target.numel() and [s for s in value.shape if s != 1] == [s for s in target if s != 1]:
        return value.reshape(target)
    return value


def convert_vit_pytorch_state_dict(model: nn.Module, state_dict: Mapping) -> dict:
    """The checkpoint with keys renamed and shapes fitted to ``model`` (no loading)."""
    key_map = getattr(model, "_vit_pytorch_key_map", None)
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key_map is not None:
            key = key_map(key)
            if key is None:  # the model declares this key as intentionally dropped
                continue
        if key in own and isinstance(value, torch.Tensor):
            value = _fit_shape(value, own[key].shape)
        out[key] = value
    hook = getattr(model, "_vit_pytorch_convert", None)
    if hook is not None:
        out = hook(out)
    return out


def load_vit_pytorch_state_dict(model: nn.Module, state_dict: Union[Mapping, str, os.PathLike], strict: bool = True):
    """Load a vit-pytorch 1.26.x ``state_dict`` into a fastvit model.

    Args:
        model: the fastvit model, built with the same constructor arguments as the vit-pytorch one.
        state_dict: vit-pytorch's ``model.state_dict()`` (or a checkpoint dict holding one under
            ``"state_dict"`` / ``"model"``), or the path of a file holding one (``torch.save`` or
            safetensors).
        strict: if True, any missing, unexpected or mis-shaped key is an error.

    Returns:
        ``torch.nn.modules.module._IncompatibleKeys`` as ``load_state_dict`` does.

    Raises:
        ValueError: naming the missing, unexpected and mis-shaped keys; for a path, a
            ``fastvit.files.UnreadableFile`` (a ``ValueError``) naming the file and what is wrong with it.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = read_state_dict(state_dict, "vit-pytorch checkpoint")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state_dict mapping or a file path, got {type(state_dict).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    converted = convert_vit_pytorch_state_dict(model, state_dict)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in converted)
    unexpected = sorted(k for k in converted if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    )
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"cannot load the vit-pytorch checkpoint into {type(model).__name__}:"]
        if missing:
            more = " ..." if len(missing) > 20 else ""
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{more}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
        lines.append("  (was the fastvit model built with the same constructor arguments?)")
        raise ValueError("\n".join(lines))
    return model.load_state_dict(converted, strict=strict)


def convert_nested_state_dict(state_dict: Mapping, submodels: Mapping[str, nn.Module]) -> dict:
    """Convert the entries under each ``prefix`` with ``submodels[prefix]``'s vit-pytorch converter.

    Wrappers (MPP, Dino) hold whole models under a prefix (``transformer.``, ``net.``); each model may
    rename keys or reshape the 3-D/2-D CLS and position layouts, which this applies to its own slice.
    """
    out, inner = {}, {prefix: {} for prefix in submodels}
    for key, value in state_dict.items():
        prefix = next((p for p in submodels if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        else:
            inner[prefix][key[len(prefix):]] = value
    for prefix, model in submodels.items():
        out.update({prefix + key: value for key, value in convert_vit_pytorch_state_dict(model, inner[prefix]).items()})
    return out
