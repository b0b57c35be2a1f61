"""fastvit: vit-pytorch's architectures on one pluggable, kernel-backed attention layer.

    from fastvit import ViT
    v = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048)

Module paths mirror vit-pytorch (``fastvit.distill``, ``fastvit.recorder``, ``fastvit.efficient``, ...):
they are served from one table, ``fastvit.compat.module_paths``.
"""

__version__ = "0.1.0"

from .attention import DenseBias, KeyBias, KeyPaddingMask, Packed, RelPosBias, attend, set_backend, use_backend
from .compat import module_paths as _module_paths
from .compat.timm import patch_timm, unpatch_timm
from .layers.packing import pack_images, unpack
from .merge import merge_tokens
from .models import Recorder, SimpleViT, ViT, create_model, list_models, register_model
from .ssl.dino import Dino
from .ssl.mae import MAE

_module_paths.install()  # fastvit.vit, fastvit.cait, ... (vit-pytorch's module paths)

__all__ = [
    "__version__", "ViT", "SimpleViT", "Recorder", "MAE", "Dino",
    "create_model", "list_models", "register_model",
    "attend", "use_backend", "set_backend", "RelPosBias", "DenseBias", "KeyBias", "KeyPaddingMask", "Packed",
    "pack_images", "unpack", "patch_timm", "unpatch_timm", "merge_tokens",
]
