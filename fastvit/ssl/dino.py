"""Dino: self-distillation with no labels, "Emerging Properties in Self-Supervised Vision Transformers"
(Caron et al., arXiv 2104.14294), as vit-pytorch implements it.

A student network sees two local crops of two augmented views of a batch; a teacher, the exponential
moving average of the student, sees two global crops. Both map an embedding taken from ``hidden_layer``
(a forward hook on a module of the net, or ``-1`` for the net's output) through a projection head
(``Linear, GELU`` x (projection_layers - 1), ``L2Norm``, ``Linear`` to ``num_classes_K``). The loss is the
cross entropy ``-sum softmax((t - c) / teacher_temp) * log_softmax(s / student_temp)`` between each
teacher view and the other student view, averaged. The user calls ``update_moving_average()`` after each
optimiser step; it moves the teacher and the centre ``c`` (the mean teacher output) towards the student.

Layout (vit-pytorch 1.26.x keys): ``net.*`` (the wrapped model), ``student_encoder.net.*`` (the same
model), ``student_encoder.projector.net.{0, 2, ..}.*`` (the head's Linears), ``teacher_encoder.*`` (the
same again for the teacher), ``teacher_centers`` and ``last_teacher_centers`` ``(1, num_classes_K)``.
As in vit-pytorch the projector and the teacher are built by one forward pass on random images inside
``__init__``, which consumes random numbers and updates the net's BatchNorm statistics, if any.

Random numbers are drawn as vit-pytorch draws them: the default augmentation and the crops are
torchvision's, applied to the whole batch (one set of random parameters per batch), and ``RandomApply``
draws from Python's ``random`` (seed both it and torch to reproduce a loss).

Kept from vit-pytorch: the ``num_classes_K=65336`` default (a typo for 65536, kept so checkpoints
load), the student seeing only the local crops and the teacher only the global ones, the teacher left in
the net's train/eval mode.

Deliberate differences from vit-pytorch (see ``Dino`` for the flag):

- The projection head has no GELU after its last hidden Linear, as vit-pytorch's dead ``is_last`` check
  intends and as in DINO's head (Linear-GELU-...-Linear, then L2 normalisation). This changes every
  output; ``legacy_projector_gelu=True`` restores vit-pytorch's head. The parameters are the same.
- ``projection_layers=1`` works (L2Norm then Linear on the embedding); vit-pytorch sizes the last Linear
  for ``projection_hidden_size`` and crashes unless it equals the embedding width.
- The random images of the build pass have the net's channel count (``net.channels`` where it has one)
  and ``image_size`` may be an ``(h, w)`` pair; vit-pytorch always uses 3 square channels (#291). The
  default augmentation is for 3-channel images: other nets must pass ``augment_fn`` and ``augment_fn2``.
- Bad arguments raise ``ValueError`` naming the value: an unknown ``hidden_layer`` (at construction, not
  at the first forward), non-positive temperatures, decays outside [0, 1], crop scales outside their
  ranges, ``projection_layers < 1``. ``update_moving_average`` before a teacher exists and a hidden layer
  that never runs are ``RuntimeError`` s, not asserts.
- The EMA updates the teacher in place (``torch._foreach_*`` with vit-pytorch's arithmetic,
  ``old * decay + (1 - decay) * new``) instead of rebinding ``.data``.
- torchvision is imported when a ``Dino`` is built (fastvit itself does not depend on it).

Distributed training (DDP, FSDP2): ``update_moving_average`` all-reduces the batch centre before the EMA
(vit-pytorch moves each rank's centre towards its own batch, so the ranks drift apart and none holds the
global mean); the student's parameters that the loss never reaches (the net's classifier head behind a
hooked ``hidden_layer``), found by a backward through the build pass, are ``unused_parameters()``, which
DDP skips without ``find_unused_parameters=True``.
"""

from __future__ import annotations

import copy
import random
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit.compat.vit_pytorch import convert_nested_state_dict, load_vit_pytorch_state_dict
from fastvit.layers import Linear, pair

from .distributed import UnusedParametersMixin, all_reduce_mean_

__all__ = ["Dino", "NetWrapper", "MLP", "L2Norm", "RandomApply", "loss_fn"]


def _transforms():
    try:
        from torchvision import transforms
    except ImportError as err:  # pragma: no cover - torchvision is a dev dependency
        raise ImportError("Dino's crops and default augmentation need torchvision: "
                          "pip install 'fastvit[ssl]' (or torchvision)") from err
    return transforms


def loss_fn(teacher_logits: Tensor, student_logits: Tensor, teacher_temp: float, student_temp: float,
            centers: Tensor, eps: float = 1e-20) -> Tensor:
    """DINO's cross entropy (Algorithm 1): ``(b, K)`` logits -> scalar. ``eps`` is unused (vit-pytorch's)."""
    teacher_logits = teacher_logits.detach()
    student_log_probs = F.log_softmax(student_logits / student_temp, dim=-1)
    teacher_probs = ((teacher_logits - centers) / teacher_temp).softmax(dim=-1)
    return -(teacher_probs * student_log_probs).sum(dim=-1).mean()


class RandomApply(nn.Module):
    """Apply ``fn`` with probability ``p``; the coin is Python's ``random``, as in vit-pytorch."""

    def __init__(self, fn: Callable, p: float):
        super().__init__()
        self.fn = fn
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if random.random() > self.p:
            return x
        return self.fn(x)


class L2Norm(nn.Module):
    """``x / max(||x||, eps)`` over dim 1."""

    def forward(self, x: Tensor, eps: float = 1e-6) -> Tensor:
        norm = x.norm(dim=1, keepdim=True).clamp(min=eps)
        return x / norm


class MLP(nn.Module):
    """The projection head: ``(Linear, GELU) x (num_layers - 1)``, ``L2Norm``, ``Linear(-> dim_out)``.

    Keys ``net.{0, 2, ...}`` as in vit-pytorch. ``legacy_gelu=True`` keeps the GELU after the last hidden
    Linear (vit-pytorch's head); the default has none there.
    """

    def __init__(self, dim: int, dim_out: int, num_layers: int, hidden_size: int = 256, legacy_gelu: bool = False):
        super().__init__()
        dims = (dim, *((hidden_size,) * (num_layers - 1)))
        layers = []
        for ind, (layer_dim_in, layer_dim_out) in enumerate(zip(dims[:-1], dims[1:])):
            is_last = ind == len(dims) - 2
            activation = nn.GELU() if legacy_gelu or not is_last else nn.Identity()
            layers.extend([Linear(layer_dim_in, layer_dim_out), activation])
        self.net = nn.Sequential(*layers, L2Norm(), Linear(dims[-1], dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class NetWrapper(nn.Module):
    """A net, the embedding a forward hook takes from its ``layer``, and a projector built on first use.

    ``layer`` is a module name (``"to_latent"``), an index into ``net.children()`` (``-2``), or ``-1`` for
    the net's output. ``forward(x) -> (projection (b, K), embedding (b, d))``; the hooked output is
    flattened from dim 1.
    """

    def __init__(self, net: nn.Module, output_dim: int, projection_hidden_size: int, projection_num_layers: int,
                 layer: Union[str, int] = -2, legacy_projector_gelu: bool = False):
        super().__init__()
        self.net = net
        self.layer = layer
        self.projector = None
        self.projection_hidden_size = projection_hidden_size
        self.projection_num_layers = projection_num_layers
        self.output_dim = output_dim
        self.legacy_projector_gelu = legacy_projector_gelu
        self.hidden = {}
        self.hook_registered = False
        if layer != -1:
            self._find_layer()  # fail at construction on an unknown layer

    def _find_layer(self) -> nn.Module:
        layer = self.layer
        if isinstance(layer, str):
            modules = dict(self.net.named_modules())
            if layer not in modules:
                names = [name for name, _ in self.net.named_children()]
                raise ValueError(f"hidden_layer {layer!r} is not a module of {type(self.net).__name__} "
                                 f"(its children: {', '.join(names)})")
            return modules[layer]
        if isinstance(layer, int) and not isinstance(layer, bool):
            children = list(self.net.children())
            if not -len(children) <= layer < len(children):
                raise ValueError(f"hidden_layer index {layer} is out of range: {type(self.net).__name__} has "
                                 f"{len(children)} children")
            return children[layer]
        raise ValueError(f"hidden_layer must be a module name or a child index, got {layer!r}")

    def _hook(self, _module, _inputs, output):
        if not isinstance(output, Tensor):
            raise RuntimeError(f"hidden layer {self.layer!r} returned {type(output).__name__}, expected a tensor")
        self.hidden[output.device] = output.flatten(1)

    def _register_hook(self) -> None:
        self._find_layer().register_forward_hook(self._hook)
        self.hook_registered = True

    def _get_projector(self, hidden: Tensor) -> MLP:
        if self.projector is None:
            _, dim = hidden.shape
            projector = MLP(dim, self.output_dim, self.projection_num_layers, self.projection_hidden_size,
                            legacy_gelu=self.legacy_projector_gelu)
            self.projector = projector.to(hidden)
        return self.projector

    def get_embedding(self, x: Tensor) -> Tensor:
        if self.layer == -1:
            return self.net(x)
        if not self.hook_registered:
            self._register_hook()
        self.hidden.clear()
        self.net(x)
        hidden = self.hidden.pop(x.device, None)
        self.hidden.clear()
        if hidden is None:
            raise RuntimeError(f"hidden layer {self.layer!r} never emitted an output")
        return hidden

    def forward(self, x: Tensor, return_projection: bool = True):
        embed = self.get_embedding(x)
        if not return_projection:
            return embed
        return self._get_projector(embed)(embed), embed


class Dino(UnusedParametersMixin, nn.Module):
    """DINO self-supervised learner with vit-pytorch's constructor.

    Args:
        net: the network to train (e.g. fastvit ``ViT``).
        image_size: int or (h, w); crops are resized to it.
        hidden_layer: module name or child index of the embedding; ``-1``: the net's output.
        projection_hidden_size: hidden width of the projection head.
        num_classes_K: output width of the head (prototypes).
        projection_layers: Linears in the head before the last one, plus one (>= 1).
        student_temp, teacher_temp: softmax temperatures (> 0).
        local_upper_crop_scale: local crops cover (0.05, this) of the image; in [0.05, 1].
        global_lower_crop_scale: global crops cover (this, 1); in (0, 1].
        moving_average_decay: teacher EMA decay. center_moving_average_decay: centre EMA decay.
        augment_fn, augment_fn2: augmentations of the two views (default: vit-pytorch's BYOL-style one).
        legacy_projector_gelu: keep vit-pytorch's GELU after the head's last hidden Linear.

    ``forward(x, return_embedding=False, return_projection=True, student_temp=None, teacher_temp=None)``
    returns the loss, or with ``return_embedding=True`` the student's ``(projection, embedding)``
    (the embedding alone with ``return_projection=False``).

    Bug fix: vit-pytorch's head applies a GELU after its last hidden Linear (its ``is_last`` check can
    never be true); this head has none there, as intended and as DINO's head. It changes every output,
    not the parameters: ``legacy_projector_gelu=True`` restores vit-pytorch's head, and with it the same
    loss for the same weights and seeds. The other differences (``projection_layers=1``, channel counts,
    ValueErrors, in-place EMA) change no output vit-pytorch produces; see the module docstring.

    Under ``torch.distributed`` every rank must call ``update_moving_average`` (it all-reduces the centre
    over ``self.process_group``, default: the world).
    """

    def __init__(self, net: nn.Module, image_size, hidden_layer: Union[str, int] = -2,
                 projection_hidden_size: int = 256, num_classes_K: int = 65336, projection_layers: int = 4,
                 student_temp: float = 0.9, teacher_temp: float = 0.04, local_upper_crop_scale: float = 0.4,
                 global_lower_crop_scale: float = 0.5, moving_average_decay: float = 0.9,
                 center_moving_average_decay: float = 0.9, augment_fn: Optional[Callable] = None,
                 augment_fn2: Optional[Callable] = None, *, legacy_projector_gelu: bool = False):
        super().__init__()
        for name, value in (("projection_hidden_size", projection_hidden_size), ("num_classes_K", num_classes_K),
                            ("projection_layers", projection_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_temperatures(student_temp, teacher_temp)
        for name, value in (("moving_average_decay", moving_average_decay),
                            ("center_moving_average_decay", center_moving_average_decay)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not 0.05 <= local_upper_crop_scale <= 1:
            raise ValueError(f"local_upper_crop_scale must be in [0.05, 1] (local crops cover 5% of the image and "
                             f"more), got {local_upper_crop_scale!r}")
        if not 0 < global_lower_crop_scale <= 1:
            raise ValueError(f"global_lower_crop_scale must be in (0, 1], got {global_lower_crop_scale!r}")
        image_size = pair(image_size)
        channels = getattr(net, "channels", 3)
        channels = channels if isinstance(channels, int) else 3
        if channels != 3 and (augment_fn is None or augment_fn2 is None):
            raise ValueError(f"the default augmentation (colour jitter, grayscale, ImageNet normalisation) is for "
                             f"3-channel images and the net has channels={channels}: pass augment_fn and augment_fn2")
        T = _transforms()
        self.net = net

        default_aug = None
        if augment_fn is None or augment_fn2 is None:
            default_aug = nn.Sequential(  # vit-pytorch's BYOL augmentation
                RandomApply(T.ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.3),
                T.RandomGrayscale(p=0.2),
                T.RandomHorizontalFlip(),
                RandomApply(T.GaussianBlur((3, 3), (1.0, 2.0)), p=0.2),
                T.Normalize(mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225])),
            )
        self.augment1 = default_aug if augment_fn is None else augment_fn
        self.augment2 = default_aug if augment_fn2 is None else augment_fn2

        self.local_crop = T.RandomResizedCrop(image_size, scale=(0.05, local_upper_crop_scale))
        self.global_crop = T.RandomResizedCrop(image_size, scale=(global_lower_crop_scale, 1.0))

        self.student_encoder = NetWrapper(net, num_classes_K, projection_hidden_size, projection_layers,
                                          layer=hidden_layer, legacy_projector_gelu=legacy_projector_gelu)
        self.teacher_encoder = None
        self.moving_average_decay = moving_average_decay
        self.center_moving_average_decay = center_moving_average_decay

        self.register_buffer("teacher_centers", torch.zeros(1, num_classes_K))
        self.register_buffer("last_teacher_centers", torch.zeros(1, num_classes_K))

        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.process_group = None  # the centre's all-reduce group (None: the default group)
        self._last_center_weight = 1.0  # teacher outputs averaged into last_teacher_centers

        device = next(net.parameters()).device
        self.to(device)
        # Builds the projector and the teacher (as vit-pytorch, with gradients on: same random numbers).
        loss = self.forward(torch.randn(2, channels, *image_size, device=device))
        self._unused_student_params = self._find_unused_student_params(loss)

    def _find_unused_student_params(self, loss: Tensor) -> tuple:
        """Names (in ``student_encoder``) of the trainable parameters the build pass's loss does not reach."""
        params = [(n, p) for n, p in self.student_encoder.named_parameters() if p.requires_grad]
        if not loss.requires_grad or not params:  # built under no_grad: nothing to tell
            return ()
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)  # no .grad written
        return tuple(n for (n, _), grad in zip(params, grads) if grad is None)

    def _unused_parameter_objects(self) -> list:
        return [self.student_encoder.get_parameter(n) for n in self._unused_student_params]

    def _get_teacher_encoder(self) -> NetWrapper:
        if self.teacher_encoder is None:
            teacher_encoder = copy.deepcopy(self.student_encoder)
            for param in teacher_encoder.parameters():
                param.requires_grad = False
            self.teacher_encoder = teacher_encoder
        return self.teacher_encoder

    def reset_moving_average(self) -> None:
        """Drop the teacher; the next forward copies the student again."""
        del self.teacher_encoder
        self.teacher_encoder = None

    @torch.no_grad()
    def update_moving_average(self) -> None:
        """``teacher = decay * teacher + (1 - decay) * student``; the centre likewise towards the last batch.

        With an initialised process group the last batch centre is first averaged over the ranks (weighted
        by their batch sizes): every rank then holds the centre of the global batch, and the same EMA.
        """
        if self.teacher_encoder is None:
            raise RuntimeError("the teacher encoder has not been created yet (run a forward pass first)")
        decay = self.moving_average_decay
        teacher_params = list(self.teacher_encoder.parameters())
        student_params = [p.detach() for p in self.student_encoder.parameters()]
        if len(teacher_params) != len(student_params):
            raise RuntimeError("the teacher and the student have different parameters; call reset_moving_average()")
        # Two roundings per element, as vit-pytorch's old * decay + (1 - decay) * new.
        torch._foreach_mul_(teacher_params, decay)
        torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1 - decay))

        all_reduce_mean_(self.last_teacher_centers, self._last_center_weight, self.process_group)
        center_decay = self.center_moving_average_decay
        self.teacher_centers.copy_(self.teacher_centers * center_decay + (1 - center_decay) * self.last_teacher_centers)

    def forward(self, x: Tensor, return_embedding: bool = False, return_projection: bool = True,
                student_temp: Optional[float] = None, teacher_temp: Optional[float] = None):
        if return_embedding:
            return self.student_encoder(x, return_projection=return_projection)
        student_temp = self.student_temp if student_temp is None else student_temp
        teacher_temp = self.teacher_temp if teacher_temp is None else teacher_temp
        _check_temperatures(student_temp, teacher_temp)

        image_one, image_two = self.augment1(x), self.augment2(x)
        local_image_one, local_image_two = self.local_crop(image_one), self.local_crop(image_two)
        global_image_one, global_image_two = self.global_crop(image_one), self.global_crop(image_two)

        student_proj_one, _ = self.student_encoder(local_image_one)  # (b, K)
        student_proj_two, _ = self.student_encoder(local_image_two)
        with torch.no_grad():
            teacher_encoder = self._get_teacher_encoder()
            teacher_proj_one, _ = teacher_encoder(global_image_one)  # (b, K)
            teacher_proj_two, _ = teacher_encoder(global_image_two)

        def loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
            return loss_fn(teacher_logits, student_logits, teacher_temp=teacher_temp, student_temp=student_temp,
                           centers=self.teacher_centers)

        teacher_logits = torch.cat((teacher_proj_one, teacher_proj_two))  # (2b, K)
        self.last_teacher_centers.copy_(teacher_logits.mean(dim=0))
        self._last_center_weight = float(teacher_logits.shape[0])
        return (loss(teacher_proj_one, student_proj_two) + loss(teacher_proj_two, student_proj_one)) / 2

    def _vit_pytorch_convert(self, state_dict: dict) -> dict:
        net = self.net
        prefixes = {"net.": net, "student_encoder.net.": net}
        if self.teacher_encoder is not None:
            prefixes["teacher_encoder.net."] = self.teacher_encoder.net
        return convert_nested_state_dict(state_dict, prefixes)

    def load_vit_pytorch_state_dict(self, state_dict, strict: bool = True):
        """Load a vit-pytorch 1.26.x ``Dino`` ``state_dict`` (net, projectors, teacher, centres).

        Raises:
            ValueError: naming the missing, unexpected and mis-shaped keys.
        """
        return load_vit_pytorch_state_dict(self, state_dict, strict=strict)


def _check_temperatures(student_temp: float, teacher_temp: float) -> None:
    for name, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
