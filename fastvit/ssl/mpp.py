"""MPP: masked patch prediction, the self-supervised objective of ViT (Dosovitskiy et al., arXiv 2010.11929,
appendix B.1.2), BERT-style (Devlin et al., arXiv 1810.04805).

``ceil(mask_prob * n)`` patches per image are picked at random. Of those, a fraction ``replace_prob`` is
replaced by a learned mask token (in raw pixel space, before the patch embedding), a fraction
``random_patch_prob`` by another patch of the same image, and the rest is left as is. The encoder
(``transformer.transformer`` over ``[cls] + patches + positions``) then predicts, for every picked patch,
its mean colour quantised to ``output_channel_bits`` bits per channel: a ``2 ** (bits * channels)``-way
classification (``to_bits``), trained with cross entropy.

Layout (vit-pytorch 1.26.x keys): ``transformer.*`` (the wrapped model), ``patch_to_emb.0.{1,2,3}.*``
(the model's patch embedding without its ``Rearrange``, shared with the model), ``to_bits.{weight,bias}``
``(2 ** (bits * channels), dim)``, ``mask_token (1, 1, channels * ph * pw)``. The wrapped model needs
vit-pytorch's ViT surface: ``to_patch_embedding`` (an ``nn.Sequential`` starting with the patch
``Rearrange``), ``cls_token``, ``pos_embedding``, ``transformer`` and optionally ``dropout``; fastvit's
``ViT``, ``DeepViT`` and ``DistillableViT`` have it.

Random numbers are drawn as vit-pytorch draws them (same calls, shapes, generators and order: the patch
ranking on the input's device, the random-patch and mask-token Bernoulli masks from the CPU generator,
the random patch indices on the input's device), so the same seed gives the same loss.

Deliberate differences from vit-pytorch:

- It works with vit-pytorch 1.26's 2-D ``cls_token (num_cls, dim)`` / ``pos_embedding (N + num_cls, dim)``
  (fastvit's ``ViT``) and with ``pool="mean"`` models that have no CLS token; vit-pytorch's MPP raises an
  ``EinopsError`` on both. The 3-D ``(1, 1, dim)`` / ``(1, N + 1, dim)`` layout (DeepViT) works as before.
- Images smaller than the model's ``image_size`` take the model's own ``position_embedding(h, w)`` (the
  top-left crop of the 2-D grid, or the flat slice when the model was built with
  ``legacy_pos_slicing=True``); vit-pytorch always slices the flat table. Full-size images are unaffected.
- ``mean`` / ``std`` are non-persistent buffers, so they follow ``.to(device)`` (vit-pytorch keeps CPU
  tensors that fail against CUDA images) and stay out of the ``state_dict`` (as in vit-pytorch).
- Bad arguments raise ``ValueError`` naming the value: probabilities outside [0, 1], ``mask_prob = 0``
  (vit-pytorch returns a NaN loss), ``random_patch_prob + replace_prob > 1`` (vit-pytorch divides by zero
  at ``replace_prob = 1`` and otherwise silently gives every masked patch a random patch), ``mean``
  without ``std``, and a ``patch_size`` / ``dim`` / ``channels`` that does not match the model. Images
  with the wrong channel count or a size not divisible by the patch fail up front.
- Vectorised without host syncs: ``torch.where`` replaces boolean-mask assignment, only the masked tokens
  go through ``to_bits`` and the cross entropy (the same loss up to fp32 summation order), and the two
  CPU-drawn masks are copied to the device with ``non_blocking=True``.
- ``patch_size`` may be an ``(h, w)`` pair.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from fastvit.compat.vit_pytorch import convert_nested_state_dict, load_vit_pytorch_state_dict
from fastvit.layers import Linear, check_image, pair

from .distributed import UnusedParametersMixin, parameters_outside

__all__ = ["MPP", "MPPLoss", "convert_nested_state_dict"]


def _check_probability(name: str, value: float, *, allow_zero: bool = True) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def _cpu_bernoulli_mask(batch: int, seq_len: int, prob: float, device: torch.device) -> Tensor:
    """vit-pytorch's ``prob_mask_like``: drawn from the CPU generator whatever the device, ``(b, n)`` bool.

    A non-blocking host-to-device copy from pageable memory is safe (the driver stages the source before
    the call returns) and spares the stream synchronisation PyTorch adds to a blocking copy.
    """
    mask = torch.zeros((batch, seq_len), dtype=torch.float32).uniform_(0, 1) < prob
    return mask.to(device, non_blocking=True)


class MPPLoss(nn.Module):
    """Cross entropy of the predicted colour bins against each patch's quantised mean colour.

    Args:
        patch_size: int or (ph, pw). channels: image channels. output_channel_bits: bits per channel.
        max_pixel_val: the largest pixel value (after un-normalising); values are clamped to it.
        mean, std: per-channel statistics the images were normalised with (both or neither); the
            targets are computed on ``image * std + mean``.
    """

    def __init__(self, patch_size, channels: int, output_channel_bits: int, max_pixel_val: float,
                 mean: Optional[Union[float, Sequence[float], Tensor]],
                 std: Optional[Union[float, Sequence[float], Tensor]]):
        super().__init__()
        self.patch_size = pair(patch_size)
        self.channels = channels
        self.output_channel_bits = output_channel_bits
        self.max_pixel_val = max_pixel_val
        if (mean is None) != (std is None):
            raise ValueError(f"mean and std must be given together, got mean={mean!r}, std={std!r}")
        stats = {}
        for name, value in (("mean", mean), ("std", std)):
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1)  # (c, 1, 1)
            if value.shape[0] not in (1, channels):
                raise ValueError(f"{name} must have 1 or {channels} (channels) values, got {value.shape[0]}")
            stats[name] = value
        self.register_buffer("mean", stats.get("mean"), persistent=False)
        self.register_buffer("std", stats.get("std"), persistent=False)

    def target_labels(self, target: Tensor) -> Tensor:
        """Class index of every patch's quantised mean colour: image ``(b, c, H, W)`` -> ``(b, n)`` int64."""
        (ph, pw), c, mpv, bits = self.patch_size, self.channels, self.max_pixel_val, self.output_channel_bits
        device = target.device
        bin_size = mpv / (2 ** bits)
        if self.mean is not None:
            target = target * self.std + self.mean  # un-normalise
        target = target.clamp(max=mpv)
        avg_target = reduce(target, "b c (h p1) (w p2) -> b (h w) c", "mean", p1=ph, p2=pw).contiguous()
        channel_bins = torch.arange(bin_size, mpv, bin_size, device=device)  # the 2**bits - 1 inner edges
        discretized_target = torch.bucketize(avg_target, channel_bins)  # (b, n, c) in [0, 2**bits)
        bin_mask = (2 ** bits) ** torch.arange(0, c, device=device).long()  # (c,) place values
        return (bin_mask * discretized_target).sum(dim=-1)  # (b, n)

    def forward(self, predicted_patches: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """vit-pytorch's signature: logits ``(b, n, classes)``, images ``(b, c, H, W)``, ``mask (b, n)`` bool.

        The mean over the masked patches is taken with a weighted sum rather than boolean indexing, so
        there is no host sync. (``MPP`` itself gathers the masked patches first and skips this.)
        """
        labels = self.target_labels(target)
        per_patch = F.cross_entropy(predicted_patches.flatten(0, 1), labels.flatten(), reduction="none")
        weights = mask.flatten().to(per_patch.dtype)
        return (per_patch * weights).sum() / weights.sum()


class MPP(UnusedParametersMixin, nn.Module):
    """Masked patch prediction on a ViT-like model, with vit-pytorch's constructor.

    Args:
        transformer: the model to pre-train (fastvit ``ViT``, ``DeepViT``, ...).
        patch_size: the model's patch size, int or (ph, pw).
        dim: the model's token width.
        output_channel_bits: bits per colour channel of the target (``2 ** (bits * channels)`` classes).
        channels: image channels. max_pixel_val: the largest pixel value of un-normalised images.
        mask_prob: fraction of patches to predict (``ceil(mask_prob * n)`` per image), in (0, 1].
        replace_prob: fraction of those replaced by the mask token.
        random_patch_prob: fraction of those replaced by a random patch of the same image;
            ``replace_prob + random_patch_prob <= 1``.
        mean, std: per-channel statistics the input images were normalised with (both or neither).

    ``forward(images (b, c, H, W), **kwargs) -> loss`` (scalar); ``kwargs`` go to ``transformer.transformer``.

    Differences from vit-pytorch (module docstring): it runs vit-pytorch 1.26's 2-D CLS layout and models
    without a CLS token (vit-pytorch's MPP raises on both), validates its arguments with ``ValueError`` s,
    and is sync-free. For every configuration both accept, the loss is vit-pytorch's for the same
    weights and seed, except on images narrower than the model, whose positions follow the model's
    ``position_embedding`` (its ``legacy_pos_slicing=True`` restores vit-pytorch's flat slice).

    The model's classifier head gets no gradient: it is in ``unused_parameters()``, which
    DistributedDataParallel skips (``fastvit.ssl.distributed``).
    """

    def __init__(self, transformer: nn.Module, patch_size, dim: int, output_channel_bits: int = 3,
                 channels: int = 3, max_pixel_val: float = 1.0, mask_prob: float = 0.15, replace_prob: float = 0.5,
                 random_patch_prob: float = 0.5, mean=None, std=None):
        super().__init__()
        self.mask_prob = _check_probability("mask_prob", mask_prob, allow_zero=False)
        self.replace_prob = _check_probability("replace_prob", replace_prob)
        self.random_patch_prob = _check_probability("random_patch_prob", random_patch_prob)
        if random_patch_prob + replace_prob > 1 + 1e-9:
            raise ValueError(f"random_patch_prob + replace_prob must be at most 1 (they split the masked patches), "
                             f"got {random_patch_prob!r} + {replace_prob!r}")
        if not isinstance(output_channel_bits, int) or output_channel_bits < 1:
            raise ValueError(f"output_channel_bits must be a positive int, got {output_channel_bits!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not max_pixel_val > 0:
            raise ValueError(f"max_pixel_val must be positive, got {max_pixel_val!r}")
        self.patch_size = pair(patch_size)
        self.channels = channels
        _check_model(transformer, self.patch_size, dim, channels)

        self.transformer = transformer
        self.loss = MPPLoss(self.patch_size, channels, output_channel_bits, max_pixel_val, mean, std)
        # The patch embedding without its Rearrange; keys patch_to_emb.0.{1,2,3} as in vit-pytorch.
        embedding_layers = list(transformer.to_patch_embedding._modules.items())[1:]
        self.patch_to_emb = nn.Sequential(nn.Sequential(OrderedDict(embedding_layers)))
        self.to_bits = Linear(dim, 2 ** (output_channel_bits * channels))
        self.dim = dim
        self.mask_token = nn.Parameter(torch.randn(1, 1, channels * self.patch_size[0] * self.patch_size[1]))

    def _unused_parameter_objects(self) -> list:
        # forward runs the patch embedding, CLS token, positions and blocks of the model, not its head
        return parameters_outside(self.transformer, ("to_patch_embedding.", "cls_token", "pos_embedding",
                                                     "transformer."))

    def corrupt(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """BERT-style corruption of raw pixel patches.

        Args:
            patches: ``(b, n, ph * pw * c)``, flattened ``(p1 p2 c)`` as the patch embedding expects.

        Returns:
            ``(corrupted (b, n, ph * pw * c), masked_indices (b, k))`` with ``k = ceil(mask_prob * n)``:
            the patches to predict, in no particular order.
        """
        batch, seq_len, patch_dim = patches.shape
        device = patches.device
        num_masked = math.ceil(self.mask_prob * seq_len)
        rand = torch.rand((batch, seq_len), device=device)
        masked_indices = rand.topk(num_masked, dim=-1).indices  # (b, k)
        mask = torch.zeros((batch, seq_len), dtype=torch.bool, device=device).scatter_(1, masked_indices, True)

        corrupted = patches
        if self.random_patch_prob > 0:
            # Drawn independently of the mask-token choice below, which wins where both hit, hence the
            # rescaling: P(random patch | masked) = sampling_prob * (1 - replace_prob) = random_patch_prob.
            sampling_prob = self.random_patch_prob / (1 - self.replace_prob)
            use_random = _cpu_bernoulli_mask(batch, seq_len, sampling_prob, device) & mask  # (b, n)
            source = torch.randint(0, seq_len, (batch, seq_len), device=device)  # (b, n) patch to copy
            random_patches = patches.gather(1, source.unsqueeze(-1).expand(-1, -1, patch_dim))  # (b, n, P)
            corrupted = torch.where(use_random.unsqueeze(-1), random_patches, corrupted)
        use_token = _cpu_bernoulli_mask(batch, seq_len, self.replace_prob, device) & mask  # (b, n)
        corrupted = torch.where(use_token.unsqueeze(-1), self.mask_token.to(patches.dtype), corrupted)
        return corrupted, masked_indices

    def _positions(self, h: int, w: int, num_tokens: int) -> Tensor:
        model = self.transformer
        if callable(getattr(model, "position_embedding", None)):
            return model.position_embedding(h, w)
        return model.pos_embedding.reshape(-1, self.dim)[:num_tokens]  # vit-pytorch's flat slice

    def forward(self, input: Tensor, **kwargs) -> Tensor:
        model = self.transformer
        (ph, pw), dim = self.patch_size, self.dim
        max_size = getattr(model, "image_size", None)
        if max_size is None:  # a model without image_size: the position table bounds the size below
            max_size = tuple(input.shape[-2:]) if isinstance(input, Tensor) else 1
        check_image(input, channels=self.channels, max_size=max_size, patch_size=self.patch_size)
        img = input.detach()
        h, w = img.shape[-2] // ph, img.shape[-1] // pw

        patches = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)  # (b, n, P)
        corrupted, masked_indices = self.corrupt(patches)

        tokens = self.patch_to_emb(corrupted)  # (b, n, dim)
        batch, num_patches, _ = tokens.shape
        cls_tokens = model.cls_token.reshape(-1, dim)  # (num_cls, dim); num_cls = 0 without a CLS token
        num_cls = cls_tokens.shape[0]
        positions = self._positions(h, w, num_cls + num_patches)
        if positions.shape[-2] != num_cls + num_patches:
            raise ValueError(f"the model has positions for {positions.shape[-2] - num_cls} patches, "
                             f"the image has {num_patches}")
        tokens = torch.cat((cls_tokens.expand(batch, -1, -1), tokens), dim=1) + positions  # (b, num_cls + n, dim)
        dropout = getattr(model, "dropout", None)
        if dropout is not None:
            tokens = dropout(tokens)
        tokens = model.transformer(tokens, **kwargs)  # (b, num_cls + n, dim)

        index = masked_indices.unsqueeze(-1).expand(-1, -1, dim)  # (b, k, dim)
        masked_tokens = tokens[:, num_cls:].gather(1, index)  # (b, k, dim)
        logits = self.to_bits(masked_tokens)  # (b, k, 2 ** (bits * c))
        labels = self.loss.target_labels(img).gather(1, masked_indices)  # (b, k)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def _vit_pytorch_convert(self, state_dict: dict) -> dict:
        # patch_to_emb.0.* alias transformer.to_patch_embedding.*: take them from the converted model keys.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("patch_to_emb.")}
        out = convert_nested_state_dict(state_dict, {"transformer.": self.transformer})
        for key in self.patch_to_emb.state_dict():  # "0.{1,2,3}.weight" -> transformer.to_patch_embedding.{1,2,3}
            source = "transformer.to_patch_embedding." + key.split(".", 1)[1]
            if source in out:
                out["patch_to_emb." + key] = out[source]
        return out

    def load_vit_pytorch_state_dict(self, state_dict, strict: bool = True):
        """Load a vit-pytorch 1.26.x ``MPP`` ``state_dict`` (model, ``to_bits``, ``mask_token``).

        Raises:
            ValueError: naming the missing, unexpected and mis-shaped keys.
        """
        return load_vit_pytorch_state_dict(self, state_dict, strict=strict)


def _check_model(model: nn.Module, patch_size: tuple, dim: int, channels: int) -> None:
    """The model must have vit-pytorch's ViT surface and match MPP's patch size, width and channels."""
    missing = [name for name in ("to_patch_embedding", "cls_token", "pos_embedding", "transformer")
               if getattr(model, name, None) is None]
    if missing:
        raise ValueError(f"MPP needs a ViT-like model with to_patch_embedding, cls_token, pos_embedding and "
                         f"transformer; {type(model).__name__} has no {', '.join(missing)}")
    embedding = model.to_patch_embedding
    if not isinstance(embedding, nn.Sequential) or len(embedding) < 2:
        raise ValueError(f"MPP needs to_patch_embedding to be an nn.Sequential (Rearrange, ...), "
                         f"got {type(embedding).__name__}")
    if model.pos_embedding.shape[-1] != dim:
        raise ValueError(f"dim={dim} does not match the model's width {model.pos_embedding.shape[-1]}")
    model_patch = getattr(model, "patch_size", None)
    if model_patch is not None and pair(model_patch) != patch_size:
        raise ValueError(f"patch_size={patch_size} does not match the model's patch size {pair(model_patch)}")
    model_channels = getattr(model, "channels", None)
    if isinstance(model_channels, int) and model_channels != channels:
        raise ValueError(f"channels={channels} does not match the model's {model_channels} channels")
