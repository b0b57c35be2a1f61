"""Run under ``torchrun --nproc_per_node 2`` by test_train_distributed.py (gloo on the CPU).

``python dist_worker.py OUT`` joins one process group, then (one launch instead of one per case):

1. ``fastvit.train.main`` for ``--ssl mae | simmim | mpp | dino`` under DDP, and supervised plus Dino under
   FSDP2 (also a supervised DDP run to compare the FSDP2 weights with, and an FSDP2 ``--resume``);
2. the SSL wrappers under a plain ``DistributedDataParallel`` (``find_unused_parameters=False``), a few steps
   on different data per rank: the replicas stay equal, and Dino's centre is the mean over both ranks'
   teacher outputs, on every rank; with the all-reduce removed the ranks' centres differ (the test sees it).

Each rank writes ``OUT/rank<r>.json``; the test reads and checks them.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from train_helpers import SSL_ARGS, TINY

from fastvit import ViT
from fastvit.ssl import MAE, MPP, Dino, SimMIM
from fastvit.train import main

VIT = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)


def trainer_runs(out: str) -> dict:
    common = [*TINY, "--synthetic", "12", "--batch-size", "2", "--epochs", "1"]
    runs = {f"ddp-{ssl}": [*common, "--ssl", ssl, *SSL_ARGS[ssl]] for ssl in SSL_ARGS}
    # mean pooling: the ViT's cls_token is empty (0, dim), which DDP must not wait a gradient for
    supervised = [*common, "--model-arg", "num_classes=3", "--model-arg", "pool=mean", "--lr", "3e-3"]
    runs["ddp-supervised"] = supervised
    runs["fsdp-supervised"] = [*supervised, "--fsdp"]
    runs["fsdp-dino"] = [*common, "--ssl", "dino", *SSL_ARGS["dino"], "--fsdp"]
    # continues fsdp-supervised's checkpoint for a second epoch (keeping the first for the DDP comparison)
    runs["fsdp-supervised-resumed"] = [*supervised, "--fsdp", "--epochs", "2", "--resume", "--keep", "2"]
    codes = {}
    for name, argv in runs.items():
        target = "fsdp-supervised" if name == "fsdp-supervised-resumed" else name
        codes[name] = main([*argv, "--out", os.path.join(out, target)])
    return codes


def checksum(module: torch.nn.Module) -> list:
    return [float(t.double().sum()) for t in module.state_dict().values() if t.is_floating_point()]


def wrapper_checks() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    builders = {
        "mae": lambda: MAE(encoder=ViT(**VIT), decoder_dim=16, decoder_heads=2, decoder_dim_head=8),
        "simmim": lambda: SimMIM(encoder=ViT(**VIT)),
        "mpp": lambda: MPP(transformer=ViT(**VIT), patch_size=8, dim=32),
        "dino": lambda: Dino(ViT(**VIT), image_size=32, hidden_layer="to_latent", num_classes_K=32,
                             projection_hidden_size=32),
    }
    for name, build in builders.items():
        torch.manual_seed(0)
        wrapper = build()
        ddp = DDP(wrapper)  # find_unused_parameters=False: every declared-used parameter must get a gradient
        optimizer = torch.optim.AdamW(wrapper.parameters(), lr=1e-3)
        torch.manual_seed(100 + rank)  # different images and masks per rank
        for _ in range(3):
            loss = ddp(torch.rand(4, 3, 32, 32))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if name == "dino":
                local_centre = wrapper.last_teacher_centers.clone()
                gathered = [torch.empty_like(local_centre) for _ in range(world)]
                dist.all_gather(gathered, local_centre)
                wrapper.update_moving_average()
        entry = {"checksum": checksum(wrapper), "unused": wrapper.unused_parameters()}
        if name == "dino":
            expected = torch.stack(gathered).mean(dim=0)  # equal batches: the global mean is the mean of means
            entry["centre_error"] = float((wrapper.last_teacher_centers - expected).abs().max())
            entry["centre_moved"] = float((local_centre - expected).abs().max())
            entry["teacher_centers"] = wrapper.teacher_centers.flatten().tolist()
        results[name] = entry

    # Without the all-reduce each rank keeps its own centre: the check above would see it.
    import fastvit.ssl.dino as dino_module

    original = dino_module.all_reduce_mean_
    dino_module.all_reduce_mean_ = lambda tensor, weight, group=None: tensor
    try:
        torch.manual_seed(0)
        wrapper = builders["dino"]()
        torch.manual_seed(100 + rank)
        wrapper(torch.rand(4, 3, 32, 32))
        wrapper.update_moving_average()
        results["dino-without-all-reduce"] = {"teacher_centers": wrapper.teacher_centers.flatten().tolist()}
    finally:
        dino_module.all_reduce_mean_ = original
    return results


if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    report = {"runs": trainer_runs(out), "wrappers": wrapper_checks()}
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
