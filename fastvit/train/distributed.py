"""torch.distributed for the trainer: process group from torchrun's environment, DDP / FSDP2 wrapping.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; the trainer joins the
default group with NCCL on CUDA and gloo on the CPU. Without torchrun it is one plain process.

- DDP (default): ``find_unused_parameters`` stays off. The SSL wrappers declare the parameters they
  never use (``fastvit.ssl.distributed``) and zero-element parameters are left out; a model that leaves
  others without a gradient fails on the second step with DDP's own message.
- FSDP2 (``--fsdp``): ``fully_shard`` on every transformer block (the entries of a module list named
  ``layers`` or ``blocks``; a fastvit block is an ``[attention, feed-forward]`` list, sharded as one
  group), then on the root. Parameters become ``DTensor`` shards; checkpoints gather full tensors.
"""

from __future__ import annotations

import datetime
import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainError

__all__ = ["DistEnv", "setup", "teardown", "wrap", "unwrap", "all_reduce_sum", "broadcast_object", "barrier",
           "SharedTrainError", "fail", "on_main", "on_every_rank", "agree"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group
    owns_group: bool = False  # this trainer initialised the group (and destroys it)
    fsdp: bool = False

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(name: Optional[str], local_rank: int) -> torch.device:
    if name is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu or cuda, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda was asked for but torch.cuda.is_available() is False")
        return torch.device(name) if ":" in name else torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: Optional[str] = None, fsdp: bool = False) -> DistEnv:
    """Join torchrun's process group (if launched by torchrun) and pick this rank's device."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank)
    if not under_torchrun:
        if fsdp:
            raise TrainError("--fsdp shards over torch.distributed ranks: launch with torchrun "
                             "(torchrun --nproc_per_node N -m fastvit.train ... --fsdp)")
        return DistEnv(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                   backend=dist.get_backend(), owns_group=owns, fsdp=fsdp)


def teardown(env: DistEnv, clean: bool = True) -> None:
    """Leave the process group this trainer created. ``clean``: all ranks got here (after a run, or an error
    they agreed on: then rank 0 has reported it before the others leave and torchrun stops it). After an error
    of one rank a barrier could wait forever on a rank that failed elsewhere."""
    if env.owns_group and dist.is_initialized():
        # The trained DDP / FSDP wrappers are garbage by now, but may sit in reference cycles: collected at
        # interpreter exit, after the group is gone, their reducer's gloo work is torn down from C++ and the
        # process aborts ("terminate called without an active exception", seen on rank 1 of a 2-rank CPU run
        # that had finished). Collect them while the group and the interpreter are alive.
        gc.collect()
        if clean:
            dist.barrier()  # gloo aborts a process that leaves while a peer's collective is still in flight
        dist.destroy_process_group()


def _blocks(module: nn.Module) -> list:
    """The sharding units: entries of every ``layers`` / ``blocks`` module list, innermost first."""
    units, seen = [], set()
    for name, child in reversed(list(module.named_modules())):
        if name.rsplit(".", 1)[-1] not in ("layers", "blocks") or not isinstance(child, (nn.ModuleList, nn.Sequential)):
            continue
        for block in child:
            if id(block) in seen or not any(True for _ in block.parameters()):
                continue
            seen.add(id(block))
            # fastvit's blocks are ModuleLists [attention, feed-forward] with no forward: shard them as one group
            units.append(list(block.children()) if type(block) is nn.ModuleList else block)
    return units


def wrap(module: nn.Module, env: DistEnv) -> nn.Module:
    """``module`` on ``env.device``, under DDP or FSDP2 when distributed (the same object for FSDP2)."""
    module = module.to(env.device)
    if not env.distributed:
        return module
    if env.fsdp:
        from torch.distributed.fsdp import fully_shard

        # fastvit's blocks return views (rearranged heads) that are only ever used out of place
        # (``x = attn(x) + x``), the case FSDP2's warning says is safe.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

        # Zero-element parameters (a mean-pool ViT's empty cls_token) hold nothing to shard or reduce, and
        # FSDP2's reduce-scatter refuses an empty gradient: they stay unsharded, outside every group.
        empty = {p for p in module.parameters() if p.numel() == 0}
        for unit in _blocks(module):
            fully_shard(unit, ignored_params=empty)
        fully_shard(module, ignored_params=empty)
        return module
    # Zero-element parameters hold nothing to reduce either, and a model may skip them in forward: left to DDP
    # they would stall its reducer without find_unused_parameters.
    empty = [n for n, p in module.named_parameters(remove_duplicate=False) if p.numel() == 0]
    # DDP's reducer spells the root module's own parameters ".name" (f"{module_name}.{param_name}" with "")
    empty += ["." + n for n in empty if "." not in n]
    if empty:
        declared = getattr(module, "_ddp_params_and_buffers_to_ignore", [])
        module._ddp_params_and_buffers_to_ignore = sorted({*declared, *empty})
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The trained module under DDP and ``torch.compile`` wrappers (FSDP2 modules are their own)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class SharedTrainError(TrainError):
    """A ``TrainError`` another rank found and reports: this rank stops with it, silently."""


def _agreed(error: TrainError) -> TrainError:
    error.agreed = True  # every rank raises it at the same point: the ranks may still meet once (teardown)
    return error


def fail(message: str, env: DistEnv) -> None:
    """Stop every rank with ``message`` where every rank found the same problem (rank 0 reports it)."""
    raise _agreed(TrainError(message) if env.is_main else SharedTrainError(message))


def on_main(fn: Callable[[], Any], env: DistEnv, share_result: bool = False) -> Any:
    """Run ``fn()`` on rank 0 only and let every rank share its outcome: when it raises a ``TrainError``,
    every rank raises it (rank 0 the original, the others a ``SharedTrainError`` with the same message)
    instead of waiting in the next collective for a rank that has gone. Other exceptions (bugs) are
    re-raised on rank 0 with their traceback and reach the other ranks as a ``SharedTrainError``.

    Returns ``fn()``'s result on rank 0; on the others it too with ``share_result`` (broadcast), else None.
    A collective: every rank must call it.
    """
    result, error, failure = None, None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - shared with the other ranks first, then re-raised
            failure = e
            error = str(e) if isinstance(e, TrainError) else f"rank 0 failed: {type(e).__name__}: {e}"
    if env.distributed:
        error, shared = broadcast_object((error, result if share_result else None), env)
        if not env.is_main:
            result = shared
    if failure is not None:
        raise _agreed(failure) if isinstance(failure, TrainError) else failure
    if error is not None:
        fail(error, env)
    return result


def on_every_rank(fn: Callable[[], Any], env: DistEnv) -> Any:
    """Run ``fn()`` on every rank (it must hold no collective) and stop them all together when it raises a
    ``TrainError`` on any: with rank 0's message, else the first failing rank's (naming it). A collective."""
    try:
        result, error = fn(), None
    except TrainError as e:
        result, error = None, str(e)
    if env.distributed:
        errors = [None] * env.world_size
        dist.all_gather_object(errors, error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            rank, error = failed[0]
            fail(error if rank == 0 else f"{error} (on rank {rank})", env)
    elif error is not None:
        fail(error, env)
    return result


def agree(problems: list, env: DistEnv) -> list:
    """Every rank's ``problems`` (strings), gathered on every rank: ``[(problem, [ranks])]`` in rank 0's
    order first, so all ranks can stop with the same message."""
    if not env.distributed:
        return [(p, [0]) for p in problems]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, list(problems))
    merged: dict = {}
    for rank, found in enumerate(gathered):
        for problem in found:
            merged.setdefault(problem, []).append(rank)
    return list(merged.items())
