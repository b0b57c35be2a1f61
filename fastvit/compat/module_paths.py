"""vit-pytorch's module paths, served from one table.

``from vit_pytorch.cait import CaiT`` becomes ``from fastvit.cait import CaiT``: every module path of
vit-pytorch's README (``fastvit.vit``, ``fastvit.cait``, ``fastvit.distill``, ``fastvit.mae``, ...)
imports, with the names vit-pytorch has there. They are not files: ``fastvit/__init__.py`` installs
a finder that builds each such module on first import from ``MODULE_PATHS`` (the real code lives in
``fastvit.models``, ``fastvit.ssl`` and ``fastvit.layers``), so the package root shows the package's
own parts. The objects are the same (``fastvit.cait.CaiT is fastvit.models.cait.CaiT``), so
checkpoints, pickles and ``isinstance`` are unaffected.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MODULE_PATHS", "install"]

# fastvit.<name> -> {source module: [names]}
MODULE_PATHS = {
    "ats_vit": {"fastvit.layers": ["FeedForward"],
                "fastvit.models.ats_vit": ["AdaptiveTokenSampling", "Attention", "Transformer", "ViT"]},
    "cait": {"fastvit.models.cait": ["CaiT", "LayerScale", "TalkingHeadsAttention", "Transformer"]},
    "cct": {"fastvit.models.cct": ["CCT", "Tokenizer", "TransformerClassifier", "cct_2", "cct_4", "cct_6", "cct_7",
                                   "cct_8", "cct_14", "cct_16"]},
    "cross_vit": {"fastvit.models.cross_vit": ["Attention", "CrossTransformer", "CrossViT", "ImageEmbedder",
                                               "MultiScaleEncoder", "Transformer"]},
    "crossformer": {"fastvit.models.crossformer": ["Attention", "CrossEmbedLayer", "CrossFormer",
                                                   "DynamicPositionBias", "FeedForward", "Transformer"]},
    "cvt": {"fastvit.models.cvt": ["Attention", "ChanLayerNorm", "CvT", "DepthWiseConv2d", "FeedForward",
                                   "Transformer"]},
    "deepvit": {"fastvit.models.deepvit": ["DeepViT", "ReAttention", "Transformer"]},
    "dino": {"fastvit.ssl.dino": ["MLP", "Dino", "L2Norm", "NetWrapper", "RandomApply", "loss_fn"]},
    "distill": {"fastvit.models.vit": ["DistillableViT"], "fastvit.models.t2t": ["DistillableT2TViT"],
                "fastvit.models.efficient": ["DistillableEfficientViT"], "fastvit.ssl.distill": ["DistillWrapper"]},
    "efficient": {"fastvit.models.efficient": ["ViT"]},
    "levit": {"fastvit.models.levit": ["Attention", "FeedForward", "LeViT", "Transformer"]},
    "mae": {"fastvit.ssl.mae": ["MAE"]},
    "mobile_vit": {"fastvit.models.mobile_vit": ["MobileViT", "MobileViTBlock", "MV2Block", "conv_1x1_bn",
                                                 "conv_nxn_bn"]},
    "mpp": {"fastvit.ssl.mpp": ["MPP", "MPPLoss"]},
    "na_vit": {"fastvit.models.na_vit": ["Attention", "LayerNorm", "NaViT", "RMSNorm", "Transformer",
                                         "group_images_by_max_seq_len"]},
    "nest": {"fastvit.models.nest": ["Aggregate", "Attention", "NesT", "Transformer"]},
    "pit": {"fastvit.models.pit": ["DepthWiseConv2d", "PiT", "Pool"]},
    "recorder": {"fastvit.models.recorder": ["Recorder"]},
    "regionvit": {"fastvit.models.regionvit": ["PEG", "Attention", "Downsample", "FeedForward", "R2LTransformer",
                                               "RegionViT"]},
    "simmim": {"fastvit.ssl.simmim": ["SimMIM"]},
    "simple_vit": {"fastvit.models.simple_vit": ["SimpleViT"]},
    "t2t": {"fastvit.models.t2t": ["RearrangeImage", "T2TViT", "conv_output_size"]},
    "twins_svt": {"fastvit.models.twins_svt": ["PEG", "GlobalAttention", "LocalAttention", "PatchEmbedding",
                                               "Residual", "Transformer", "TwinsSVT"]},
    "vit": {"fastvit.layers": ["Attention", "FeedForward", "Transformer"], "fastvit.models.vit": ["ViT"]},
}


class _ModulePathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``fastvit.<name>`` for the names of ``MODULE_PATHS`` and fills the module from its sources."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == "fastvit" and name in MODULE_PATHS:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        name = module.__name__.rpartition(".")[2]
        module.__doc__ = f"vit-pytorch module path ``vit_pytorch.{name}`` (see fastvit.compat.module_paths)."
        exported = []
        for source, names in MODULE_PATHS[name].items():
            src = importlib.import_module(source)
            for attr in names:
                setattr(module, attr, getattr(src, attr))
                exported.append(attr)
        module.__all__ = exported


def install() -> None:
    """Make ``fastvit.<name>`` importable for every entry of ``MODULE_PATHS`` (idempotent)."""
    if not any(isinstance(f, _ModulePathFinder) for f in sys.meta_path):
        sys.meta_path.append(_ModulePathFinder())
