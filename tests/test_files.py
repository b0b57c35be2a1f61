"""Users' files and optional packages: a damaged file is one sentence naming it, a missing package names
itself and the extra that installs it, and importing fastvit imports no optional package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit.extras import MissingDependency, importable, install_hint, require
from fastvit.files import UnreadableFile, file_kind, read_json, read_state_dict

safetensors = pytest.importorskip("safetensors.torch")

STATE = {"weight": torch.randn(32, 16), "bias": torch.zeros(32)}


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def good_files(tmp_path):
    st, pt = tmp_path / "ok.safetensors", tmp_path / "ok.pt"
    safetensors.save_file(STATE, str(st))
    torch.save({"state_dict": STATE}, str(pt))
    return str(st), str(pt)


def test_good_files_read_in_either_format(good_files):
    for path in good_files:
        state = read_state_dict(path)
        assert state.keys() == STATE.keys() and all(torch.equal(state[k], STATE[k]) for k in STATE)
    assert [file_kind(p) for p in good_files] == ["safetensors", "torch"]


# (format, damage) -> what the sentence says
DAMAGE = {
    ("safetensors", "truncated"): "truncated safetensors file: its tensors need",
    ("safetensors", "header only"): "truncated or not a safetensors file",
    ("safetensors", "random"): "not a safetensors file",
    ("safetensors", "empty"): "is empty (0 bytes)",
    ("pt", "truncated"): "truncated, damaged or not a plain state dict (PytorchStreamReader failed",
    ("pt", "header only"): "truncated, damaged or not a plain state dict",
    ("pt", "random"): "truncated, damaged or not a plain state dict",
    ("pt", "empty"): "is empty (0 bytes)",
}


@pytest.mark.parametrize("fmt, damage", list(DAMAGE), ids=[f"{f}-{d}" for f, d in DAMAGE])
def test_a_damaged_file_is_one_sentence_naming_it(good_files, tmp_path, fmt, damage):
    with open(good_files[0 if fmt == "safetensors" else 1], "rb") as f:
        data = f.read()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "header only": data[:5],
               "random": bytes(torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0),
                                             dtype=torch.uint8).tolist())}[damage]
    path = _write(tmp_path / f"bad.{fmt}", damaged)
    with pytest.raises(UnreadableFile) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 300 + len(path), message
    assert DAMAGE[fmt, damage] in message, message


def test_random_bytes_under_a_neutral_name(tmp_path):
    path = _write(tmp_path / "weights", bytes(range(7, 250)))
    with pytest.raises(UnreadableFile, match="neither a safetensors file nor a torch.save file"):
        read_state_dict(path)


def test_other_problems_of_user_files(tmp_path):
    with pytest.raises(UnreadableFile, match="no such checkpoint"):
        read_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(UnreadableFile, match="is a directory"):
        read_state_dict(str(tmp_path))
    torch.save([1, 2, 3], str(tmp_path / "list.pt"))
    with pytest.raises(UnreadableFile, match="holds a list that is not a state dict of tensors"):
        read_state_dict(str(tmp_path / "list.pt"))
    broken = _write(tmp_path / "state.json", b'{"epoch": 3, "st')
    with pytest.raises(UnreadableFile, match=r"state.json: cannot be read as JSON \(Unterminated string"):
        read_json(broken)


def test_load_vit_pytorch_state_dict_takes_a_path(tmp_path):
    model = fastvit.create_model("vit_tiny_patch16_224", image_size=32, patch_size=8, dim=32, depth=1, heads=2,
                                 mlp_dim=64, num_classes=3)
    path = str(tmp_path / "vit.pt")
    torch.save(model.state_dict(), path)
    other = fastvit.create_model("vit_tiny_patch16_224", image_size=32, patch_size=8, dim=32, depth=1, heads=2,
                                 mlp_dim=64, num_classes=3)
    other.load_vit_pytorch_state_dict(path)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), other.eval()(x))
    with open(path, "rb") as f:
        data = f.read()
    cut = _write(tmp_path / "cut.pt", data[:1000])
    with pytest.raises(UnreadableFile, match=r"cut.pt: truncated, damaged or not a plain state dict"):
        other.load_vit_pytorch_state_dict(cut)


def test_a_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert importable("matplotlib") is not None and importable("torch") is None
    with pytest.raises(MissingDependency, match=r"^fastvit plot needs matplotlib, which is not importable "
                                                r"\(.*\): pip install 'fastvit\[plot\]'$"):
        require("matplotlib", "fastvit plot")
    assert install_hint("safetensors") == "pip install 'fastvit[train]'"
    assert install_hint("PIL") == "pip install 'fastvit[plot]'"
    assert install_hint("timm") == "pip install 'fastvit[timm]'"
    empty_safetensors = _write(tmp_path / "x.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(MissingDependency, match=r"needs safetensors.*pip install 'fastvit\[train\]'"):
        read_state_dict(empty_safetensors)


def test_importing_fastvit_imports_no_optional_package():
    """Nor does building the command line or running a model: each optional package waits for its feature."""
    code = ("import sys, torch, fastvit, fastvit.cli, fastvit.train, fastvit.tools.attention_map, fastvit.tools.plot\n"
            "fastvit.cli.build_parser()\n"
            "fastvit.create_model('vit_tiny_patch16_224', image_size=32, patch_size=8, dim=32, depth=1, heads=2,"
            " mlp_dim=64)(torch.randn(1, 3, 32, 32))\n"
            "print(sorted(m for m in ('timm', 'matplotlib', 'safetensors', 'torchvision', 'PIL', 'xformers',"
            " 'vit_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_command_names_its_missing_package(monkeypatch, tmp_path, capsys):
    """`fastvit plot`, `fastvit attention-map` and create_model("timm/...") say what to install, before work."""
    from fastvit import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["plot", str(tmp_path / "never-read.json")]) == 2  # refused before the file is looked at
    err = capsys.readouterr().err.replace("\n", " ")
    assert "fastvit plot needs matplotlib" in err and "pip install 'fastvit[plot]'" in err
    out = tmp_path / "map.png"
    assert cli.main(["attention-map", "--model", "vit_tiny_patch16_224", "--image", str(tmp_path / "x.png"),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "fastvit attention-map (the colour map) needs matplotlib" in err and "fastvit[plot]" in err
    assert not out.exists()

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingDependency, match=r"create_model\('timm/vit_tiny_patch16_224'\) needs timm.*"
                                                r"pip install 'fastvit\[timm\]'"):
        fastvit.create_model("timm/vit_tiny_patch16_224")
