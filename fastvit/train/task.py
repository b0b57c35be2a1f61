"""What is trained and what one step computes: the model, the optional SSL wrapper, the loss.

``build_task(config)`` builds the model with ``fastvit.create_model`` (registry names and ``timm/<name>``),
applies ``--grad-checkpointing``, and for ``--ssl`` wraps it in the ``fastvit.ssl`` learner:

    mae     MAE(encoder=model, decoder_dim=512)          loss = MSE on the masked patches' pixels
    simmim  SimMIM(encoder=model)                        loss = L1 on the masked patches' pixels
    mpp     MPP(transformer=model, patch_size, dim, ImageNet mean/std)   cross entropy on colour bins
    dino    Dino(model, image_size, hidden_layer="to_latent" if the model has it, else its output)

``--ssl-arg KEY=VALUE`` overrides or adds wrapper arguments. ``Task.backbone_prefix`` is where the
model sits in the trained module's ``state_dict`` (``encoder.`` for MAE), so the model can be exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig, TrainError
from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Task", "build_task", "model_image_size", "model_num_classes"]


@dataclass
class Task:
    model: nn.Module  # the backbone, exported at the end
    module: nn.Module  # what the optimiser trains: the model, or the SSL wrapper around it
    image_size: tuple
    supervised: bool
    normalize: bool  # the data loader normalises (Dino normalises inside its augmentation)
    backbone_prefix: str
    label_smoothing: float = 0.0
    after_step: Optional[Callable[[nn.Module], None]] = None  # on the unwrapped module, after optimizer.step()

    def loss(self, module: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """The scalar loss of one batch through ``module`` (the DDP / FSDP / compiled form of ``self.module``)."""
        if self.supervised:
            return F.cross_entropy(module(images), labels, label_smoothing=self.label_smoothing)
        return module(images)

    def trainable_parameters(self) -> list:
        """``(name, parameter)`` pairs the optimiser updates: everything that requires a gradient except the
        parameters the SSL wrapper declares it never uses and empty ones (a mean-pool ViT's ``cls_token``)."""
        unused = set(getattr(self.module, "unused_parameters", list)())
        return [(n, p) for n, p in self.module.named_parameters()
                if p.requires_grad and p.numel() > 0 and n not in unused]


def model_image_size(model: nn.Module, override: Optional[int]) -> tuple:
    """The training resolution: ``--image-size``, else what the model says (fastvit's ``image_size``, timm's
    patch embedding or ``pretrained_cfg``), else 224."""
    if override is not None:
        return (override, override)
    size = getattr(model, "image_size", None)
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg["input_size"][1:]) if "input_size" in cfg else 224
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))


def model_num_classes(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def _build_model(config: TrainConfig) -> nn.Module:
    import fastvit

    overrides = dict(config.model_args)
    if config.num_classes is not None:
        overrides["num_classes"] = config.num_classes
    try:
        model = fastvit.create_model(config.model, **overrides)
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        what = f" with {', '.join(f'{k}={v!r}' for k, v in overrides.items())}" if overrides else ""
        message = str(e) if str(e).startswith("unknown model") else f"cannot build --model {config.model}{what}: {e}"
        raise TrainError(message) from None
    if config.grad_checkpointing:
        if not callable(getattr(model, "set_grad_checkpointing", None)):
            raise TrainError(f"--grad-checkpointing: --model {config.model} ({type(model).__name__}) has no "
                             f"set_grad_checkpointing(); train it without the flag")
        model.set_grad_checkpointing(True)
    channels = getattr(model, "channels", 3)
    if isinstance(channels, int) and channels != 3:
        raise TrainError(f"--model {config.model} takes {channels}-channel images; the data loader gives RGB")
    return model


def _wrap_ssl(config: TrainConfig, model: nn.Module, image_size: tuple) -> tuple:
    """``(wrapper, backbone_prefix, normalize)`` for ``config.ssl``."""
    from fastvit import ssl

    name, args = config.ssl, dict(config.ssl_args)
    try:
        if name == "mae":
            return ssl.MAE(encoder=model, **{"decoder_dim": 512, **args}), "encoder.", True
        if name == "simmim":
            return ssl.SimMIM(encoder=model, **args), "encoder.", True
        if name == "mpp":
            dim = getattr(model, "dim", None) or model.pos_embedding.shape[-1]
            defaults = dict(patch_size=getattr(model, "patch_size", None), dim=dim, channels=3,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)
            return ssl.MPP(transformer=model, **{**defaults, **args}), "transformer.", True
        hidden = "to_latent" if isinstance(getattr(model, "to_latent", None), nn.Module) else -1
        return ssl.Dino(model, **{"image_size": image_size, "hidden_layer": hidden, **args}), "net.", False
    except (ValueError, TypeError, AttributeError) as e:
        raise TrainError(f"--ssl {name} cannot wrap --model {config.model} ({type(model).__name__}): {e}") from None


def _dino_update(module: nn.Module) -> None:
    module.update_moving_average()


def build_task(config: TrainConfig) -> Task:
    """The model (and SSL wrapper) of ``config``, on the CPU; the caller seeds first (same init on every rank)."""
    model = _build_model(config)
    image_size = model_image_size(model, config.image_size)
    if config.ssl is None:
        if model_num_classes(model) == 0:
            raise TrainError(f"--model {config.model} was built without a classifier (num_classes=0); give "
                             f"--num-classes N or pre-train it with --ssl")
        return Task(model, model, image_size, supervised=True, normalize=True, backbone_prefix="",
                    label_smoothing=config.label_smoothing)
    wrapper, prefix, normalize = _wrap_ssl(config, model, image_size)
    after = _dino_update if config.ssl == "dino" else None
    return Task(model, wrapper, image_size, supervised=False, normalize=normalize, backbone_prefix=prefix,
                after_step=after)
