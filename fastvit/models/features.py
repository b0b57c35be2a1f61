"""``features_only``: a fastvit model as a backbone that returns feature maps (timm's ``features_only=True``).

``create_model(name, features_only=True, out_indices=...)`` wraps the model in ``FeaturesOnly``:
``forward(img)`` returns a list of ``(b, c, h, w)`` maps (``model.forward_intermediates(...,
intermediates_only=True)``), and ``feature_info.channels()`` / ``.reduction()`` describe them, as timm's
``FeatureInfo`` does (timm's own class when timm is installed; timm is optional, so otherwise a small
class with the same accessors). Meant for the hierarchical models (CvT, PiT, LeViT, Twins-SVT, NesT,
CrossFormer, RegionViT, MobileViT: one map per stage); on ViT-like models the maps are the blocks'
tokens at one stride, as timm's ViT gives them.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from .base import VisionModel, feature_take_indices

__all__ = ["FeaturesOnly", "FeatureInfo", "feature_info_class"]


class FeatureInfo:
    """timm's ``FeatureInfo`` accessors over ``dict(num_chs, reduction, module)`` entries and out indices."""

    def __init__(self, feature_info: list, out_indices: Sequence[int]):
        self.info = feature_info
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: Union[int, Sequence[int], None] = None):
        """``key`` of each output (``idx=None``), of entry ``idx``, or of the entries in ``idx``."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


def feature_info_class() -> type:
    """timm's ``FeatureInfo`` when timm is installed, else fastvit's compatible one."""
    if importlib.util.find_spec("timm") is not None:
        from timm.models._features import FeatureInfo as TimmFeatureInfo

        return TimmFeatureInfo
    return FeatureInfo


class FeaturesOnly(nn.Module):
    """A model's feature maps: ``forward(img) -> [(b, c_i, h / r_i, w / r_i)]`` for ``out_indices``.

    The classifier is dropped (``reset_classifier(0)``: no head weights). The model stays at ``.model``
    (its keys are prefixed ``model.``).

    Args:
        model: a fastvit ``VisionModel``.
        out_indices: entries of ``model.feature_info`` to return (``None`` all, an int the last ``n``).
    """

    def __init__(self, model: VisionModel, out_indices: Union[int, Sequence[int], None] = None):
        super().__init__()
        take, _ = feature_take_indices(len(model.feature_info), out_indices)
        model.reset_classifier(0)
        self.model = model
        self.out_indices = tuple(take)
        self.feature_info = feature_info_class()(copy.deepcopy(model.feature_info), self.out_indices)

    @property
    def pretrained_cfg(self) -> Optional[dict]:
        return self.model.pretrained_cfg

    def forward(self, img: Tensor) -> list:
        return self.model.forward_intermediates(img, indices=list(self.out_indices), intermediates_only=True)
