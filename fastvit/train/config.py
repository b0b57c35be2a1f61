"""The settings of a training run: ``TrainConfig``, its command line, and the checks made before any work.

Every user error (a missing data directory, an unknown ``--ssl``, bad sizes) is a ``TrainError`` whose
message names the flag and the value; ``fastvit train`` prints it in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import ast
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

__all__ = ["TrainConfig", "TrainError", "SSL_METHODS", "MachineShare", "machine_share", "add_arguments",
           "config_from_args", "parse_args"]

SSL_METHODS = ("mae", "simmim", "mpp", "dino")
_DESCRIPTION = ("Train a fastvit or timm model (or pre-train it with --ssl) on one process, or under torchrun on "
                "many GPUs and nodes (DDP; FSDP2 with --fsdp).")


class TrainError(ValueError):
    """Bad training input a user can fix (reported in one line, exit status 2)."""


@dataclass
class TrainConfig:
    """One training run. The fields are the ``fastvit train`` flags (``--batch-size`` is ``batch_size``)."""

    model: str
    data: Optional[str] = None
    synthetic: Optional[int] = None
    val_data: Optional[str] = None
    out: str = "runs/train"
    epochs: int = 1
    batch_size: int = 64  # per rank
    lr: float = 1e-3  # peak learning rate, not scaled by the world size
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    bf16: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    ssl: Optional[str] = None
    ssl_args: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)
    num_classes: Optional[int] = None
    image_size: Optional[int] = None
    workers: Optional[int] = None  # None: what the machine allows (machine_share)
    threads: Optional[int] = None  # CPU threads per rank on the CPU device; None: machine_share
    seed: int = 0
    resume: Optional[str] = None  # "auto": --out's latest checkpoint if any; else a checkpoint directory
    log_every: int = 10
    keep: int = 1
    device: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def validate(self) -> TrainConfig:
        """Check what can be checked without building anything; raises ``TrainError``."""
        if (self.data is None) == (self.synthetic is None):
            raise TrainError("give exactly one of --data DIR (an ImageFolder) and --synthetic N (random images)")
        if self.data is not None and self.data != "digits" and not os.path.isdir(self.data):
            raise TrainError(f"--data {self.data}: no such directory (expected an ImageFolder: one "
                             f"sub-directory of images per class, or 'digits')")
        if self.synthetic is not None and self.synthetic < 1:
            raise TrainError(f"--synthetic must be a positive number of images, got {self.synthetic}")
        if self.val_data is not None:
            if self.val_data == "digits" and self.data != "digits":
                raise TrainError("--val-data digits scores the digits' held-out split: it needs --data digits")
            if self.val_data != "digits" and not os.path.isdir(self.val_data):
                raise TrainError(f"--val-data {self.val_data}: no such directory")
            if self.ssl is not None:
                raise TrainError(f"--val-data measures the top-1 of a classifier; --ssl {self.ssl} trains no "
                                 f"classifier (fine-tune the exported encoder, then validate)")
        if self.ssl is not None and self.ssl not in SSL_METHODS:
            raise TrainError(f"--ssl must be one of {', '.join(SSL_METHODS)}, got {self.ssl!r}")
        if self.ssl is None and self.ssl_args:
            raise TrainError("--ssl-arg needs --ssl")
        for name in ("epochs", "batch_size", "log_every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TrainError(f"need 0 <= --min-lr <= --lr and --lr > 0, got --lr {self.lr} --min-lr {self.min_lr}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or (self.workers is not None and self.workers < 0):
            raise TrainError("--warmup-epochs, --weight-decay and --workers cannot be negative")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be a positive integer, got {self.threads}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise TrainError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.num_classes is not None and self.num_classes < 1:
            raise TrainError(f"--num-classes must be positive, got {self.num_classes}")
        if self.ssl is not None and self.num_classes is not None:
            raise TrainError("--num-classes sets the classifier of supervised training; --ssl trains none")
        if self.resume is not None and self.resume != "auto" and not os.path.isdir(self.resume):
            raise TrainError(f"--resume {self.resume}: no such checkpoint directory")
        return self


@dataclass(frozen=True)
class MachineShare:
    """What one rank of this machine gets: the defaults of ``--workers`` and ``--threads``."""

    cores: int  # CPU cores this process may run on
    local_ranks: int  # ranks on this machine (torchrun's LOCAL_WORLD_SIZE)
    workers: int
    threads: int

    def describe(self, threads: bool = True) -> str:
        """``2 data loader workers and 4 CPU threads per rank (8 cores for 2 local ranks)``."""
        def count(n: int, what: str) -> str:
            return f"{n} {what}{'s' if n != 1 else ''}"

        parts = count(self.workers, "data loader worker")
        if threads:
            parts += f" and {count(self.threads, 'CPU thread')}"
        return f"{parts} per rank ({count(self.cores, 'core')} for {count(self.local_ranks, 'local rank')})"


def machine_share(config: TrainConfig, local_ranks: Optional[int] = None) -> MachineShare:
    """``--workers`` and ``--threads`` as given, else what the machine allows: each local rank gets
    ``cores // local_ranks`` cores (at least 1); it computes on all of them (threads) and feeds itself
    with one loader process per core beyond its own, at most 4 (0 when it has only one core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_rank = max(1, cores // max(1, local))
    workers = config.workers if config.workers is not None else min(4, per_rank - 1)
    threads = config.threads if config.threads is not None else per_rank
    return MachineShare(cores, local, workers, threads)


def _key_values(items: Optional[Sequence[str]], flag: str) -> dict:
    """``["dim=32", "pool=mean"]`` -> ``{"dim": 32, "pool": "mean"}`` (values are Python literals or strings)."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string: pool=mean
        out[key.strip()] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``fastvit train`` flags (shared by ``python -m fastvit.train`` and the ``fastvit`` CLI)."""
    p.add_argument("--model", required=True, help="a registry name (fastvit.list_models()) or timm/<name>")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="constructor argument override, repeatable (--model-arg dim=384 --model-arg depth=6)")
    p.add_argument("--num-classes", type=int, help="build the classifier with this many classes (default: the "
                                                   "model's; it must match the data's class count)")
    p.add_argument("--image-size", type=int, help="training resolution (default: the model's)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", metavar="DIR", help="an ImageFolder: one sub-directory of images per class; or "
                                                    "'digits': scikit-learn's handwritten digits (1797 8x8 images, "
                                                    "10 classes, upsampled; no download), 80%% trained on and the "
                                                    "held-out 20%% scored after every epoch")
    data.add_argument("--synthetic", type=int, metavar="N", help="N generated images instead of --data (smoke runs)")
    p.add_argument("--val-data", metavar="DIR", help="an ImageFolder with the same classes: top-1 after every epoch")
    p.add_argument("--out", default="runs/train", metavar="DIR",
                   help="checkpoints, metrics.jsonl, metrics.png, model.safetensors (default: runs/train)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="images per rank per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--min-lr", type=float, default=0.0, help="the cosine schedule's floor (default 0)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length, may be fractional")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, "
                                                                     "tokens and position tables)")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's module")
    p.add_argument("--grad-checkpointing", action="store_true", help="model.set_grad_checkpointing(True)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block) instead of DDP; needs torchrun")
    p.add_argument("--ssl", choices=SSL_METHODS, help="self-supervised pre-training with a fastvit.ssl wrapper")
    p.add_argument("--ssl-arg", action="append", metavar="KEY=VALUE",
                   help="wrapper argument, repeatable (--ssl-arg decoder_dim=256 --ssl-arg masking_ratio=0.6)")
    p.add_argument("--workers", type=int, help="data loader processes per rank (default: the cores available to "
                                               "this process divided among the local ranks, less the rank's own, "
                                               "at most 4)")
    p.add_argument("--threads", type=int, help="torch CPU threads per rank when training on the CPU (default: the "
                                               "cores available divided among the local ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from --out's latest checkpoint (none yet: start), or from CKPT")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines (default 10)")
    p.add_argument("--keep", type=int, default=1, help="checkpoints to keep (default 1: the latest)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated ``TrainConfig`` from parsed ``add_arguments`` flags."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["model_args"] = _key_values(args.model_arg, "--model-arg")
    values["ssl_args"] = _key_values(args.ssl_arg, "--ssl-arg")
    return TrainConfig(**values).validate()


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = add_arguments(argparse.ArgumentParser(prog="fastvit train", description=_DESCRIPTION))
    return config_from_args(parser.parse_args(argv))
