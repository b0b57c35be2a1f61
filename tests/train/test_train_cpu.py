"""fastvit train in one CPU process: a synthetic run end to end, an ImageFolder with validation, exact
resume after an interruption, clear errors, and the ``fastvit train`` forwarder. (--ssl and --fsdp are
tested under torchrun, test_train_distributed.py.)"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from train_helpers import TINY, latest_state, read_jsonl, write_image_folder

import fastvit
from fastvit.cli import main as cli_main
from fastvit.train import TrainConfig, main, parse_args, train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 on its image decoders
safetensors = pytest.importorskip("safetensors.torch", reason="fastvit train writes safetensors (fastvit[train])")
pytest.importorskip("matplotlib", reason="fastvit train plots with matplotlib (pip install fastvit[train])")


def _tensors(path: str) -> dict:
    return safetensors.load_file(path)


def test_synthetic_run_writes_metrics_plot_checkpoint_and_model(tmp_path):
    out = str(tmp_path / "run")
    summary = train(parse_args([*TINY, "--model-arg", "num_classes=4", "--synthetic", "32", "--batch-size", "8",
                                "--epochs", "2", "--lr", "3e-3", "--out", out]))
    assert summary["step"] == 8

    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 9)) and [r["epoch"] for r in epochs] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["img_per_s"] > 0, r
    assert max(r["lr"] for r in steps) == pytest.approx(3e-3)  # warm-up over the first epoch, then cosine
    assert steps[0]["lr"] < steps[3]["lr"] and steps[4]["lr"] > steps[7]["lr"]
    assert epochs[1]["loss"] < epochs[0]["loss"], "the class colours are learnable: the loss must go down"

    from PIL import Image, ImageStat

    png = Image.open(os.path.join(out, "metrics.png")).convert("L")
    assert png.size[0] >= 600 and png.size[1] >= 400
    assert ImageStat.Stat(png).stddev[0] > 10 and len(png.getcolors(1 << 16)) > 20, "the plot is blank"

    ckpt = os.path.join(out, "checkpoints", "epoch_0002")
    assert sorted(os.listdir(ckpt)) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["epoch_0002", "latest"]  # --keep 1
    state = latest_state(out)
    assert (state["epoch"], state["step"], state["world_size"]) == (2, 8, 1)
    assert state["config"]["model"] == "vit_tiny_patch16_224" and state["metrics"] == epochs[1]
    optim = _tensors(os.path.join(ckpt, "optimizer.safetensors"))
    assert {k.rsplit("/", 1)[1] for k in optim} == {"step", "exp_avg", "exp_avg_sq"}

    with open(os.path.join(out, "model.json"), encoding="utf-8") as f:
        meta = json.load(f)
    model = fastvit.create_model(meta["model"], **meta["model_args"])
    model.load_state_dict(_tensors(os.path.join(out, "model.safetensors")))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_image_folder_with_validation_top1_in_bf16(tmp_path):
    data = write_image_folder(str(tmp_path / "train"), classes=3, per_class=6)
    val = write_image_folder(str(tmp_path / "val"), classes=3, per_class=3, seed=0)
    out = str(tmp_path / "run")
    summary = train(parse_args([*TINY, "--num-classes", "3", "--data", data, "--val-data", val, "--batch-size", "4",
                                "--epochs", "2", "--lr", "3e-3", "--bf16", "--out", out]))
    epochs = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "epoch"]
    assert len(epochs) == 2 and summary["step"] == 8  # 18 images // 4
    for r in epochs:  # a whole number of the 9 validation images
        correct = r["val_top1"] * 9 / 100
        assert 0 <= correct <= 9 and correct == pytest.approx(round(correct))
    assert latest_state(out)["metrics"]["val_top1"] == epochs[-1]["val_top1"]


def test_compile_wraps_the_step_and_checkpoints_stay_unprefixed(tmp_path, monkeypatch):
    """--compile compiles the trained module (inductor takes minutes on this CPU: the eager backend here);
    the losses are the uncompiled run's and the checkpoint keys carry no ``_orig_mod.``."""
    compiled, real_compile = [], torch.compile

    def compile_eagerly(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    argv = [*TINY, "--model-arg", "num_classes=4", "--synthetic", "8", "--batch-size", "4"]
    train(parse_args([*argv, "--compile", "--out", str(tmp_path / "compiled")]))
    train(parse_args([*argv, "--out", str(tmp_path / "eager")]))
    assert len(compiled) == 1 and isinstance(compiled[0], fastvit.ViT)

    def losses(out):
        return [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]

    assert losses(str(tmp_path / "compiled")) == pytest.approx(losses(str(tmp_path / "eager")), abs=1e-6)
    keys = [_tensors(os.path.join(tmp_path, run, "checkpoints", "epoch_0001", "model.safetensors")).keys()
            for run in ("compiled", "eager")]
    assert keys[0] == keys[1]


def test_timm_model_with_grad_checkpointing(tmp_path):
    pytest.importorskip("timm")
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    try:
        fastvit.create_model("timm/vit_tiny_patch16_224", **kwargs)
    except ValueError as e:
        pytest.skip(f"create_model('timm/<name>') is not available here: {e}")
    model_args = [a for k, v in kwargs.items() for a in ("--model-arg", f"{k}={v}")]
    argv = ["--model", "timm/vit_tiny_patch16_224", *model_args, "--synthetic", "8", "--batch-size", "4",
            "--workers", "0", "--grad-checkpointing", "--out", str(tmp_path / "timm")]
    summary = train(parse_args(argv))
    assert summary["step"] == 2 and math.isfinite(summary["metrics"]["loss"])


class _Interrupt(Exception):
    pass


def test_resume_after_an_interruption_continues_exactly(tmp_path):
    """2 epochs straight vs. killed 2 steps into epoch 2, then --resume: the checkpoint of epoch 1 is all that
    is lost; the resumed steps have the same losses and learning rates, and the weights end bitwise equal."""
    argv = [*TINY, "--model-arg", "num_classes=4", "--synthetic", "24", "--batch-size", "4", "--epochs", "2",
            "--lr", "2e-3", "--model-arg", "dropout=0.1"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train(parse_args([*argv, "--out", straight]))

    def interrupt(info):
        if info["step"] == 8:  # 6 steps per epoch
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(parse_args([*argv, "--out", broken]), on_step=interrupt)
    assert latest_state(broken)["epoch"] == 1  # lost: the 2 steps of the epoch in progress
    assert max(r["step"] for r in read_jsonl(os.path.join(broken, "metrics.jsonl"))) == 8

    summary = train(parse_args([*argv, "--out", broken, "--resume"]))
    assert summary["step"] == 12

    def curve(out):
        return [(r["kind"], r["step"], r["loss"], r["lr"]) for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]

    assert curve(broken) == curve(straight)  # the same next-step loss, and the lost steps' lines replaced
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = _tensors(os.path.join(straight, "checkpoints", "epoch_0002", name))
        b = _tensors(os.path.join(broken, "checkpoints", "epoch_0002", name))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different} differ after resuming"


def test_resume_of_another_run_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    train(parse_args([*TINY, "--model-arg", "num_classes=4", "--synthetic", "8", "--batch-size", "8", "--out", out]))
    rc = main([*TINY, "--model-arg", "num_classes=4", "--synthetic", "8", "--batch-size", "8", "--out", out])
    assert rc == 2 and "holds a checkpoint (epoch_0001): pass --resume" in capsys.readouterr().err
    rc = main([*TINY, "--model-arg", "num_classes=5", "--synthetic", "8", "--batch-size", "8", "--out", out,
               "--resume", "--epochs", "2"])
    assert rc == 2 and "the checkpoint is of another run" in capsys.readouterr().err


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"), classes=2, per_class=2)
    missing = str(tmp_path / "nowhere")
    assert f"--data {missing}: no such directory" in _error([*TINY, "--data", missing], capsys)
    err = _error([*TINY, "--data", data, "--out", str(tmp_path / "o")], capsys)  # a 1000-class preset
    assert "has 2 classes but --model vit_tiny_patch16_224 predicts 1000: pass --num-classes 2" in err
    err = _error(["--model", "vit_no_such_model", "--synthetic", "4", "--out", str(tmp_path / "o")], capsys)
    assert "unknown model 'vit_no_such_model'" in err
    err = _error([*TINY, "--model-arg", "dimm=3", "--synthetic", "4", "--out", str(tmp_path / "o")], capsys)
    assert "cannot build --model vit_tiny_patch16_224 with" in err and "dimm" in err
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    assert f"--data {empty}:" in _error([*TINY, "--data", str(empty)], capsys)  # a class folder without images
    assert "--fsdp shards over torch.distributed ranks: launch with torchrun" in _error(
        [*TINY, "--synthetic", "4", "--fsdp"], capsys)
    assert "needs at least 16" in _error([*TINY, "--synthetic", "4", "--batch-size", "16", "--out",
                                          str(tmp_path / "o")], capsys)
    assert "--val-data measures the top-1 of a classifier" in _error(
        [*TINY, "--synthetic", "4", "--ssl", "mae", "--val-data", data], capsys)
    assert "--ssl mae cannot wrap --model cait_xxs24_224" in _error(
        ["--model", "cait_xxs24_224", "--synthetic", "4", "--ssl", "mae", "--out", str(tmp_path / "o")], capsys)


class _Tiny(torch.nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 2)
        self.checkpointing = False

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))


class _TinyCheckpointed(_Tiny):
    def set_grad_checkpointing(self, enable: bool = True):
        self.checkpointing = enable


def test_grad_checkpointing_is_set_or_refused_by_name(tmp_path, monkeypatch, capsys):
    built = []

    def create_model(name, **kwargs):
        built.append((_TinyCheckpointed if name == "with_gc" else _Tiny)())
        return built[-1]

    monkeypatch.setattr(fastvit, "create_model", create_model)
    common = ["--synthetic", "4", "--batch-size", "4", "--image-size", "8", "--workers", "0",
              "--grad-checkpointing"]
    err = _error(["--model", "without_gc", *common, "--out", str(tmp_path / "a")], capsys)
    assert "--grad-checkpointing: --model without_gc (_Tiny) has no set_grad_checkpointing()" in err
    train(parse_args(["--model", "with_gc", *common, "--out", str(tmp_path / "b")]))
    assert built[-1].checkpointing is True


def test_fastvit_train_subcommand_forwards(tmp_path, capsys):
    assert cli_main(["train", *TINY, "--data", str(tmp_path / "nowhere")]) == 2
    assert "fastvit train:" in capsys.readouterr().err
    out = str(tmp_path / "run")
    assert cli_main(["train", *TINY, "--model-arg", "num_classes=2", "--synthetic", "4", "--batch-size", "4",
                     "--out", out]) == 0
    assert latest_state(out)["step"] == 1


def test_config_round_trips_and_validates():
    config = parse_args([*TINY, "--synthetic", "4", "--ssl", "mae", "--ssl-arg", "masking_ratio=0.5"])
    assert config.model_args["dim"] == 32 and config.ssl_args == {"masking_ratio": 0.5}
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="exactly one of --data DIR"):
        TrainConfig(model="vit_tiny_patch16_224").validate()
