"""The one fine-tuning loop every method uses (QAT, distillation, pruning recovery).

    result = smallify.train(model, TrainData(x, y, batch_size=128), TrainConfig(epochs=2, lr=1e-3),
                            eval_fn=accuracy, checkpoint="run.ckpt")

Progress bar per epoch, ``eval_fn(model)`` after each epoch, a checkpoint (model, optimizer, scheduler,
position) every ``checkpoint_every`` steps and at each epoch's end, written atomically and read back with
``torch.load(weights_only=True)`` (no code runs on load). Calling ``train`` again with the same checkpoint path
resumes where it stopped, mid-epoch included: ``TrainData`` orders each epoch by a seed of its own, so the
batches already done are skipped exactly. Under ``torchrun`` (``torch.distributed`` initialized, gloo on
CPU) the model is wrapped in DistributedDataParallel, each process takes every world-size-th batch, and
rank 0 writes the checkpoints.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from smallify import files
from smallify.config import Config, check_choice, check_config
from smallify.errors import ConfigError, DataError, ModelError, SmallifyError, first_line
from smallify.progress import track

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass
class TrainConfig(Config):
    """Fine-tuning settings: ``optimizer`` 'sgd' (momentum 0.9, Nesterov) | 'adamw' | 'adam'; ``schedule``
    'cosine' (to zero over all steps, after ``warmup_steps`` of linear warm-up) | 'constant'."""

    kind = "train"
    verbs = ("train", "qat", "distill (as train_config=)", "prune_gradually (as train_config=)")
    epochs: float = 1.0
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    checkpoint_every: int = 200
    seed: int = 0

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if not self.epochs > 0:
            raise ConfigError(f"epochs={self.epochs!r} must be > 0 (fractions run part of an epoch)")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} must be > 0")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every!r} must be >= 1 step")


class TrainData:
    """In-memory (inputs, labels) with a reproducible order per epoch: ``epoch(e)`` shuffles with seed
    ``seed + e``, so a resumed run sees the same batches. ``augment(x, generator)`` is applied per batch."""

    def __init__(self, x, y=None, batch_size: int = 128, shuffle: bool = True, seed: int = 0,
                 augment: Callable | None = None):
        self.x = torch.as_tensor(x)
        self.y = None if y is None else torch.as_tensor(y)
        if self.y is not None and len(self.y) != len(self.x):
            raise DataError(f"inputs hold {len(self.x)} samples but labels {len(self.y)}")
        if len(self.x) == 0:
            raise DataError("training data is empty")
        self.batch_size, self.shuffle, self.seed, self.augment = batch_size, shuffle, seed, augment

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        gen = torch.Generator().manual_seed(self.seed + e)
        order = torch.randperm(len(self.x), generator=gen) if self.shuffle else torch.arange(len(self.x))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x, gen)
            yield x, (None if self.y is None else self.y[idx])


@dataclasses.dataclass
class TrainResult:
    history: list[dict]           # one entry per epoch: epoch, loss, metric (if eval_fn), seconds
    steps: int
    resumed_from: int | None      # the global step a checkpoint resumed from

    @property
    def report(self) -> "TrainResult":      # the one report attribute every verb's result has
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.steps} step(s)" + (f", resumed from step {self.resumed_from}" if self.resumed_from else "")]
        for h in self.history:
            lines.append("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items()))
        return "\n".join(lines)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size). Launched by ``torchrun`` (WORLD_SIZE > 1 in the environment) without a process
    group yet, one is started here (gloo: CPU), so ``torchrun ... smallify distill`` trains data-parallel."""
    if not torch.distributed.is_available():
        return 0, 1
    if not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 \
            and "MASTER_ADDR" in os.environ:
        torch.distributed.init_process_group("gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """False on every data-parallel process but rank 0 (which writes files and prints)."""
    return rank_and_world()[0] == 0


def _make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    klass = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return klass(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _save_checkpoint(path: Path, model: nn.Module, opt, sched, step: int, history: list) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": step, "history": history}
    files.write_atomic(path, lambda tmp: torch.save(state, tmp))


def _resume(path: Path, model: nn.Module, opt, sched) -> tuple[int, list]:
    """Restore a checkpoint ``train`` wrote (tensors only: no code runs); (step, history). A file that is not
    one, is cut short or belongs to another model is a ModelError naming it."""
    keys = {"model", "optimizer", "scheduler", "step", "history"}
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:   # torch raises RuntimeError, UnpicklingError, EOFError, ... for foreign or cut files
        why = first_line(e, 160)
        raise ModelError(f"checkpoint {path} cannot be read ({why}); give the file train() wrote, or delete it "
                         "to start over") from None
    if not isinstance(state, dict) or not keys <= set(state) or not isinstance(state["step"], int) \
            or not isinstance(state["history"], list):
        raise ModelError(f"checkpoint {path} is not a smallify training checkpoint (keys {sorted(keys)}); give "
                         "the file train() wrote, or delete it to start over")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        why = first_line(e, 160)
        raise ModelError(f"checkpoint {path} was written for another model or optimizer ({why}); give another "
                         "checkpoint path, or delete it to start over") from None
    return state["step"], state["history"]


def default_loss(output: torch.Tensor, target: torch.Tensor | None, batch_inputs: torch.Tensor) -> torch.Tensor:
    if target is None:
        raise DataError("the data has no labels: pass labels, or a loss_fn(output, target, inputs) that needs none")
    return F.cross_entropy(output, target)


def train(model: nn.Module, data: TrainData, config: TrainConfig | None = None, loss_fn: Callable | None = None,
          eval_fn: Callable[[nn.Module], float] | None = None, checkpoint: str | os.PathLike | None = None,
          progress: bool = True, params=None, on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Fine-tune ``model`` in place on ``data``; see the module docstring. ``loss_fn(output, target, inputs)``
    (default cross-entropy); ``params``: what to optimize (default every parameter that requires grad);
    ``on_step(step, total)``: called before every step (sparsity schedules)."""
    cfg = check_config(config, TrainConfig, "train") or TrainConfig()
    if not isinstance(data, TrainData):
        raise DataError(f"training data of type {type(data).__name__} is not supported; accepted: "
                        "smallify.TrainData(x, y, batch_size) (reproducible order, so that runs can resume)")
    loss_fn = loss_fn or default_loss
    rank, world = rank_and_world()
    steps_per_epoch = len(data) // world   # under DDP a step is one batch per process
    if steps_per_epoch == 0:
        raise DataError(f"{len(data)} batch(es) cannot feed {world} processes; use a smaller batch_size")
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ConfigError("the model has no parameter that requires grad: nothing to train")
    opt = _make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    step, history, resumed = 0, [], None
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None:
        files.check_writable(ckpt)
        if ckpt.is_file():
            step, history = _resume(ckpt, model, opt, sched)
            resumed = step
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    torch.manual_seed(cfg.seed + step)
    epochs = math.ceil(total / steps_per_epoch)
    for epoch in range(step // steps_per_epoch, epochs):
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        first = step - epoch * steps_per_epoch          # steps of this epoch already done (resume)
        count = min(steps_per_epoch, total - epoch * steps_per_epoch) - first
        net.train()
        mine = itertools.islice(_my_batches(data.epoch(epoch), rank, world), first, first + count)
        for x, y in track(mine, f"epoch {epoch + 1}/{epochs}", progress and rank == 0, total=count):
            if on_step is not None:
                on_step(step, total)
            loss = loss_fn(net(x), y, x)
            if not torch.isfinite(loss):
                raise DataError(f"the loss became {float(loss)} at step {step}: lower lr (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_sum, seen = loss_sum + float(loss.detach()) * len(x), seen + len(x)
            if ckpt is not None and rank == 0 and step % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, model, opt, sched, step, history)
        net.eval()
        entry = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "seconds": time.perf_counter() - t0}
        if eval_fn is not None:
            entry["metric"] = call_metric(eval_fn, model)
        history.append(entry)
        if ckpt is not None and rank == 0:
            _save_checkpoint(ckpt, model, opt, sched, step, history)
    if on_step is not None:
        on_step(step, total)
    model.eval()
    return TrainResult(history, step, resumed)


def _my_batches(batches: Iterator, rank: int, world: int) -> Iterator:
    """Batch ``rank`` of each group of ``world`` consecutive batches (incomplete last group dropped)."""
    while True:
        group = list(itertools.islice(batches, world))
        if len(group) < world:
            return
        yield group[rank]


def call_metric(eval_fn: Callable, *args) -> float:
    """Call the user's ``eval_fn`` and check its result; its own errors become a DataError naming it."""
    try:
        value = eval_fn(*args)
    except SmallifyError:
        raise
    except Exception as e:
        raise DataError(f"eval_fn raised {type(e).__name__}: {e}") from e
    return check_metric(value)


def check_metric(value) -> float:
    """An ``eval_fn``'s result as a float, or a clear error."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DataError(f"eval_fn returned {value!r} ({type(value).__name__}); it must return a number "
                        "(higher is better, e.g. top-1 accuracy)") from None
    if not math.isfinite(v):
        raise DataError(f"eval_fn returned {v}; it must return a finite number")
    return v
