"""fastvit's optional dependencies: which package a feature needs, the extra that installs it, one check.

fastvit itself needs torch, einops and rich (and triton on Linux). Everything else is optional and is
imported only by the feature that uses it, never when ``fastvit`` is imported:

    package       pip extra              needed by
    torchvision   fastvit[train], [ssl]  fastvit train --data / --val-data (image decoding), Dino's crops
    safetensors   fastvit[train]         fastvit train's checkpoints; .safetensors checkpoints anywhere
    matplotlib    fastvit[train], [plot] fastvit train's metrics.png, fastvit plot, fastvit attention-map
    Pillow        fastvit[plot]          fastvit attention-map (reading and writing images)
    timm          fastvit[timm]          fastvit.patch_timm, create_model("timm/<name>")
    xformers      fastvit[xformers]      the xformers attention backend (unavailable with a reason without it)

A feature asks ``require(module, feature, extra)`` before it starts work, so a missing package is one
sentence (``MissingDependency``, an ``ImportError``) naming the package and the install command, not a
``ModuleNotFoundError`` from deep inside after the work was done.
"""

from __future__ import annotations

import importlib
from typing import Optional

__all__ = ["MissingDependency", "PACKAGES", "importable", "require", "install_hint"]

# import name -> (pip package, the extra that installs it)
PACKAGES = {
    "torchvision": ("torchvision", "train"),
    "safetensors": ("safetensors", "train"),
    "matplotlib": ("matplotlib", "plot"),
    "PIL": ("Pillow", "plot"),
    "timm": ("timm", "timm"),
    "xformers": ("xformers", "xformers"),
    "sklearn": ("scikit-learn", "train"),  # fastvit train --data digits
}


class MissingDependency(ImportError):
    """An optional package a feature needs is not importable; the message says what to install."""

    def __init__(self, module: str, feature: str, extra: Optional[str] = None, cause: Optional[str] = None):
        package, default_extra = PACKAGES.get(module, (module, None))
        self.module, self.package, self.feature = module, package, feature
        self.extra = extra or default_extra
        detail = f" ({cause})" if cause else ""
        super().__init__(f"{feature} needs {package}, which is not importable{detail}: "
                         f"{install_hint(module, self.extra)}")


def install_hint(module: str, extra: Optional[str] = None) -> str:
    """``pip install 'fastvit[train]'`` (or ``pip install <package>`` for a package of no extra)."""
    package, default_extra = PACKAGES.get(module, (module, None))
    extra = extra or default_extra
    return f"pip install 'fastvit[{extra}]'" if extra else f"pip install {package}"


def importable(module: str) -> Optional[str]:
    """None if ``module`` imports, else why not (the error's first line). It is imported, not only
    looked up: a package that is installed but broken counts as missing."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def require(module: str, feature: str, extra: Optional[str] = None) -> None:
    """Raise ``MissingDependency`` unless ``module`` imports.

    Args:
        module: the import name (``"matplotlib"``, ``"PIL"``).
        feature: what needs it, as the start of the sentence (``"fastvit plot"``).
        extra: the fastvit extra to name (default: the package's own, ``PACKAGES``).
    """
    why = importable(module)
    if why is not None:
        raise MissingDependency(module, feature, extra, cause=why)
