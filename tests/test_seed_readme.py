"""Every Python example of the seed README runs with ``vit_pytorch`` replaced by ``fastvit``.

tests/data/seed_readme.md is the vit-pytorch README fastvit is built from (the drop-in contract).
Examples run as written, with three edits a CI machine needs: no pretrained-weight download
(``resnet50(pretrained = True)`` becomes ``resnet50(weights = None)``), training loops of 100 steps
run 2 steps, and files are saved into a temporary directory. Blocks of one section share a namespace
(later blocks continue earlier ones, e.g. ``v.to_vit()``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent / "data" / "seed_readme.md"

EDITS = [
    ("vit_pytorch", "fastvit"),
    ("resnet50(pretrained = True)", "resnet50(weights = None)"),
    ("range(100)", "range(2)"),
]


def code_blocks(text: str) -> list:
    """The Python blocks of a markdown text: fences tagged ``python``, and untagged fences holding
    Python (the README's MobileViT example has no tag). bash / bibtex blocks are skipped."""
    blocks, info, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if info is None:
                info, lines = line[3:].strip(), []
            else:
                body = "\n".join(lines) + "\n"
                if info == "python" or (info == "" and re.search(r"^\s*(import|from)\s", body, flags=re.M)):
                    blocks.append(body)
                info = None
        elif info is not None:
            lines.append(line)
    return blocks


def sections() -> list:
    """(section title, [python blocks]) in README order."""
    out = []
    for part in re.split(r"^## ", README.read_text(), flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        blocks = code_blocks(part)
        if blocks:
            out.append((title, blocks))
    return out


SECTIONS = sections()


def missing_modules(code: str) -> list:
    """fastvit modules / third-party packages an example imports that are not importable here."""
    missing = []
    for mod in re.findall(r"^\s*(?:from|import)\s+([\w.]+)", code, flags=re.M):
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            missing.append(mod)
        elif mod.startswith("fastvit."):
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError:
                missing.append(mod)
    for names in re.findall(r"^\s*from\s+fastvit\s+import\s+(.+)$", code, flags=re.M):
        import fastvit

        missing += [f"fastvit.{n.strip()}" for n in names.split(",") if not hasattr(fastvit, n.strip())]
    return missing


def test_the_readme_has_the_expected_examples():
    titles = [t for t, _ in SECTIONS]
    for t in ("Usage", "Distillation", "Deep ViT", "CaiT", "CCT", "LeViT", "Accessing Attention", "MobileViT"):
        assert t in titles
    # Every block that imports vit_pytorch is collected, tagged or not.
    imports = len(re.findall(r"^from vit_pytorch|^import vit_pytorch", README.read_text(), flags=re.M))
    collected = sum(len(re.findall(r"^from vit_pytorch|^import vit_pytorch", "".join(b), flags=re.M))
                    for _, b in SECTIONS)
    assert collected == imports


@pytest.mark.parametrize("title,blocks", SECTIONS, ids=[t for t, _ in SECTIONS])
def test_seed_readme_example_runs(title, blocks, tmp_path, monkeypatch):
    code = "\n".join(blocks)
    for old, new in EDITS:
        code = code.replace(old, new)
    missing = missing_modules(code)
    if missing:
        pytest.skip(f"example needs {', '.join(missing)}, not available yet")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"seed_readme_{title}"}
    exec(compile(code, f"<seed README: {title}>", "exec"), namespace)
