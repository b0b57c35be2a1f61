"""The training loop: ``train(config)`` runs epochs of AdamW steps, validates, checkpoints and plots.

Determinism and exact resume. Every rank seeds the same before the model is built (identical initial
weights, which FSDP2 needs: it does not broadcast them). Each epoch then reseeds torch, ``random`` and
numpy from ``(seed, epoch, rank)`` and the sampler shuffles from ``(seed, epoch)``, so epoch ``e`` draws
the same images, crops and masks whether the run started at epoch 0 or resumed at ``e``. With the
weights, the optimiser state and the step count restored from the checkpoint, a resumed run takes the
same steps as an uninterrupted one (bitwise on the CPU).

Replicas. At every checkpoint the trainer compares a checksum of each replicated tensor (DDP: every
parameter and buffer; FSDP2: the buffers) across the ranks; tensors that differ (a buffer updated from
one rank's data only) are named in a warning and in the checkpoint's ``state.json`` (``"diverged"``).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fastvit.extras import install_hint

from . import distributed as D
from .checkpoint import (
    DamagedCheckpoint,
    checkpoint_candidates,
    export_model,
    gather_state,
    is_checkpoint_dir,
    load_state,
    read_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, TrainError, machine_share
from .data import DIGITS, DigitsImages, SyntheticImages, image_folder, train_loader, val_loader
from .metrics import MetricsLog, read_metrics
from .optim import build_optimizer, lr_at, set_lr
from .plot import plot_metrics
from .requirements import check_requirements
from .task import Task, build_task, model_num_classes

__all__ = ["train", "run_command", "main", "seed_all", "evaluate"]

# Settings that must match for a checkpoint to continue a run.
_SAME_ON_RESUME = ("model", "model_args", "num_classes", "ssl", "ssl_args", "image_size")


def seed_all(seed: int) -> None:
    seed %= 2**63
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 1_000_003 + (epoch + 1) * 7_919 + rank


@torch.no_grad()
def evaluate(module: torch.nn.Module, loader, env: D.DistEnv, bf16: bool) -> float:
    """Top-1 in percent over every rank's shard (padding, labelled -1, is not counted)."""
    was_training = module.training
    module.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=env.device)  # correct, total
    for images, labels in loader:
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = module(images)
        valid = labels >= 0
        counts[0] += ((logits.argmax(dim=-1) == labels) & valid).sum()
        counts[1] += valid.sum()
    module.train(was_training)
    D.all_reduce_sum(counts, env)
    return float(100.0 * counts[0] / counts[1].clamp(min=1))


def _diverged_tensors(module: torch.nn.Module, env: D.DistEnv) -> list:
    """Names of replicated tensors (DTensor shards excluded) that are not the same on every rank."""
    if not env.distributed:
        return []
    from torch.distributed.tensor import DTensor

    named = [(n, t) for n, t in module.state_dict(keep_vars=False).items()
             if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.is_floating_point()]
    if not named:
        return []
    sums = torch.stack([torch.stack((t.double().sum(), t.double().square().sum())) for _, t in named])  # (n, 2)
    gathered = [torch.empty_like(sums) for _ in range(env.world_size)]
    torch.distributed.all_gather(gathered, sums)
    return [name for i, (name, _) in enumerate(named) if any(not torch.equal(g[i], gathered[0][i]) for g in gathered)]


class _Run:
    def __init__(self, config: TrainConfig, env: D.DistEnv, on_step: Optional[Callable[[dict], None]],
                 skipped: tuple = ()):
        self.config, self.env, self.on_step = config, env, on_step
        self.skipped = {need.module: need for need in skipped}  # optional packages missing: their features skip
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)  # a message stays one line in a log

    def log(self, message: str) -> None:
        if self.env.is_main:
            self.console.print(message)

    def _datasets(self, task: Task) -> tuple:
        cfg = self.config
        model_classes = model_num_classes(task.model)
        if cfg.synthetic is not None:
            classes = model_classes if task.supervised and model_classes else 10
            train_set = SyntheticImages(cfg.synthetic, task.image_size, classes, task.normalize, seed=cfg.seed)
        elif cfg.data == DIGITS:
            channels = getattr(task.model, "channels", 3)
            train_set = DigitsImages(task.image_size, train=True, normalize=task.normalize, channels=channels)
            if task.supervised and model_classes is not None and model_classes != 10:
                raise TrainError(f"--data digits has 10 classes but --model {cfg.model} predicts {model_classes}: "
                                 f"pass --num-classes 10")
            if task.supervised and cfg.val_data in (None, DIGITS):  # the held-out split, scored every epoch
                return train_set, DigitsImages(task.image_size, train=False, normalize=task.normalize,
                                               channels=channels)
        else:
            train_set = image_folder(cfg.data, task.image_size, train=True, normalize=task.normalize)
            if task.supervised and model_classes is not None and len(train_set.classes) != model_classes:
                raise TrainError(f"--data {cfg.data} has {len(train_set.classes)} classes but --model {cfg.model} "
                                 f"predicts {model_classes}: pass --num-classes {len(train_set.classes)}")
        val_set = None
        if cfg.val_data is not None:
            val_set = image_folder(cfg.val_data, task.image_size, train=False, normalize=task.normalize,
                                   flag="--val-data")
            if model_classes is not None and len(val_set.classes) != model_classes:
                raise TrainError(f"--val-data {cfg.val_data} has {len(val_set.classes)} classes but --model "
                                 f"{cfg.model} predicts {model_classes}")
            if cfg.data is not None and val_set.classes != train_set.classes:
                raise TrainError(f"--val-data {cfg.val_data} and --data {cfg.data} have different class folders")
        return train_set, val_set

    def _newest_readable(self) -> Optional[tuple]:
        """Rank 0: ``(directory, (model_state, optim_state, state), skipped)`` of the newest checkpoint that
        reads, ``skipped`` the newer ones that did not (one line each); None when there is none yet."""
        cfg = self.config
        explicit = cfg.resume not in (None, "auto")
        where = cfg.resume if explicit else cfg.out
        candidates = checkpoint_candidates(where)
        if not candidates:
            if explicit:
                raise TrainError(f"--resume {cfg.resume}: no checkpoint there (state.json or checkpoints/latest)")
            return None
        if cfg.resume is None:
            raise TrainError(f"--out {cfg.out} holds a checkpoint ({os.path.basename(candidates[0])}): pass --resume "
                             f"to continue that run, or choose another --out")
        skipped = []
        for directory in candidates:
            try:
                return directory, read_checkpoint(directory), skipped
            except DamagedCheckpoint as e:
                skipped.append(str(e))
        if explicit and is_checkpoint_dir(cfg.resume):
            raise TrainError(f"--resume {cfg.resume}: {skipped[0]}")
        older = "" if len(candidates) > 1 else " (and no older one: --keep 2 or more keeps one to fall back to)"
        raise TrainError(f"--resume: no checkpoint in {where} can be read{older}: {'; '.join(skipped)}")

    def _resume(self, wrapped, optimizer) -> tuple:
        """``(epoch, step)`` to start from: the newest readable checkpoint's (a damaged newer one is named and
        skipped, never silently), or ``(0, 0)`` when there is none yet."""
        cfg, env = self.config, self.env
        found = D.on_main(self._newest_readable, env)
        header = None if found is None else (found[0], found[1][2], found[2])  # small: directory, state, skipped
        header = D.broadcast_object(header, env)
        if header is None:
            if cfg.resume == "auto":
                self.log(f"no checkpoint in {cfg.out} yet: starting from scratch")
            return 0, 0
        directory, state, skipped = header
        for problem in skipped:
            self.log(f"[yellow]cannot resume from a damaged checkpoint: {escape(problem)}[/yellow]")
        saved = state.get("config", {})
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in _SAME_ON_RESUME
                   if saved.get(k) != getattr(cfg, k)]
        if changed:
            D.fail(f"--resume {directory}: the checkpoint is of another run ({'; '.join(changed)})", env)
        model_state, optim_state, _ = found[1] if env.is_main else ({}, {}, None)
        load_state(wrapped, optimizer, model_state, optim_state, env.distributed)
        fallback = f", the newest that reads ({len(skipped)} newer skipped)" if skipped else ""
        self.log(f"resumed from {directory} (epoch {state['epoch']}, step {state['step']}){fallback}")
        return int(state["epoch"]), int(state["step"])

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=self.console, disable=not self.env.is_main)

    def _build(self) -> tuple:
        """This rank's model and data, without collectives: ``(task, train_set, loader, val_loader)``."""
        cfg, env = self.config, self.env
        seed_all(cfg.seed)  # the same initial weights on every rank
        task = build_task(cfg)
        train_set, val_set = self._datasets(task)
        pin = env.device.type == "cuda"  # pinned host memory only helps copies to a GPU
        loader = train_loader(train_set, cfg.batch_size, env.rank, env.world_size, cfg.seed, self.share.workers, pin)
        return task, train_set, loader, val_loader(val_set, cfg.batch_size, env.rank, env.world_size,
                                                   self.share.workers, pin)

    def _setup(self) -> None:
        """Model, data, wrapping, optimiser, resume point, metrics file: everything before the first step."""
        cfg, env = self.config, self.env
        self.share = share = machine_share(cfg)
        if env.device.type == "cpu":
            torch.set_num_threads(share.threads)
        # A bad --model, --data or size stops every rank together (rank 0 says why), not one rank alone.
        task, train_set, self.loader, self.val = D.on_every_rank(self._build, env)
        self.task = task
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.images_per_step = cfg.batch_size * env.world_size

        trainable = {name for name, _ in task.trainable_parameters()}
        if env.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.wrapped = D.wrap(task.module, env)
        self.module = D.unwrap(self.wrapped)  # FSDP2 swapped the parameters for DTensor shards: look them up again
        self.optimizer = build_optimizer([(n, p) for n, p in self.module.named_parameters() if n in trainable],
                                         cfg.lr, cfg.weight_decay)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.step_module = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.start_epoch, self.step = self._resume(self.wrapped, self.optimizer)
        os.makedirs(cfg.out, exist_ok=True)
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.metrics = MetricsLog(self.metrics_path, env.is_main, resume_step=self.step if self.start_epoch else None)
        mode = "FSDP2" if env.fsdp else ("DDP" if env.distributed else "single process")
        n_params = sum(p.numel() for p in self.module.parameters())
        self.log(f"fastvit train: {cfg.model}{f' + {cfg.ssl}' if cfg.ssl else ''} ({n_params / 1e6:.2f} M "
                 f"parameters), {mode}, {env.world_size} rank(s) on {env.device.type}, {len(train_set)} images, "
                 f"{self.steps_per_epoch} steps/epoch of {cfg.batch_size} x {env.world_size}, out {cfg.out}")
        self.log(f"  {share.describe(threads=env.device.type == 'cpu')}")
        for need in self.skipped.values():
            self.log(f"[yellow]{need.module} is not importable: {need.purpose} will be skipped "
                     f"({escape(install_hint(need.module, need.extra))}); everything else is written[/yellow]")

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """One optimiser step; returns ``(detached loss, lr)``."""
        cfg, env = self.config, self.env
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        lr = lr_at(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, lr=cfg.lr,
                   min_lr=cfg.min_lr)
        set_lr(self.optimizer, lr)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = self.task.loss(self.step_module, images, labels)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.task.after_step is not None:
            self.task.after_step(self.module)  # Dino: the teacher and centre EMA
        self.step += 1
        return loss.detach().double(), lr

    def _train_epoch(self, epoch: int, progress: Progress) -> dict:
        """The steps of ``epoch`` (0-based); returns its ``metrics.jsonl`` record (loss over all ranks)."""
        cfg, env = self.config, self.env
        self.loader.sampler.set_epoch(epoch)
        seed_all(_epoch_seed(cfg.seed, epoch, env.rank))
        self.wrapped.train()
        bar = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=self.steps_per_epoch, info="")
        epoch_start = interval_start = time.perf_counter()
        epoch_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        interval = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, steps since the last line
        lr = cfg.lr
        for images, labels in self.loader:
            loss, lr = self._train_step(images, labels)
            epoch_loss += loss
            interval += torch.stack((loss, torch.ones_like(loss)))
            if self.step % cfg.log_every == 0:
                record = self._interval_record(interval, interval_start, epoch, lr)
                self.metrics.write(record)
                progress.update(bar, info=f"loss {record['loss']:.4f}  lr {lr:.2e}  {record['img_per_s']:.0f} img/s")
                interval.zero_()
                interval_start = time.perf_counter()
            progress.advance(bar)
            if self.on_step is not None:
                self.on_step({"epoch": epoch, "step": self.step, "loss": float(loss), "module": self.module})

        steps = torch.tensor(self.steps_per_epoch, dtype=torch.float64, device=env.device)
        totals = D.all_reduce_sum(torch.stack((epoch_loss, steps)), env)
        elapsed = time.perf_counter() - epoch_start
        record = {"kind": "epoch", "epoch": epoch + 1, "step": self.step, "loss": float(totals[0] / totals[1]),
                  "lr": lr, "img_per_s": self.steps_per_epoch * self.images_per_step / elapsed, "time_s": elapsed}
        if self.val is not None:
            record["val_top1"] = evaluate(self.wrapped, self.val, env, cfg.bf16)
        line = f"loss {record['loss']:.4f}" + (f"  top-1 {record['val_top1']:.2f}%" if self.val is not None else "")
        progress.update(bar, info=line)
        if not self.console.is_terminal:  # a log file sees the bars only at the end: one line per epoch
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: step {self.step}, {line}, {record['img_per_s']:.0f} img/s, "
                     f"{elapsed:.0f} s")
        return record

    def _checkpoint(self, record: dict) -> tuple:
        """Compare the replicas, then write the checkpoint of the epoch ``record`` ends; returns
        ``(model_state, diverged)``."""
        env = self.env
        diverged = _diverged_tensors(self.module, env)
        if diverged:
            self.log(f"[yellow]warning: tensors differ between ranks: {', '.join(diverged)}[/yellow]")
        model_state, optim_state = gather_state(self.wrapped, self.optimizer)

        def save():
            try:
                return save_checkpoint(self.config.out, record["epoch"], self.step, model_state, optim_state,
                                       keep=self.config.keep, meta=self._meta(record, diverged))
            except OSError as e:  # a full disk, a read-only --out: every rank stops with this line
                raise TrainError(f"writing the checkpoint of epoch {record['epoch']} under {self.config.out} "
                                 f"failed: {e}") from None

        D.on_main(save, env)  # also the ranks' meeting point after the checkpoint
        return model_state, diverged

    def run(self) -> dict:
        cfg, env = self.config, self.env
        self._setup()
        record, diverged, model_state = None, [], None
        with self._progress() as progress:
            for epoch in range(self.start_epoch, cfg.epochs):
                record = self._train_epoch(epoch, progress)
                self.metrics.write(record)
                model_state, diverged = self._checkpoint(record)
        if model_state is None:  # resumed after the last epoch: nothing trained, export anyway
            model_state, _ = gather_state(self.wrapped, self.optimizer)
        summary = {"out": cfg.out, "epochs": cfg.epochs, "step": self.step, "metrics": record, "diverged": diverged}
        summary.update(D.on_main(lambda: self._finish(model_state), env) or {})
        return summary

    def _finish(self, model_state: dict) -> dict:
        """Rank 0, after the last epoch: the exported backbone and the metrics plot (skipped, with the reason,
        when matplotlib is missing or fails: the curves are a convenience, metrics.jsonl holds the numbers)."""
        cfg = self.config
        model_args = {**cfg.model_args, **({"num_classes": cfg.num_classes} if cfg.num_classes else {})}
        meta = {"model": cfg.model, "model_args": model_args, "image_size": list(self.task.image_size),
                "ssl": cfg.ssl, "epochs": cfg.epochs, "step": self.step}
        try:
            done = {"model": export_model(cfg.out, model_state, self.task.backbone_prefix, meta), "plot": None}
        except OSError as e:
            raise TrainError(f"writing the trained model under {cfg.out} failed: {e}") from None
        if "matplotlib" not in self.skipped:
            try:
                done["plot"] = plot_metrics(read_metrics(self.metrics_path), os.path.join(cfg.out, "metrics.png"),
                                            title=f"{cfg.model}{f' ({cfg.ssl})' if cfg.ssl else ''}")
            except Exception as e:  # noqa: BLE001 - a convenience: say why, keep the run's outcome
                self.log(f"[yellow]metrics.png not drawn: {type(e).__name__}: {escape(str(e))}[/yellow]")
        written = ", ".join(p for p in (done["model"], self.metrics_path, done["plot"]) if p)
        self.log(f"done: {self.step} steps; {written}")
        return done

    def _interval_record(self, interval: torch.Tensor, start: float, epoch: int, lr: float) -> dict:
        """The ``metrics.jsonl`` line of the steps since ``start`` (``interval``: their loss sum and count)."""
        step, local_steps = self.step, float(interval[1])
        totals = D.all_reduce_sum(interval.clone(), self.env)
        loss = float(totals[0] / totals[1])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss} at step {step}: lower --lr, add --grad-clip, "
                                     f"or drop --bf16")
        elapsed = max(time.perf_counter() - start, 1e-9)
        return {"kind": "step", "epoch": epoch + 1, "step": step, "loss": loss, "lr": lr,
                "img_per_s": local_steps * self.images_per_step / elapsed}

    def _meta(self, record: dict, diverged: list) -> dict:
        from fastvit import __version__

        env = self.env
        return {"config": self.config.to_dict(), "world_size": env.world_size, "fsdp": env.fsdp,
                "steps_per_epoch": self.steps_per_epoch, "metrics": record, "diverged": diverged,
                "versions": {"fastvit": __version__, "torch": torch.__version__}}


def train(config: TrainConfig, on_step: Optional[Callable[[dict], None]] = None,
          report: Optional[Callable[[str], None]] = None) -> dict:
    """Run ``config`` (under torchrun: on every rank). ``on_step(info)`` is called after every optimiser step
    with ``epoch`` (0-based), ``step`` (1-based), ``loss`` (this rank's) and ``module`` (the trained module).
    ``report(message)`` is called on rank 0 with a ``TrainError``'s message before the ranks leave.

    Returns a summary: ``out``, ``step``, the last epoch's ``metrics``, and on rank 0 the ``model`` and
    ``plot`` paths. Raises ``TrainError`` on bad input (on every rank: ``SharedTrainError`` where rank 0
    reports it).
    """
    config.validate()
    env = D.setup(config.device, config.fsdp)
    clean = False
    try:
        skipped = check_requirements(config, env)  # before any work: a missing package stops every rank now
        result = _Run(config, env, on_step, tuple(skipped)).run()
        clean = True
        return result
    except TrainError as e:
        clean = getattr(e, "agreed", False)
        if report is not None and env.is_main:
            report(str(e))
        raise
    finally:
        D.teardown(env, clean=clean)


def run_command(make_config: Callable[[], TrainConfig]) -> int:
    """The ``fastvit train`` command around ``train``: exit 0, or 2 on bad input, its one line printed once
    (by rank 0) on stderr; every rank exits 2."""
    reported = []

    def report(message: str) -> None:
        print(f"fastvit train: {message}", file=sys.stderr, flush=True)
        reported.append(message)

    try:
        train(make_config(), report=report)
    except TrainError as e:
        if not reported and os.environ.get("RANK", "0") == "0":
            report(str(e))
        return 2
    return 0


def main(argv=None) -> int:
    """``python -m fastvit.train``: ``run_command`` over ``argv``."""
    from .config import parse_args

    return run_command(lambda: parse_args(argv))
