"""Checkpoints: safetensors for the tensors, one small JSON for the rest; written atomically every epoch.

Layout under ``--out``::

    checkpoints/epoch_0003/model.safetensors      the trained module's full state_dict (wrapper included)
    checkpoints/epoch_0003/optimizer.safetensors  AdamW's per-parameter state, keyed "<param name>/<key>"
    checkpoints/epoch_0003/state.json             epoch, step, config, param groups, aliases, versions
    checkpoints/latest                            the name of the newest complete checkpoint
    model.safetensors, model.json                 the trained backbone and how to rebuild it (at the end)

A checkpoint is written to ``epoch_N.tmp`` and renamed when complete, then ``latest`` is replaced (write
and ``os.replace``), then older checkpoints beyond ``--keep`` are removed: a run killed at any moment
leaves the previous complete checkpoint, so it loses at most the epoch in progress.

Tensors shared under several names (MAE's ``patch_to_emb`` is the encoder's patch embedding; Dino's
``net`` is ``student_encoder.net``) are stored once; ``state.json`` lists the aliases.

Full state dicts come from ``torch.distributed.checkpoint.state_dict`` (one code path for a plain
module, DDP and FSDP2: FSDP2's shards are gathered to rank 0's CPU). Rank 0 reads a checkpoint and
broadcasts it (``broadcast_from_rank0``), so only rank 0's node needs to see the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch
from torch import nn

from fastvit.files import UnreadableFile, read_json, read_state_dict

from .config import TrainError

__all__ = ["gather_state", "save_checkpoint", "find_checkpoint", "checkpoint_candidates", "is_checkpoint_dir",
           "read_checkpoint", "DamagedCheckpoint", "load_state", "export_model", "CHECKPOINTS"]

CHECKPOINTS = "checkpoints"
FORMAT = "fastvit-train-checkpoint"


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """``(model_state, optimizer_state)`` as full CPU tensors keyed by parameter name (collective under
    FSDP2; the dicts are complete on rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(cpu_offload=True)
    return get_model_state_dict(module, options=opts), get_optimizer_state_dict(module, optimizer, options=opts)


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dedupe(state: dict) -> tuple:
    """``(tensors, aliases)``: each shared tensor once, ``aliases[name] = stored name``; partial views copied."""
    tensors, aliases, by_key, storages = {}, {}, {}, set()
    for name, t in state.items():
        t = t.detach()
        if t.numel() == 0:
            tensors[name] = t.contiguous()
            continue
        key = _storage_key(t)
        if key in by_key:
            aliases[name] = by_key[key]
            continue
        by_key[key] = name
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if ptr in storages or not t.is_contiguous() else t  # safetensors refuses overlaps
        storages.add(ptr)
    return tensors, aliases


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def save_checkpoint(out: str, epoch: int, step: int, model_state: dict, optimizer_state: dict, meta: dict,
                    keep: int = 1) -> str:
    """Write the checkpoint after ``epoch`` completed epochs (rank 0 only); returns its directory."""
    from safetensors.torch import save_file

    root = os.path.join(out, CHECKPOINTS)
    name = f"epoch_{epoch:04d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors, aliases = _dedupe(model_state)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    optim_tensors, optim_other = {}, {}
    for param_name, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                optim_tensors[f"{param_name}/{key}"] = value.detach().contiguous()
            else:
                optim_other.setdefault(param_name, {})[key] = value
    save_file(optim_tensors, os.path.join(tmp, "optimizer.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(tmp, "state.json"), {
        "format": FORMAT, "version": 1, "epoch": epoch, "step": step, "aliases": aliases,
        "optimizer": {"param_groups": optimizer_state["param_groups"], "state": optim_other}, **meta})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = os.path.join(root, "latest.tmp")
    with open(latest_tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
    os.replace(latest_tmp, os.path.join(root, "latest"))
    done = sorted(d for d in os.listdir(root) if d.startswith("epoch_") and not d.endswith(".tmp"))
    for old in done[:-keep]:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _epoch(name: str) -> Optional[int]:
    match = re.fullmatch(r"epoch_(\d+)", name)
    return int(match.group(1)) if match else None


def is_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is one checkpoint (``epoch_N`` or a directory holding ``state.json``), intact or not."""
    name = os.path.basename(os.path.normpath(path))
    return os.path.isfile(os.path.join(path, "state.json")) or _epoch(name) is not None


def checkpoint_candidates(path: str) -> list:
    """The checkpoint directories ``path`` names, newest first: ``[path]`` for a checkpoint itself; for a
    ``checkpoints`` directory or an ``--out`` directory the one ``latest`` names, then every other
    ``epoch_N`` by decreasing epoch (an unreadable or missing ``latest`` is skipped). Empty: none yet."""
    if is_checkpoint_dir(path):
        return [path]
    for root in (os.path.join(path, CHECKPOINTS), path):
        if not os.path.isdir(root):
            continue
        epochs = sorted(((_epoch(d), d) for d in os.listdir(root)
                         if _epoch(d) is not None and os.path.isdir(os.path.join(root, d))), reverse=True)
        names = [d for _, d in epochs]
        try:
            with open(os.path.join(root, "latest"), encoding="utf-8") as f:
                latest = f.read().strip()
        except (OSError, UnicodeDecodeError):
            latest = None
        if latest in names:
            names.remove(latest)
            names.insert(0, latest)
        if names:
            return [os.path.join(root, d) for d in names]
    return []


def find_checkpoint(path: str) -> Optional[str]:
    """The newest checkpoint directory ``path`` names (see ``checkpoint_candidates``); None when there is none
    yet. Whether it can be read is ``read_checkpoint``'s question."""
    candidates = checkpoint_candidates(path)
    return candidates[0] if candidates else None


class DamagedCheckpoint(TrainError):
    """A checkpoint directory that cannot be read: the file and what is wrong with it, in one line."""


def read_checkpoint(directory: str) -> tuple:
    """``(model_state, optimizer_state, state)`` from a checkpoint directory (aliases restored).

    Raises:
        DamagedCheckpoint: a missing, truncated or damaged ``state.json``, ``model.safetensors`` or
            ``optimizer.safetensors``, or a directory that is not a fastvit train checkpoint.
    """
    try:
        state = read_json(os.path.join(directory, "state.json"), "checkpoint state")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise DamagedCheckpoint(f"{directory} is not a fastvit train checkpoint (state.json format {found!r})")
        model_state = read_state_dict(os.path.join(directory, "model.safetensors"), "checkpoint")
        optim_tensors = read_state_dict(os.path.join(directory, "optimizer.safetensors"), "optimizer state")
        for alias, stored in state["aliases"].items():
            model_state[alias] = model_state[stored]
        optim_state = {name: dict(entries) for name, entries in state["optimizer"]["state"].items()}
        groups = state["optimizer"]["param_groups"]
        int(state["epoch"]), int(state["step"])
    except UnreadableFile as e:
        raise DamagedCheckpoint(str(e)) from None
    except TrainError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedCheckpoint(f"{os.path.join(directory, 'state.json')}: damaged ({type(e).__name__}: {e} does "
                                f"not fit a checkpoint's state)") from None
    for key, value in optim_tensors.items():
        param_name, _, field = key.rpartition("/")
        optim_state.setdefault(param_name, {})[field] = value
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return model_state, {"state": optim_state, "param_groups": groups}, state


def load_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict,
               distributed: bool) -> None:
    """Load full state dicts into the (possibly DDP / FSDP2) module and its optimiser. Distributed: only
    rank 0's dicts are read (the others pass empty ones) and broadcast."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(module, model_state, options=_options(broadcast_from_rank0=distributed))
    # Not strict: a parameter that never received a gradient has no AdamW state to restore (the model's
    # keys are checked strictly above, and the run's settings by the caller).
    set_optimizer_state_dict(module, optimizer, optimizer_state,
                             options=_options(broadcast_from_rank0=distributed, strict=False))


def export_model(out: str, model_state: dict, prefix: str, meta: dict) -> str:
    """``model.safetensors`` (the backbone: the keys under ``prefix``, prefix removed) and ``model.json``.

    Rebuild with ``fastvit.create_model(meta["model"], **meta["model_args"])`` and ``load_state_dict``.
    """
    from safetensors.torch import save_file

    backbone = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    tensors, aliases = _dedupe(backbone)
    path = os.path.join(out, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "aliases": json.dumps(aliases)})
    _write_json(os.path.join(out, "model.json"), meta)
    return path
