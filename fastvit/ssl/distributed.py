"""What the SSL wrappers need to be correct under DistributedDataParallel and FSDP2.

Unused parameters. A wrapper runs only part of the model it trains: MAE and SimMIM call the encoder's
patch embedding, positions and ``transformer`` but never its CLS token or classifier head, MPP never
the head, Dino hooks an embedding before the head. DDP (``find_unused_parameters=False``, its default)
waits for a gradient of every parameter that requires one and fails on the next step ("Expected to
have finished reduction in the prior iteration"). ``find_unused_parameters=True`` works around it at
the cost of a graph traversal every step. Instead each wrapper says which of its parameters its
forward never uses (``unused_parameters()``) and exposes them as ``_ddp_params_and_buffers_to_ignore``,
the attribute DDP reads at construction to leave parameters out of its reducer (of the module it is
given: wrap the SSL wrapper itself, ``DDP(MAE(...))``, not a module around it). The model itself is
left alone: ``requires_grad`` stays as it was, so fine-tuning the encoder afterwards trains its head.
Optimisers skip these parameters (their ``.grad`` stays ``None``). FSDP2 needs nothing: a parameter
without a gradient is simply not reduced.

Cross-rank means. ``all_reduce_mean_`` averages a per-rank statistic (Dino's teacher centre) over the
default process group, weighted by how many samples each rank averaged, so the result is the mean over
the global batch even when the ranks' batches differ in size. Without an initialised process group it
is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["UnusedParametersMixin", "names_of", "parameters_outside", "all_reduce_mean_", "is_distributed"]


def is_distributed() -> bool:
    """``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def names_of(module: nn.Module, params: Iterable[nn.Parameter]) -> list[str]:
    """Every name (aliases included: a shared module appears twice) under which ``module`` holds ``params``."""
    ids = {id(p) for p in params}
    return sorted(n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids)


class UnusedParametersMixin:
    """For an ``nn.Module`` wrapper: the parameters its ``forward`` never uses, declared to DDP.

    Subclasses implement ``_unused_parameter_objects()``; ``unused_parameters()`` names them (every
    alias) and ``_ddp_params_and_buffers_to_ignore`` is what ``DistributedDataParallel`` reads, plus
    any names a user set on it.
    """

    def _unused_parameter_objects(self) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def unused_parameters(self) -> list[str]:
        """Names of the parameters that ``forward`` never uses (DDP leaves them out of its reducer)."""
        return names_of(self, self._unused_parameter_objects())

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        extra = self.__dict__.get("_ddp_extra_ignored", ())
        return sorted({*self.unused_parameters(), *extra})

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names) -> None:
        # DistributedDataParallel._set_params_and_buffers_to_ignore_for_model assigns the attribute.
        self.__dict__["_ddp_extra_ignored"] = list(names)


def parameters_outside(module: nn.Module, used_prefixes: tuple) -> list[nn.Parameter]:
    """``module``'s parameters whose names start with none of ``used_prefixes`` (``"transformer."``,
    ``"pos_embedding"``): what a wrapper that calls only those parts leaves without a gradient."""
    return [p for n, p in module.named_parameters() if not n.startswith(used_prefixes)]


@torch.no_grad()
def all_reduce_mean_(tensor: Tensor, weight: float, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """In place: the ``weight``-weighted mean of ``tensor`` over the ranks of ``group``.

    Args:
        tensor: this rank's mean of ``weight`` samples (any shape, floating point).
        weight: how many samples it averages (``> 0``).
        group: the process group (default: the world).

    Returns ``tensor``, unchanged without an initialised process group or with one rank.
    """
    if not is_distributed() or dist.get_world_size(group) == 1:
        return tensor
    packed = torch.cat((tensor.detach().flatten().float() * weight, tensor.new_tensor([weight], dtype=torch.float32)))
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)  # gloo has no AVG
    tensor.copy_((packed[:-1] / packed[-1]).view_as(tensor))
    return tensor
