"""Where a model looks: its attention over an image's token grid, as a heatmap over the image.

The maps come from ``fastvit.models.recorder.Recorder`` (every fastvit attention layer's
post-softmax probabilities, any architecture). Two ways to read them:

- ``rollout`` (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", arXiv 2005.00928):
  per layer average the heads, add the identity (the residual path) and renormalise the rows, then
  multiply through the layers, ``R = A_L ... A_1``. Only layers whose queries and keys are the same
  tokens can be multiplied, so the product runs over the last run of consecutive such layers that
  see the whole image (the last stage of a hierarchical model). A class-attention layer right after
  the run (CaiT) reads the rolled-out tokens: its CLS row is multiplied in too.
- ``last``: the last layer that attends over the image's token grid.

Each gives a score per image token: what the CLS token (query 0) attends to where the keys start
with prefix tokens (CLS, distillation), else the mean attention each token receives. Layers that
attend within windows (their batch dimension counts windows) are not drawn. Where rollout has no
such run (CvT: every layer's keys are a strided projection of its queries), ``last`` is drawn and
the description says so. A model none of whose layers attends over the whole token grid (MobileViT's
pixel-unfolded patches), or one without fastvit attention layers, raises ``AttentionMapError``.

The image is resized to the model's input size and normalised with its ``pretrained_cfg``
(ImageNet mean/std by default); the scores, min-max normalised, are upsampled bilinearly to the
original image and blended over it with a colour map.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit.extras import MissingDependency, require
from fastvit.files import UnreadableFile, read_state_dict

__all__ = ["AttentionMapError", "AttentionMap", "attention_map", "token_scores", "token_layout", "load_checkpoint",
           "load_image", "overlay"]

MODES = ("rollout", "last")


class AttentionMapError(ValueError):
    """A model, image or checkpoint an attention map cannot be drawn from, with the reason."""


@dataclass
class AttentionMap:
    """What ``attention_map`` drew: the file, the mode actually used and how the scores were read."""

    path: str
    model: str
    mode: str
    description: str
    grid: tuple  # (gh, gw) token grid of the scores
    scores: Tensor  # (gh, gw), min-max normalised to [0, 1]


def token_layout(n: int, aspect: float = 1.0, max_prefix: int = 2) -> Optional[tuple]:
    """``(prefix, gh, gw)``: ``n`` keys read as ``prefix`` tokens (CLS, distillation) then a row-major
    ``gh x gw`` grid of ``gh / gw == aspect``; ``None`` when no such split exists.

    Args:
        n: number of keys. aspect: the image's height / width. max_prefix: most prefix tokens tried.
    """
    for prefix in range(0, min(max_prefix, n - 1) + 1):
        tokens = n - prefix
        gw = round(math.sqrt(tokens / aspect))
        for w in (gw - 1, gw, gw + 1):
            if w > 0 and tokens % w == 0 and abs(tokens // w / w - aspect) <= 0.25 * aspect:
                return prefix, tokens // w, w
    return None


def _head_mean(probs: Tensor) -> Tensor:
    return probs[0].float().mean(0)  # (b=1, h, nq, nk) -> (nq, nk)


def _read_row(attn: Tensor, prefix: int) -> tuple:
    """Scores over the grid keys of a head-averaged ``(nq, nk)`` map: the CLS row where there is one."""
    nq, nk = attn.shape
    if prefix and nq in (1, nk):
        return attn[0, prefix:], "CLS attention"
    return attn[:, prefix:].mean(0), "mean attention received"


def token_scores(maps: list, aspect: float = 1.0, mode: str = "rollout") -> tuple:
    """``(scores (gh, gw), mode used, description)`` from Recorder's per-layer ``(1, h, nq, nk)`` maps.

    Raises:
        AttentionMapError: no layer attends over a token grid of at least 2 x 2.
    """
    if mode not in MODES:
        raise AttentionMapError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    # (layer index, probs, layout) for every layer of batch 1 whose keys form a grid of >= 4 tokens
    usable = []
    for i, probs in enumerate(maps):
        layout = token_layout(probs.shape[-1], aspect) if probs.dim() == 4 and probs.shape[0] == 1 else None
        if layout is not None and layout[1] * layout[2] >= 4:
            usable.append((i, probs, layout))
    if not usable:
        shapes = sorted({tuple(m.shape) for m in maps})
        raise AttentionMapError(f"none of the {len(maps)} recorded attention layers attends over the image's "
                                f"token grid (maps of shapes {shapes[:4]}: windows or pixel patches, not tokens)")
    if mode == "rollout":
        run = []  # the last run of consecutive square layers over the same tokens
        for i, probs, layout in usable:
            square = probs.shape[-2] == probs.shape[-1]
            if square and run and run[-1][0] == i - 1 and run[-1][1].shape[-1] == probs.shape[-1]:
                run.append((i, probs, layout))
            elif square:
                run = [(i, probs, layout)]
        if run:
            prefix, gh, gw = run[0][2]
            n = run[0][1].shape[-1]
            eye = torch.eye(n)
            rollout = eye
            for _, probs, _ in run:
                a = _head_mean(probs) + eye  # the residual path
                rollout = (a / a.sum(-1, keepdim=True)) @ rollout
            # Class-attention layers right after the run (CaiT): one CLS query over [CLS, the run's tokens].
            after, last_index = [], run[-1][0]
            for i, probs, lay in usable:
                if i == last_index + 1 and probs.shape[-2] == 1 and lay[0] >= 1 and lay[1:] == (gh, gw):
                    after.append((probs, lay[0]))
                    last_index = i
            if after:  # the last one's CLS row reads the rolled-out tokens
                probs, cls_prefix = after[-1]
                scores = _head_mean(probs)[0, cls_prefix:] @ rollout[prefix:, prefix:]
                how = f"rollout over {len(run)} layers, then the CLS row of class attention"
            else:
                scores, read = _read_row(rollout, prefix)
                how = f"rollout over {len(run)} layers ({read})"
            return scores.reshape(gh, gw), "rollout", how
        mode_note = "rollout impossible (no layer's queries and keys are the same image tokens); "
    else:
        mode_note = ""
    i, probs, (prefix, gh, gw) = usable[-1]
    scores, read = _read_row(_head_mean(probs), prefix)
    return scores.reshape(gh, gw), "last", f"{mode_note}layer {i + 1} of {len(maps)} ({read})"


def load_checkpoint(model: nn.Module, path: str, name: str = "model") -> None:
    """Load a safetensors or ``torch.save``-d state_dict into ``model`` strictly (a ``{"state_dict": ...}``
    or ``{"model": ...}`` wrapper is unwrapped; ``fastvit.files.read_state_dict``).

    Raises:
        AttentionMapError: missing, truncated or damaged file, or keys / shapes that do not match ``name``.
    """
    try:
        state = read_state_dict(path, "checkpoint")
    except (UnreadableFile, MissingDependency) as e:
        raise AttentionMapError(f"--checkpoint {e}" if isinstance(e, UnreadableFile) else str(e)) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())  # one line: load_state_dict's message has newlines and tabs
        raise AttentionMapError(f"checkpoint {path} does not fit {name}: {detail[:600]}") from None


def load_image(path: str, input_size: tuple, mean=None, std=None) -> tuple:
    """``(PIL image as read (RGB or L), normalised tensor (1, c, h, w))``: resized to the model's
    ``input_size = (c, h, w)`` and normalised with ``mean`` / ``std`` (ImageNet's by default).

    Raises:
        AttentionMapError: missing file or not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    from fastvit.models.base import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if not os.path.isfile(path):
        raise AttentionMapError(f"image {path}: no such file")
    c, h, w = input_size
    if c not in (1, 3):
        raise AttentionMapError(f"the model takes {c} channels; an image gives 1 or 3")
    try:
        with Image.open(path) as img:
            image = img.convert("L" if c == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise AttentionMapError(f"image {path} cannot be read: {e}") from None
    resized = image.resize((w, h), Image.BICUBIC)
    x = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).reshape(h, w, c)
    x = x.permute(2, 0, 1).float() / 255.0  # (c, h, w)
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN, dtype=torch.float32)[:c, None, None]
    std = torch.tensor(std or IMAGENET_DEFAULT_STD, dtype=torch.float32)[:c, None, None]
    return image, ((x - mean) / std)[None]


def overlay(image, scores: Tensor, alpha: float = 0.5, cmap: str = "jet"):
    """The image with ``scores (gh, gw)`` in [0, 1], upsampled bilinearly to its size, blended over it
    as a colour map; returns an RGB PIL image of the image's size."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    heat = F.interpolate(scores[None, None].float(), size=base.shape[:2], mode="bilinear", align_corners=False)
    colours = colormaps[cmap](heat[0, 0].clamp(0, 1).numpy())[..., :3]
    blended = (1 - alpha) * base + alpha * colours
    return Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def attention_map(model: str, image: str, out: str, *, checkpoint: Optional[str] = None, mode: str = "rollout",
                  alpha: float = 0.5, module: Optional[nn.Module] = None) -> AttentionMap:
    """Draw a registry model's attention over an image into the PNG ``out``.

    Args:
        model: preset name (``fastvit.list_models()``); with ``module``, only its name in messages.
        image: path of an image PIL reads. out: the PNG to write (folders are made).
        checkpoint: a safetensors or torch state_dict loaded strictly (random weights without one).
        mode: ``"rollout"`` or ``"last"``. alpha: heatmap opacity.
        module: an already built model to use instead of building ``model``.

    Raises:
        AttentionMapError: unknown model, unreadable image or checkpoint, or a model Recorder
            records no usable attention from.
    """
    from fastvit.layers.attention import AttentionBase
    from fastvit.models import get_model_entry
    from fastvit.models.recorder import Recorder

    if mode not in MODES:
        raise AttentionMapError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        require("matplotlib", "fastvit attention-map (the colour map)", "plot")
        require("PIL", "fastvit attention-map (reading and writing images)", "plot")
    except MissingDependency as e:
        raise AttentionMapError(str(e)) from None
    if module is None:
        try:
            module = get_model_entry(model).build()
        except ValueError as e:
            raise AttentionMapError(str(e)) from None
    if not any(isinstance(m, AttentionBase) for m in module.modules()):
        raise AttentionMapError(f"{model} has no fastvit attention layer for Recorder to record (a timm model "
                                f"needs fastvit.patch_timm first)")
    if checkpoint:
        load_checkpoint(module, checkpoint, model)
    cfg = getattr(module, "pretrained_cfg", None) or {}
    input_size = tuple(cfg.get("input_size") or get_model_entry(model).input_size)
    picture, x = load_image(image, input_size, cfg.get("mean"), cfg.get("std"))
    recorder = Recorder(module.eval())
    try:
        with torch.no_grad():
            _, maps = recorder(x)
    finally:
        recorder.eject()
    if maps is None:
        raise AttentionMapError(f"{model}: Recorder recorded no attention map for this input")
    maps = list(maps.unbind(1)) if isinstance(maps, Tensor) else list(maps)  # (b, layers, ...) -> per layer
    try:
        scores, used, how = token_scores(maps, aspect=input_size[1] / input_size[2], mode=mode)
    except AttentionMapError as e:
        raise AttentionMapError(f"{model}: {e}") from None
    lo, hi = scores.min(), scores.max()
    if hi > lo:
        scores = (scores - lo) / (hi - lo)
    else:  # e.g. LeViT's fresh initialisation attends uniformly
        scores, how = torch.zeros_like(scores), f"{how}; uniform: every token scored the same"
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    overlay(picture, scores, alpha=alpha).save(out, format="PNG")
    return AttentionMap(out, model, used, how, tuple(scores.shape), scores)
