"""fastvit: Vision Transformers on one pluggable, kernel-backed attention layer.

`kernels/` sits at the top of the repository (a separate layer with no model knowledge) but is
installed as `fastvit.kernels`: a top-level import name `kernels` would shadow an unrelated,
widely installed package.
"""

import warnings

from setuptools import setup

# An editable install of a package_dir mapping (kernels/ -> fastvit.kernels) makes setuptools print an
# "Editable installation" notice about same-named folders shadowing imports on every `pip install -e .`.
# The mapping is deliberate and tested (tests/test_packaging.py): keep a fresh install quiet.
warnings.filterwarnings("ignore", message="Editable installation")

PACKAGES = [
    "fastvit",
    "fastvit.attention",
    "fastvit.attention.backends",
    "fastvit.layers",
    "fastvit.models",
    "fastvit.ssl",
    "fastvit.compat",
    "fastvit.compat.timm",
    "fastvit.tools",
    "fastvit.train",
    "fastvit.kernels",
]

setup(
    name="fastvit",
    version="0.1.0",
    description="Vision Transformers (vit-pytorch compatible) on one pluggable, fused attention layer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir={"fastvit.kernels": "kernels"},
    # Per-GPU tuned kernel configs (`fastvit tune`), read by the launchers at run time.
    package_data={"fastvit.kernels": ["tuned/*.json"]},
    install_requires=[
        "torch>=2.4",
        "einops>=0.7",
        "rich>=13",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "xformers": ["xformers"],
        "timm": ["timm>=1.0"],  # fastvit.patch_timm, create_model("timm/<name>")
        "ssl": ["torchvision"],  # Dino's crops and default augmentation
        "plot": ["matplotlib", "Pillow"],  # fastvit plot, fastvit attention-map
        # fastvit train: image decoding, safetensors checkpoints, the metrics plot
        "train": ["torchvision", "safetensors", "matplotlib", "scikit-learn"],  # scikit-learn: --data digits
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "ruff>=0.5",
            "timm>=1.0",
            "vit-pytorch==1.26.11",
            "torchvision",
            "safetensors",
            "matplotlib",
            "scikit-learn",  # fastvit train --data digits and its accuracy tests
            "build",
            # the seed README's "Research Ideas" examples plug these transformers into efficient.ViT
            "nystrom-attention",
            "x-transformers",
            # fastvit plot / attention-map, and the export tests (ONNX legacy + dynamo, run in onnxruntime)
            "matplotlib",
            "Pillow",
            "onnx",
            "onnxruntime",
            "onnxscript",
        ],
    },
    entry_points={"console_scripts": ["fastvit = fastvit.cli:main"]},
    license_expression="MIT",  # SPDX (PEP 639; setuptools >= 77), not a licence classifier
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
