"""fastvit train and the SSL wrappers under torchrun with 2 gloo processes on the CPU.

Two launches: ``-m fastvit.train`` itself (supervised DDP on an ImageFolder with validation), and
``dist_worker.py``, which runs the trainer for every ``--ssl`` under DDP, supervised and Dino under FSDP2,
and checks the wrappers under a plain DDP (see its docstring).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from train_helpers import TINY, latest_state, read_jsonl, torchrun, write_image_folder

import fastvit

pytest.importorskip("safetensors", reason="fastvit train writes safetensors (pip install fastvit[train])")
pytest.importorskip("matplotlib", reason="fastvit train plots with matplotlib (pip install fastvit[train])")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_torchrun_module_supervised_ddp(tmp_path):
    data = write_image_folder(str(tmp_path / "train"), classes=2, per_class=6)
    val = write_image_folder(str(tmp_path / "val"), classes=2, per_class=3, seed=1)  # 6 images: 3 per rank
    out = str(tmp_path / "run")
    proc = torchrun(["-m", "fastvit.train", *TINY, "--num-classes", "2", "--data", data, "--val-data", val,
                     "--batch-size", "2", "--epochs", "2", "--out", out])
    log = proc.stdout + proc.stderr
    assert log.count("fastvit train: vit_tiny_patch16_224") == 1, "only rank 0 reports"
    assert "DDP, 2 rank(s) on cpu" in log and "epoch 2/2: step 6, loss" in log  # a log file gets epoch lines

    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 7))  # 12 images / (2 x 2)
    assert len(epochs) == 2 and all(0 <= r["val_top1"] <= 100 for r in epochs)
    state = latest_state(out)
    assert state["world_size"] == 2 and state["diverged"] == [] and state["step"] == 6
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 10_000


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    torchrun([os.path.join(os.path.dirname(__file__), "dist_worker.py"), out])
    reports = []
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json"), encoding="utf-8") as f:
            reports.append(json.load(f))
    return out, reports


RUNS = ["ddp-mae", "ddp-simmim", "ddp-mpp", "ddp-dino", "ddp-supervised", "fsdp-supervised", "fsdp-dino",
        "fsdp-supervised-resumed"]


@pytest.mark.parametrize("run", RUNS)
def test_trainer_under_torchrun(worker, run):
    out, reports = worker
    assert [r["runs"][run] for r in reports] == [0, 0], f"{run} exited with an error (see the torchrun log)"
    if run == "fsdp-supervised-resumed":
        records = read_jsonl(os.path.join(out, "fsdp-supervised", "metrics.jsonl"))
        assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
        assert latest_state(os.path.join(out, "fsdp-supervised"))["step"] == 6
        return
    with open(os.path.join(out, run, "checkpoints", "epoch_0001", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["world_size"] == 2 and state["fsdp"] == run.startswith("fsdp")
    assert state["step"] == 3 and state["diverged"] == [], "replicated tensors (Dino's centres) differ between ranks"
    losses = [r["loss"] for r in read_jsonl(os.path.join(out, run, "metrics.jsonl")) if r["epoch"] == 1]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    from safetensors.torch import load_file

    exported = load_file(os.path.join(out, run, "model.safetensors"))  # the backbone, wrapper prefix removed
    assert {"pos_embedding", "transformer.norm.weight", "mlp_head.weight"} <= exported.keys()
    assert len(exported) == len(fastvit.create_model("vit_tiny_patch16_224", depth=1).state_dict())


def test_fsdp_trains_the_same_weights_as_ddp(worker):
    from safetensors.torch import load_file

    out, _ = worker
    ddp = load_file(os.path.join(out, "ddp-supervised", "checkpoints", "epoch_0001", "model.safetensors"))
    fsdp = load_file(os.path.join(out, "fsdp-supervised", "checkpoints", "epoch_0001", "model.safetensors"))
    assert ddp.keys() == fsdp.keys()
    worst = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp if ddp[k].numel())
    assert worst < 1e-5, f"FSDP2 and DDP weights differ by {worst} after the same 3 steps"
    dino = load_file(os.path.join(out, "fsdp-dino", "checkpoints", "epoch_0001", "model.safetensors"))
    assert {"teacher_centers", "last_teacher_centers"} <= dino.keys()


@pytest.mark.parametrize("name", ["mae", "simmim", "mpp", "dino"])
def test_wrapper_under_ddp_without_find_unused_parameters(worker, name):
    _, reports = worker
    first, second = (r["wrappers"][name] for r in reports)
    assert first["checksum"] == second["checksum"], "the replicas differ after 3 DDP steps"
    assert first["unused"] and all("mlp_head" in n or "cls_token" in n for n in first["unused"])


def test_dino_centre_is_the_global_mean_on_every_rank(worker):
    _, reports = worker
    first, second = (r["wrappers"]["dino"] for r in reports)
    assert first["centre_error"] < 1e-6 and second["centre_error"] < 1e-6
    assert first["centre_moved"] > 1e-4, "the ranks' batch centres were already equal: the check proves nothing"
    assert first["teacher_centers"] == second["teacher_centers"]
    apart = [r["wrappers"]["dino-without-all-reduce"]["teacher_centers"] for r in reports]
    assert apart[0] != apart[1], "without the all-reduce the ranks' centres should differ"


def test_unused_parameters_are_exactly_those_without_a_gradient():
    """What each wrapper declares to DDP is what a backward leaves without a gradient (single process)."""
    from fastvit.ssl import MAE, MPP, Dino, SimMIM

    vit = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64)
    for pool in ("cls", "mean"):
        wrappers = [MAE(encoder=fastvit.ViT(**vit, pool=pool), decoder_dim=16, decoder_heads=2, decoder_dim_head=8),
                    SimMIM(encoder=fastvit.ViT(**vit, pool=pool)),
                    MPP(transformer=fastvit.ViT(**vit, pool=pool), patch_size=8, dim=32),
                    Dino(fastvit.ViT(**vit, pool=pool), image_size=32, hidden_layer="to_latent", num_classes_K=16,
                         projection_hidden_size=16)]
        for wrapper in wrappers:
            wrapper(torch.rand(2, 3, 32, 32)).backward()
            no_grad = {n for n, p in wrapper.named_parameters(remove_duplicate=False)
                       if p.requires_grad and p.grad is None}
            assert set(wrapper.unused_parameters()) == no_grad, type(wrapper).__name__
            assert wrapper._ddp_params_and_buffers_to_ignore == sorted(no_grad)
