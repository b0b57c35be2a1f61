"""Checkpoint converters (vit-pytorch) and the in-place timm patch (``patch_timm``)."""

from .timm import patch_summary, patch_timm, unpatch_timm
from .vit_pytorch import convert_vit_pytorch_state_dict, load_vit_pytorch_state_dict

__all__ = ["load_vit_pytorch_state_dict", "convert_vit_pytorch_state_dict", "patch_timm", "unpatch_timm",
           "patch_summary"]
