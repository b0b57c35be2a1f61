"""MAE: "Masked Autoencoders Are Scalable Vision Learners" (He et al., arXiv 2111.06377).

Self-supervised pre-training of a ViT: a random ``masking_ratio`` of the patches is dropped, the
encoder (``encoder.transformer``) sees only the visible patches, and a small decoder, given the
encoded patches plus a shared learned mask token at every masked position, reconstructs the raw
pixels of the masked patches. The loss is the MSE on those pixels (``(p1 p2 c)`` order, as the
encoder flattens its patches; no per-patch pixel normalisation).

vit-pytorch 1.26.x layout and numerics (``vit_pytorch.mae.MAE``): the wrapper shares the encoder's
patch embedding (``to_patch`` = the ``Rearrange``, ``patch_to_emb`` = its norm / Linear / norm, so
they appear twice in the state_dict, as in vit-pytorch), ``enc_to_dec`` (a Linear, or Identity when
the widths match, then absent from the state_dict), ``mask_token (decoder_dim,)``, ``decoder`` (the
ViT ``Transformer`` with ``mlp_dim = 4 * decoder_dim``), ``decoder_pos_emb`` (an ``nn.Embedding`` with
as many rows as the encoder's ``pos_embedding``, so one unused row for a CLS encoder) and
``to_pixels``. The encoder runs without its CLS token and without its embedding dropout. Masking
draws ``torch.rand(batch, num_patches).argsort(-1)`` exactly as vit-pytorch does, so the same seed
gives the same mask and the same loss (to fp32 rounding).

Deliberate differences from vit-pytorch:

- Encoders with a CLS token work. vit-pytorch 1.26.11 slices the 2-D ``pos_embedding (N + 1, dim)``
  as if it were the old 3-D ``(1, N + 1, dim)`` (``pos_embedding[:, 1:]``), which fails with a shape
  error for ``pool='cls'``; here the patches get rows ``1 .. N`` (what the slice meant).
- Images smaller than the encoder's ``image_size`` take the encoder's positions (the top-left crop of
  the 2-D grid, or vit-pytorch's flat slice when the encoder has ``legacy_pos_slicing=True``), and
  the decoder positions follow the same cells. vit-pytorch fails on them for mean-pool encoders.
- The decoder runs on ``[mask tokens; visible tokens]`` in shuffled order instead of scattering them
  back into image order: every position is carried by its position embedding and the decoder has no
  order-dependent op, so the loss is the same (up to fp32 summation order) and two gathers are saved.
- The decoder input has the tokens' dtype; vit-pytorch builds it in fp32 (``torch.zeros``), which
  breaks half / bfloat16 models.
- Bad arguments (a ``masking_ratio`` outside (0, 1) or one that masks no patch, a non-ViT encoder,
  bad decoder sizes) raise ``ValueError`` naming the value instead of asserting or failing later.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit.compat.vit_pytorch import convert_nested_state_dict, load_vit_pytorch_state_dict
from fastvit.layers import Linear, Transformer, check_image, gather_tokens, pair

from .distributed import UnusedParametersMixin, parameters_outside

__all__ = ["MAE", "MaskedImageModeling"]


def _check_masking_ratio(masking_ratio) -> float:
    if isinstance(masking_ratio, bool) or not isinstance(masking_ratio, Real) or not 0 < masking_ratio < 1:
        raise ValueError(f"masking_ratio must be a number strictly between 0 and 1, got {masking_ratio!r}")
    return masking_ratio


def _check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class MaskedImageModeling(UnusedParametersMixin, nn.Module):
    """What MAE and SimMIM share: the encoder's patchify / embedding / positions, and the mask size.

    The encoder must be ViT-like (``fastvit.ViT``, or vit-pytorch's ``ViT``): ``to_patch_embedding``
    an ``nn.Sequential`` ``[patchify, norm, Linear(patch_dim, dim), norm]``, ``pos_embedding``
    ``(num_cls + N, dim)`` (or ``(1, num_cls + N, dim)``) and ``transformer`` mapping ``(b, n, dim)`` to
    ``(b, n, dim)``. Optional attributes are used when present: ``num_cls_tokens`` (else read from
    ``cls_token``), ``position_embedding(h, w)``, ``grid``, ``channels`` / ``image_size`` /
    ``patch_size`` (input checks) and ``legacy_pos_slicing``.

    The encoder's other parameters (its CLS token, classifier head) get no gradient: they are
    ``unused_parameters()``, which DistributedDataParallel skips (``fastvit.ssl.distributed``).

    Args:
        encoder: the ViT to pre-train.
        masking_ratio: fraction of the patches to mask, strictly between 0 and 1.
    """

    def __init__(self, *, encoder: nn.Module, masking_ratio: float):
        super().__init__()
        self.masking_ratio = _check_masking_ratio(masking_ratio)
        patch_embedding = self._check_encoder(encoder)

        # Same attributes, in the same order, as vit-pytorch (state_dict keys and init order).
        self.encoder = encoder
        self.num_positions, self.encoder_dim = encoder.pos_embedding.shape[-2:]
        self.to_patch = patch_embedding[0]
        self.patch_to_emb = nn.Sequential(*list(patch_embedding)[1:])  # shares the encoder's modules
        self.pixel_values_per_patch = patch_embedding[2].weight.shape[-1]

        num_cls = getattr(encoder, "num_cls_tokens", None)
        if num_cls is None:
            cls_token = getattr(encoder, "cls_token", None)
            num_cls = cls_token.shape[-2] if isinstance(cls_token, Tensor) and cls_token.dim() >= 2 else 0
        self.num_cls_tokens = int(num_cls)
        self.num_patches = self.num_positions - self.num_cls_tokens
        if self.num_patches < 1:
            raise ValueError(f"the encoder's pos_embedding has {self.num_positions} rows for "
                             f"{self.num_cls_tokens} CLS token(s): no patch positions")
        self._num_masked(self.num_patches)  # a ratio that masks nothing at full size fails here, not in forward

    def _unused_parameter_objects(self) -> list:
        # forward calls the patch embedding, the positions and the transformer of the encoder, nothing else
        return parameters_outside(self.encoder, ("to_patch_embedding.", "pos_embedding", "transformer."))

    @staticmethod
    def _check_encoder(encoder) -> nn.Sequential:
        name = type(encoder).__name__
        missing = [a for a in ("to_patch_embedding", "pos_embedding", "transformer") if not hasattr(encoder, a)]
        if not isinstance(encoder, nn.Module) or missing:
            raise ValueError(f"encoder must be a ViT-like model (fastvit.ViT) with to_patch_embedding, "
                             f"pos_embedding and transformer; {name} has no {', '.join(missing) or 'nn.Module base'}")
        patch_embedding = encoder.to_patch_embedding
        if (not isinstance(patch_embedding, nn.Sequential) or len(patch_embedding) < 3
                or not isinstance(getattr(patch_embedding[2], "weight", None), Tensor)
                or patch_embedding[2].weight.dim() != 2):
            raise ValueError(f"{name}.to_patch_embedding must be an nn.Sequential [patchify, norm, "
                             f"Linear(patch_dim, dim), ...] as in ViT, got {type(patch_embedding).__name__}")
        pos = encoder.pos_embedding
        if not isinstance(pos, Tensor) or not (pos.dim() == 2 or (pos.dim() == 3 and pos.shape[0] == 1)):
            shape = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
            raise ValueError(f"{name}.pos_embedding must be (num_cls + N, dim) or (1, num_cls + N, dim), got {shape}")
        dim = patch_embedding[2].weight.shape[0]
        if pos.shape[-1] != dim:
            raise ValueError(f"{name}.pos_embedding width {pos.shape[-1]} != patch embedding width {dim}")
        return patch_embedding

    def _num_masked(self, num_patches: int) -> int:
        """``int(masking_ratio * num_patches)`` as vit-pytorch computes it; at least one patch on each side."""
        num_masked = int(self.masking_ratio * num_patches)
        if not 0 < num_masked < num_patches:
            raise ValueError(f"masking_ratio={self.masking_ratio} masks {num_masked} of {num_patches} patches; "
                             f"it must mask at least one patch and leave at least one")
        return num_masked

    def _input_grid(self, img: Tensor) -> Optional[tuple]:
        """The patch grid ``(h, w)`` of ``img``, checking the image against the encoder when it can."""
        enc = self.encoder
        patch_size = getattr(enc, "patch_size", None)
        if patch_size is None:
            return None
        channels, image_size = getattr(enc, "channels", None), getattr(enc, "image_size", None)
        if channels is not None and image_size is not None:
            check_image(img, channels=channels, max_size=image_size, patch_size=patch_size)
        ph, pw = pair(patch_size)
        return img.shape[-2] // ph, img.shape[-1] // pw

    def _patch_positions(self, grid: Optional[tuple], num_patches: int) -> Tensor:
        """``(n, dim)``: the encoder's position embeddings of the input's patches (no CLS row)."""
        enc = self.encoder
        if grid is not None and callable(getattr(enc, "position_embedding", None)):
            return enc.position_embedding(*grid)[self.num_cls_tokens:]
        pos = enc.pos_embedding.reshape(self.num_positions, self.encoder_dim)
        return pos[self.num_cls_tokens:self.num_cls_tokens + num_patches]

    def embed_patches(self, img: Tensor) -> tuple:
        """Patchify and embed ``img``.

        Returns:
            ``patches (b, n, patch_dim)`` (the reconstruction targets), ``tokens (b, n, dim)`` (patch
            embeddings, no positions), ``positions (n, dim)`` and the patch grid ``(h, w)`` (``None``
            when the encoder does not say its patch size).
        """
        grid = self._input_grid(img)
        patches = self.to_patch(img)  # (b, n, p1 * p2 * c)
        tokens = self.patch_to_emb(patches)  # (b, n, dim)
        return patches, tokens, self._patch_positions(grid, patches.shape[1]), grid

    def load_vit_pytorch_state_dict(self, state_dict: Mapping, strict: bool = True):
        """Load the ``state_dict`` of the vit-pytorch wrapper (encoder included) built with the same arguments.

        The ``encoder.*`` part goes through the encoder's own converter (older layouts, renames).

        Raises:
            ValueError: naming the missing, unexpected and mis-shaped keys.
        """
        return load_vit_pytorch_state_dict(self, state_dict, strict=strict)

    def _vit_pytorch_convert(self, state_dict: dict) -> dict:
        """The converter hook of ``fastvit.compat``: the ``encoder.*`` part goes through the encoder's."""
        return convert_nested_state_dict(state_dict, {"encoder.": self.encoder})


class MAE(MaskedImageModeling):
    """Masked autoencoder pre-training wrapper around a ViT; ``forward(img)`` returns the scalar loss.

    Args:
        encoder: the ViT to pre-train (``fastvit.ViT``); its weights are trained in place.
        decoder_dim: width of the decoder tokens.
        masking_ratio: fraction of the patches to mask (the paper uses 0.75).
        decoder_depth: number of decoder blocks.
        decoder_heads: decoder attention heads.
        decoder_dim_head: width of each decoder head.
    """

    def __init__(self, *, encoder: nn.Module, decoder_dim: int, masking_ratio: float = 0.75, decoder_depth: int = 1,
                 decoder_heads: int = 8, decoder_dim_head: int = 64):
        super().__init__(encoder=encoder, masking_ratio=masking_ratio)
        decoder_dim = _check_size("decoder_dim", decoder_dim)
        decoder_depth = _check_size("decoder_depth", decoder_depth, minimum=0)
        decoder_heads = _check_size("decoder_heads", decoder_heads)
        decoder_dim_head = _check_size("decoder_dim_head", decoder_dim_head)

        self.decoder_dim = decoder_dim
        self.enc_to_dec = Linear(self.encoder_dim, decoder_dim) if self.encoder_dim != decoder_dim else nn.Identity()
        self.mask_token = nn.Parameter(torch.randn(decoder_dim))
        self.decoder = Transformer(decoder_dim, decoder_depth, decoder_heads, decoder_dim_head, decoder_dim * 4)
        self.decoder_pos_emb = nn.Embedding(self.num_positions, decoder_dim)
        self.to_pixels = Linear(decoder_dim, self.pixel_values_per_patch)

    def _decoder_position_ids(self, grid: Optional[tuple], patch_indices: Tensor) -> Tensor:
        """Rows of ``decoder_pos_emb`` for the input's patch indices: the same 2-D cells the encoder used."""
        full_grid = getattr(self.encoder, "grid", None)
        if (grid is None or full_grid is None or tuple(grid) == tuple(full_grid)
                or getattr(self.encoder, "legacy_pos_slicing", False)):
            return patch_indices
        h, w = grid
        rows = torch.arange(h, device=patch_indices.device)[:, None] * full_grid[1]
        cell_ids = (rows + torch.arange(w, device=patch_indices.device)).flatten()  # (h * w,)
        return cell_ids[patch_indices]

    def forward(self, img: Tensor) -> Tensor:
        """Args: img ``(b, c, h, w)``. Returns: the MSE between predicted and true masked-patch pixels."""
        patches, tokens, positions, grid = self.embed_patches(img)
        tokens = tokens + positions  # (b, n, dim)
        batch, num_patches = patches.shape[:2]
        num_masked = self._num_masked(num_patches)

        # vit-pytorch's draw: a random permutation per image; the first num_masked patches are masked.
        rand_indices = torch.rand(batch, num_patches, device=img.device).argsort(dim=-1)  # (b, n)
        masked_indices, unmasked_indices = rand_indices[:, :num_masked], rand_indices[:, num_masked:]

        encoded = self.encoder.transformer(gather_tokens(tokens, unmasked_indices))  # (b, n - m, dim)
        masked_patches = gather_tokens(patches, masked_indices)  # (b, m, patch_dim)

        # Decoder tokens in shuffled order [masked; visible]: positions travel with the embeddings and the
        # decoder is permutation-equivariant, so no scatter back into image order is needed.
        decoder_pos = self.decoder_pos_emb(self._decoder_position_ids(grid, rand_indices))  # (b, n, d)
        mask_tokens = self.mask_token + decoder_pos[:, :num_masked]  # (b, m, d)
        visible_tokens = self.enc_to_dec(encoded) + decoder_pos[:, num_masked:]  # (b, n - m, d)
        decoded = self.decoder(torch.cat((mask_tokens, visible_tokens.to(mask_tokens.dtype)), dim=1))

        pred_pixel_values = self.to_pixels(decoded[:, :num_masked])  # (b, m, patch_dim)
        return F.mse_loss(pred_pixel_values, masked_patches)

