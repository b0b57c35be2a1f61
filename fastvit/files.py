"""Reading the files users hand fastvit (checkpoints, state dicts, JSON): one sentence per bad file.

A missing, truncated, empty or foreign file raises ``UnreadableFile`` (a ``ValueError``) whose message
names the file and what is wrong with it (``runs/a/model.safetensors: truncated or damaged safetensors
file (invalid header length), 4,096 bytes``), never a reader's raw traceback. Every loader of user files
goes through here: ``fastvit train --resume``, ``load_vit_pytorch_state_dict(model, path)``,
``fastvit attention-map --checkpoint``.

Formats are told apart by their first bytes, not the file name: a safetensors file starts with the
8-byte little-endian length of its JSON header and then ``{``; ``torch.save`` writes a zip archive
(``PK``) or, before torch 1.6, a pickle.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch

from .extras import require

__all__ = ["UnreadableFile", "read_state_dict", "read_json", "file_kind"]


class UnreadableFile(ValueError):
    """A user's file that cannot be used, with the path and the reason in one sentence."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


def _first_line(e: BaseException) -> str:
    """A reader's error in a few words: its first line, and of a long line its first sentence."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0] if len(line) > 120 else line


def _size(path: str) -> str:
    return f"{os.path.getsize(path):,} bytes"


def file_kind(path: str) -> str:
    """``"safetensors"``, ``"torch"`` (a ``torch.save`` zip or pickle), ``"empty"`` or ``"unknown"``: by the
    first bytes, then by the name (a damaged file still goes to its reader, which says what is wrong)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if len(head) == 9 and head[8:9] == b"{" or path.endswith(".safetensors"):
        return "safetensors"
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"  # a zip archive, or a pickle of protocol 2-5
    if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return "torch"
    return "unknown"


def _check_exists(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UnreadableFile(path, f"no such {what}")
    if os.path.isdir(path):
        raise UnreadableFile(path, f"is a directory, not a {what} file")


def _safetensors_problem(path: str, e: BaseException) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return f"truncated or not a safetensors file: {size:,} bytes, shorter than a safetensors header"
    if head[8:9] != b"{":
        return f"not a safetensors file: it does not start with a safetensors header ({size:,} bytes)"
    declared = struct.unpack("<Q", head[:8])[0]
    if 8 + declared > size:
        return (f"truncated safetensors file: its header alone claims {declared:,} bytes, the file has {size:,} "
                f"({_first_line(e)})")
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(declared))
        needed = 8 + declared + max((entry["data_offsets"][1] for name, entry in header.items()
                                     if name != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        needed = None
    if needed is not None and needed > size:
        return f"truncated safetensors file: its tensors need {needed:,} bytes, the file has {size:,}"
    return f"damaged safetensors file ({_first_line(e)}), {size:,} bytes"


def read_state_dict(path: str, what: str = "checkpoint") -> dict:
    """The ``{name: tensor}`` of a safetensors file or a ``torch.save``-d state dict (``weights_only``;
    a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped), on the CPU.

    Raises:
        UnreadableFile: missing, empty, truncated or damaged, not a state dict.
        fastvit.extras.MissingDependency: a safetensors file without the safetensors package.
    """
    path = os.fspath(path)
    _check_exists(path, what)
    kind = file_kind(path)
    if kind == "empty":
        raise UnreadableFile(path, f"is empty (0 bytes): not a {what}")
    if kind == "safetensors":
        require("safetensors", f"reading {path}")
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: all mean a damaged file
            raise UnreadableFile(path, _safetensors_problem(path, e)) from None
    elif kind == "torch":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - zip, pickle and weights_only errors: one sentence
            raise UnreadableFile(path, f"truncated, damaged or not a plain state dict ({_first_line(e)}), "
                                       f"{_size(path)}") from None
    else:
        raise UnreadableFile(path, f"neither a safetensors file nor a torch.save file ({_size(path)}): not a {what}")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableFile(path, f"holds a {type(state).__name__} that is not a state dict of tensors")
    return state


def read_json(path: str, what: str = "JSON file") -> Any:
    """The parsed JSON of ``path``; ``UnreadableFile`` when it is missing, cut short or not JSON."""
    path = os.fspath(path)
    _check_exists(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFile(path, f"cannot be read as JSON ({_first_line(e)}), {_size(path)}") from None
