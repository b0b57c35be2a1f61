"""fastvit architectures, one file each, plus the registry.

Importing this package registers every preset (``list_models()``).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import VisionModel
from .recorder import Recorder
from .registry import create_model, get_model_entry, list_models, register_model
from .simple_vit import SimpleViT
from .vit import DistillableViT, ViT

# Every model file registers its presets when imported; import them all so list_models() is complete.
for _info in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["VisionModel", "ViT", "SimpleViT", "DistillableViT", "Recorder",
           "create_model", "get_model_entry", "list_models", "register_model"]
