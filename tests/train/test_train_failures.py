"""fastvit train when something is missing or broken: optional packages (checked before the first step,
under torchrun on every rank), damaged checkpoints (named, skipped for the newest one that reads, never a
silent fresh start), errors that every rank shares, and the defaults that fit the machine."""

from __future__ import annotations

import os
import re

import pytest
import torch
from train_helpers import TINY, blocking_imports, latest_state, read_jsonl, torchrun

from fastvit.train import distributed as D
from fastvit.train import main, parse_args, train
from fastvit.train.config import machine_share

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
pytest.importorskip("safetensors.torch", reason="fastvit train writes safetensors (fastvit[train])")

RUN = [*TINY, "--model-arg", "num_classes=4", "--synthetic", "16", "--batch-size", "4"]


def _one_line(err: str, needle: str) -> str:
    """The single stderr line holding ``needle`` (the message is never wrapped or followed by a traceback)."""
    lines = [line for line in err.splitlines() if needle in line]
    assert len(lines) == 1, f"expected one line with {needle!r}:\n{err}"
    assert not re.search(r'File ".*fastvit', err), f"a traceback through fastvit:\n{err}"  # torchrun's own may follow
    return lines[0]


def _exit_codes(torchrun_stderr: str) -> list:
    """Every rank's exit status from torchrun's failure report (ranks killed by torchrun: negative)."""
    return [int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", torchrun_stderr, flags=re.M)]


# --------------------------------------------------------------------------------------------------
# optional packages
# --------------------------------------------------------------------------------------------------

def test_without_matplotlib_every_rank_trains_and_skips_only_the_plot(tmp_path):
    """The reported case: torchrun, 2 ranks, matplotlib not importable. The run says once, before the first
    step, that metrics.png is skipped; writes the checkpoint, metrics.jsonl and the model; exits 0."""
    out = str(tmp_path / "run")
    proc = torchrun(["-m", "fastvit.train", *RUN, "--epochs", "2", "--out", out],
                    env=blocking_imports(str(tmp_path / "site"), ("matplotlib",)))
    notice = _one_line(proc.stderr, "matplotlib is not importable")
    assert "metrics.png" in notice and "pip install 'fastvit[train]'" in notice
    assert proc.stderr.index("matplotlib is not importable") < proc.stderr.index("epoch 1/2")  # before any step
    assert latest_state(out)["epoch"] == 2 and os.path.isfile(os.path.join(out, "model.safetensors"))
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["kind"] == "epoch"] == [1, 2]
    assert not os.path.exists(os.path.join(out, "metrics.png"))


def test_a_missing_required_package_stops_every_rank_before_training(tmp_path):
    out = str(tmp_path / "run")
    proc = torchrun(["-m", "fastvit.train", *RUN, "--epochs", "2", "--out", out], check=False,
                    env=blocking_imports(str(tmp_path / "site"), ("safetensors",)))
    assert proc.returncode != 0
    line = _one_line(proc.stderr, "fastvit train: fastvit train needs safetensors")
    assert "pip install 'fastvit[train]'" in line
    # Both ranks stopped with status 2: rank 1 raised the same error (it did not wait in a collective).
    codes = _exit_codes(proc.stderr)
    assert len(codes) == 2 and 2 in codes and all(c != 0 for c in codes), proc.stderr
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # no step was taken


def test_required_packages_follow_the_options(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    assert main([*TINY, "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "needs torchvision for --data (decoding the images)" in capsys.readouterr().err
    out = str(tmp_path / "synthetic")  # generated images need no torchvision
    assert main([*RUN, "--out", out]) == 0
    assert latest_state(out)["step"] == 4


def test_without_matplotlib_in_one_process(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    summary = train(parse_args([*RUN, "--out", str(tmp_path / "run")]))
    assert summary["plot"] is None and os.path.isfile(summary["model"])
    assert "metrics.png (the curves of metrics.jsonl) will be skipped" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# damaged checkpoints
# --------------------------------------------------------------------------------------------------

def _damage(path: str, how: str) -> None:
    if how == "truncated":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 3])
    else:
        with open(path, "wb") as f:
            f.write(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1),
                                  dtype=torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("how", ["truncated", "random"])
@pytest.mark.parametrize("part", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_resume_falls_back_to_the_newest_checkpoint_that_reads(tmp_path, capsys, how, part):
    out = str(tmp_path / "run")
    train(parse_args([*RUN, "--epochs", "2", "--keep", "2", "--out", out]))
    damaged = os.path.join(out, "checkpoints", "epoch_0002", part)
    _damage(damaged, how)
    capsys.readouterr()
    summary = train(parse_args([*RUN, "--epochs", "3", "--keep", "2", "--out", out, "--resume"]))
    err = capsys.readouterr().err
    line = _one_line(err, "cannot resume from a damaged checkpoint")
    assert damaged in line, line
    assert re.search(r"truncated|not a safetensors file|damaged|cannot be read as JSON", line), line
    assert "resumed from " + os.path.join(out, "checkpoints", "epoch_0001") + " (epoch 1, step 4)" in err
    assert summary["step"] == 12  # epochs 2 and 3 trained again from epoch 1's checkpoint
    assert latest_state(out)["epoch"] == 3


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_resume_with_no_readable_checkpoint_stops_with_the_reason(tmp_path, capsys, how):
    out = str(tmp_path / "run")
    train(parse_args([*RUN, "--out", out]))  # --keep 1: one checkpoint
    damaged = os.path.join(out, "checkpoints", "epoch_0001", "model.safetensors")
    _damage(damaged, how)
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    capsys.readouterr()
    assert main([*RUN, "--epochs", "2", "--out", out, "--resume"]) == 2
    line = _one_line(capsys.readouterr().err, "fastvit train: --resume: no checkpoint in")
    assert damaged in line and "no older one" in line
    assert read_jsonl(os.path.join(out, "metrics.jsonl")) == records  # nothing started from scratch
    # A checkpoint named explicitly is not replaced by another one.
    assert main([*RUN, "--epochs", "2", "--out", out, "--resume", os.path.join(out, "checkpoints", "epoch_0001")]) == 2
    assert damaged in _one_line(capsys.readouterr().err, "fastvit train: --resume ")


# --------------------------------------------------------------------------------------------------
# errors every rank shares; machine defaults
# --------------------------------------------------------------------------------------------------

def test_an_error_of_rank_0_ends_every_rank(tmp_path):
    """Rank 0 fails in work only it does (a checkpoint under a read-only folder is what a full disk looks
    like); rank 1 gets the same message instead of waiting in a barrier; both exit 2, the line printed once."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys\n"
        "from fastvit.train import TrainError, distributed as D\n"
        "env = D.setup('cpu')\n"
        "def fail():\n"
        "    raise TrainError('writing the checkpoint failed: [Errno 28] No space left on device')\n"
        "try:\n"
        "    D.on_main(fail, env)\n"
        "except TrainError as e:\n"
        "    print(f'rank {env.rank}: {type(e).__name__}: {e}', flush=True)\n"
        "    D.teardown(env, clean=True)\n"
        "    sys.exit(2)\n"
        "sys.exit(0)\n")
    proc = torchrun([str(script)], check=False)
    assert "rank 0: TrainError: writing the checkpoint failed" in proc.stdout
    assert "rank 1: SharedTrainError: writing the checkpoint failed" in proc.stdout
    codes = _exit_codes(proc.stderr)
    assert len(codes) == 2 and all(c != 0 for c in codes), proc.stderr


def test_one_process_errors_share_nothing():
    env = D.DistEnv()
    with pytest.raises(D.TrainError, match="boom") as info:
        D.on_main(lambda: (_ for _ in ()).throw(D.TrainError("boom")), env)
    assert info.value.agreed and not isinstance(info.value, D.SharedTrainError)
    assert D.on_every_rank(lambda: 3, env) == 3


def test_workers_and_threads_fit_the_machine(monkeypatch):
    config = parse_args([*RUN[:2], "--synthetic", "4"])  # no --workers: the machine decides
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert (machine_share(config, 1).workers, machine_share(config, 1).threads) == (1, 2)
    assert (machine_share(config, 2).workers, machine_share(config, 2).threads) == (0, 1)  # one core each
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert (machine_share(config, 8).workers, machine_share(config, 8).threads) == (4, 8)  # at most 4
    assert machine_share(config, 8).describe() == ("4 data loader workers and 8 CPU threads per rank "
                                                   "(64 cores for 8 local ranks)")
    given = parse_args([*RUN[:2], "--synthetic", "4", "--workers", "3", "--threads", "5"])
    assert (machine_share(given, 8).workers, machine_share(given, 8).threads) == (3, 5)


def test_the_run_header_says_what_the_machine_gave(tmp_path, capsys):
    train(parse_args([*RUN, "--out", str(tmp_path / "run")]))
    assert re.search(r"\d+ data loader workers? and \d+ CPU threads? per rank \(\d+ cores? for 1 local rank\)",
                     capsys.readouterr().err)
