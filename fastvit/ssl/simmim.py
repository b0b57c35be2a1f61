"""SimMIM: "A Simple Framework for Masked Image Modeling" (Xie et al., arXiv 2111.09886).

Self-supervised pre-training of a ViT: a random ``masking_ratio`` of the patch embeddings is replaced
by a shared learned mask token (positions are still added), the encoder (``encoder.transformer``)
sees the whole sequence, and one linear layer maps each encoded masked token back to the raw pixels
of its patch. The loss is the L1 distance on the masked patches' pixels (``(p1 p2 c)`` order).

vit-pytorch 1.26.x layout and numerics (``vit_pytorch.simmim.SimMIM``): the wrapper shares the
encoder's patch embedding (``to_patch`` = the ``Rearrange``, ``patch_to_emb`` = its norm / Linear /
norm, so they appear twice in the state_dict, as in vit-pytorch), plus ``mask_token (dim,)`` and
``to_pixels``. The encoder runs without its CLS token and without its embedding dropout. Masking
draws ``torch.rand(batch, num_patches).topk(num_masked)`` exactly as vit-pytorch does, so the same
seed gives the same mask and the same loss (to fp32 rounding). The loss is vit-pytorch's
``l1_loss(pred, target) / num_masked``: the mean over the masked pixels (the paper's loss) divided
once more by the number of masked patches, which scales the loss and its gradients by
``1 / num_masked``; ``divide_by_num_masked=False`` gives the paper's scale.

Deliberate differences from vit-pytorch:

- It runs. vit-pytorch 1.26.11 slices the 2-D ``pos_embedding (num_cls + N, dim)`` as if it were the
  old 3-D ``(1, N + 1, dim)`` (``pos_embedding[:, 1:N + 1]``), which fails with a shape error for every
  ``vit.ViT`` (CLS or mean pooling, any ``dim > 2``); here the patches get the rows after the CLS slot,
  if any (what the slice meant).
- Images smaller than the encoder's ``image_size`` take the encoder's positions (the top-left crop of
  the 2-D grid, or the flat slice when the encoder has ``legacy_pos_slicing=True``).
- Bad arguments (a ``masking_ratio`` outside (0, 1) or one that masks no patch, a non-ViT encoder)
  raise ``ValueError`` naming the value instead of asserting or failing later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit.layers import Linear, gather_tokens

from .mae import MaskedImageModeling

__all__ = ["SimMIM"]


class SimMIM(MaskedImageModeling):
    """SimMIM pre-training wrapper around a ViT; ``forward(img)`` returns the scalar loss.

    Args:
        encoder: the ViT to pre-train (``fastvit.ViT``); its weights are trained in place.
        masking_ratio: fraction of the patches to mask (the paper found 0.5 best with 32 px masks).
        divide_by_num_masked: divide the mean L1 loss by the number of masked patches, as vit-pytorch
            does (default). ``False`` returns the paper's loss, the mean over the masked pixels.
    """

    def __init__(self, *, encoder: nn.Module, masking_ratio: float = 0.5, divide_by_num_masked: bool = True):
        super().__init__(encoder=encoder, masking_ratio=masking_ratio)
        self.divide_by_num_masked = divide_by_num_masked
        self.mask_token = nn.Parameter(torch.randn(self.encoder_dim))
        self.to_pixels = Linear(self.encoder_dim, self.pixel_values_per_patch)

    def forward(self, img: Tensor) -> Tensor:
        """Args: img ``(b, c, h, w)``. Returns: the L1 loss between predicted and true masked-patch pixels."""
        patches, tokens, positions, _ = self.embed_patches(img)  # (b, n, patch_dim), (b, n, dim), (n, dim)
        batch, num_patches = patches.shape[:2]
        num_masked = self._num_masked(num_patches)

        # vit-pytorch's draw: the num_masked largest of one uniform per patch are masked.
        masked_indices = torch.rand(batch, num_patches, device=img.device).topk(k=num_masked, dim=-1).indices
        is_masked = torch.zeros(batch, num_patches, dtype=torch.bool, device=img.device)
        is_masked = is_masked.scatter_(-1, masked_indices, True)  # (b, n)

        # where(mask, mask_token, emb) + pos: the same values as vit-pytorch's where(mask, mask_token + pos,
        # emb + pos), with one addition over the sequence instead of two.
        tokens = torch.where(is_masked[..., None], self.mask_token, tokens) + positions
        encoded = self.encoder.transformer(tokens)  # (b, n, dim)

        pred_pixel_values = self.to_pixels(gather_tokens(encoded, masked_indices))  # (b, m, patch_dim)
        masked_patches = gather_tokens(patches, masked_indices)  # (b, m, patch_dim)
        loss = F.l1_loss(pred_pixel_values, masked_patches)
        return loss / num_masked if self.divide_by_num_masked else loss
