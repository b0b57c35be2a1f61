"""Checkpoint converters."""

from .vit_pytorch import convert_vit_pytorch_state_dict, load_vit_pytorch_state_dict

__all__ = ["load_vit_pytorch_state_dict", "convert_vit_pytorch_state_dict"]
