"""``fastvit train``: train a registry or timm model, or pre-train it with a ``fastvit.ssl`` wrapper, on one
process, or on many GPUs and nodes under ``torchrun`` (DDP, or FSDP2 with ``--fsdp``; gloo on the CPU).

    fastvit train --model vit_small_patch16_224 --data imagenet/train --val-data imagenet/val --epochs 300
    torchrun --nproc_per_node 8 -m fastvit.train --model vit_base_patch16_224 --data ... --bf16
    python -m fastvit.train --model vit_small_patch16_224 --synthetic 256 --ssl mae --epochs 1

Modules, one concern each: ``config`` (flags, ``TrainConfig``, ``TrainError``), ``distributed`` (process
group, DDP / FSDP2), ``data`` (ImageFolder, generated images, sharding), ``task`` (model, SSL wrapper,
loss), ``optim`` (AdamW, warm-up + cosine), ``checkpoint`` (safetensors + JSON, resume, export),
``metrics`` (``metrics.jsonl``), ``plot`` (``metrics.png``), ``loop`` (the epochs).
"""

from .config import SSL_METHODS, TrainConfig, TrainError, add_arguments, config_from_args, parse_args
from .loop import main, run_command, train

__all__ = ["train", "main", "run_command", "TrainConfig", "TrainError", "SSL_METHODS", "add_arguments",
           "config_from_args", "parse_args"]
