"""vit-pytorch's module paths (``fastvit.cait``, ``fastvit.distill``, ...) served from one table."""

from __future__ import annotations

import importlib
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastvit
from fastvit.compat.module_paths import MODULE_PATHS


@pytest.mark.parametrize("name", sorted(MODULE_PATHS))
def test_every_path_imports_with_its_names_as_the_same_objects(name):
    module = importlib.import_module(f"fastvit.{name}")
    assert getattr(fastvit, name) is module
    for source, names in MODULE_PATHS[name].items():
        src = importlib.import_module(source)
        for attr in names:
            assert getattr(module, attr) is getattr(src, attr), f"fastvit.{name}.{attr}"
    assert sorted(module.__all__) == sorted(n for names in MODULE_PATHS[name].values() for n in names)


def test_the_seed_readme_paths_are_all_served():
    """Every `vit_pytorch.X` module the seed README imports has its fastvit.X."""
    readme = (Path(__file__).parents[1] / "data" / "seed_readme.md").read_text()
    paths = set(re.findall(r"from vit_pytorch\.(\w+)", readme)) | set(re.findall(r"import vit_pytorch\.(\w+)", readme))
    assert paths, "the README parser found no module path"
    missing = sorted(p for p in paths if p not in MODULE_PATHS)
    assert not missing, missing


def test_a_fresh_interpreter_imports_a_path_first_and_pickles_its_model():
    code = ("from fastvit.cait import CaiT; import pickle, fastvit.models.cait as m; "
            "assert CaiT is m.CaiT; model = CaiT(image_size=32, patch_size=8, num_classes=3, dim=32, depth=1, "
            "cls_depth=1, heads=2, mlp_dim=64); assert type(pickle.loads(pickle.dumps(model))) is m.CaiT")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unknown_paths_still_fail_to_import():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fastvit.not_an_architecture")
    assert pickle.loads(pickle.dumps(MODULE_PATHS)) == MODULE_PATHS
