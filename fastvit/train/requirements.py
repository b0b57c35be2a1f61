"""What a training run needs installed, checked on every rank before the model is built.

    package      needed for                                  without it
    safetensors  the checkpoints and model.safetensors       every rank stops before training (status 2)
    torchvision  --data / --val-data (decoding), --ssl dino  every rank stops before training (status 2)
    sklearn      --data digits (scikit-learn's bundled set)  every rank stops before training (status 2)
    timm         --model timm/<name>                         every rank stops before training (status 2)
    matplotlib   metrics.png, drawn at the end               said once, skipped; everything else is written

The ranks compare what they found (``distributed.agree``), so they all stop with the same message,
which names the ranks that lack a package when not all do. ``pip install 'fastvit[train]'`` installs
torchvision, safetensors and matplotlib; ``'fastvit[timm]'`` adds timm.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastvit.extras import importable, install_hint

from . import distributed as D
from .config import TrainConfig

__all__ = ["Need", "needs", "check_requirements"]


@dataclass(frozen=True)
class Need:
    module: str  # the import name
    purpose: str  # what the run needs it for
    required: bool  # False: only a convenience, skipped without it
    extra: str = "train"


def needs(config: TrainConfig) -> list:
    """The optional packages ``config`` uses, in the order they are reported."""
    out = [Need("safetensors", "the checkpoints and model.safetensors", True)]
    folders = [(f, v) for f, v in (("--data", config.data), ("--val-data", config.val_data))
               if v is not None and v != "digits"]
    if folders:
        out.append(Need("torchvision", f"{' / '.join(f for f, _ in folders)} (decoding the images)", True))
    if config.data == "digits":
        out.append(Need("sklearn", "--data digits (scikit-learn's bundled digits)", True, extra="train"))
    if config.ssl == "dino":
        out.append(Need("torchvision", "--ssl dino (Dino's crops and augmentation)", True))
    if config.model.startswith("timm/"):
        out.append(Need("timm", f"--model {config.model}", True, extra="timm"))
    out.append(Need("matplotlib", "metrics.png (the curves of metrics.jsonl)", False))
    return out


def check_requirements(config: TrainConfig, env: D.DistEnv) -> list:
    """Raise one ``TrainError`` on every rank when a required package is missing on any rank; returns the
    optional ``Need``s this rank lacks (their features are skipped). A collective: every rank calls it."""
    wanted = needs(config)
    problems = []
    for need in wanted:
        why = importable(need.module)
        if why is not None:
            problems.append(f"{need.module}|{why}")
    found = D.agree(problems, env)
    missing_required = []
    for key, ranks in found:
        module, _, why = key.partition("|")
        purposes = [n for n in wanted if n.module == module]
        if not any(n.required for n in purposes):
            continue
        where = "" if len(ranks) == env.world_size else f" on rank{'s' if len(ranks) > 1 else ''} " \
                                                         f"{', '.join(map(str, ranks))}"
        what = " and ".join(n.purpose for n in purposes if n.required)
        missing_required.append(f"{module} for {what} is not importable{where} ({why}): "
                                f"{install_hint(module, purposes[0].extra)}")
    if missing_required:
        D.fail("fastvit train needs " + "; ".join(missing_required), env)
    local = {p.partition("|")[0] for p in problems}
    return [n for n in wanted if not n.required and n.module in local]
