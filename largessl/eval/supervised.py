"""The resumable supervised loop shared by the linear protocol and fine-tuning: requeue like pretraining.

One step: this rank's batch of the :class:`~largessl.data.stream.TrainStream` (equal batch counts on
every rank, exact resume at any batch) → forward → cross-entropy → backward through DDP (gradients
averaged over equal per-rank batches = the global-batch gradient) → SGD with a per-step cosine lr.

Checkpoints go through :class:`~largessl.run.checkpoint.CheckpointManager` (``step-N/`` folders, atomic,
hash-verified, newest two kept): after every epoch and when a stop is agreed. A stop request (SIGTERM,
SIGUSR1/2 from SLURM, a pod eviction) is recorded by the signal handler, agreed on by every rank at a
step boundary, saved, and reported as :data:`STOPPED`; the CLI turns it into exit code 75 and the rerun of
the same command resumes from the newest checkpoint (weights, optimizer, step, data position, RNG).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum_no_grad, get_rank, get_world_size
from largessl.eval.features import images_and_labels
from largessl.run.checkpoint import (
    CheckpointManager,
    SavePayload,
    git_revision,
    load_rank_state,
    load_training_checkpoint,
)
from largessl.run.checkpoint import load_model_state as _load_model_state
from largessl.run.progress import ProgressBar
from largessl.run.rng import capture_rng_state, restore_rng_state
from largessl.run.signals import StopFlag

log = logging.getLogger(__name__)

STOPPED = "stopped"
"""Returned by :func:`fit_supervised` when a stop request was agreed and saved (exit 75, rerun to resume)."""
COMPLETED = "completed"


def cosine_lr(base_lr: float, progress: float) -> float:
    """Cosine decay from ``base_lr`` to 0 as ``progress`` goes from 0 to 1 (a pure function of progress)."""
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k clipped to the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).float()


class StopCheck:
    """Signals recorded by a :class:`StopFlag`, agreed on by every rank with an all-reduce on the device."""

    def __init__(self, device: torch.device, group: ProcessGroup | None = None, every: int | None = None) -> None:
        self.flag = StopFlag(0.0, group)
        self.device = device
        self.group = group
        # .item() on the agreed flag syncs a CUDA stream: check every step on CPU, every 20 on GPU
        self.every = every or (1 if device.type == "cpu" else 20)
        self.reason = ""
        self.stopped = False

    def __enter__(self) -> StopCheck:
        self.flag.install()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stopped:
            # the process is about to exit 75: a second signal must not turn it into death-by-signal
            self.flag.ignore_further()
        else:
            self.flag.uninstall()

    def agreed(self, step: int | None = None) -> bool:
        """Collective (every rank, same call sites): True on every rank when any rank got a stop signal."""
        if step is not None and step % self.every:
            return False
        flag = torch.tensor([1.0 if self.flag.local else 0.0], dtype=torch.float32, device=self.device)
        all_reduce_sum_no_grad(flag, self.group)
        if bool(flag.item() > 0):
            import signal

            got = self.flag.signum
            self.reason = f"received {signal.Signals(got).name}" if got is not None else "a signal on another rank"
            self.stopped = True
        return self.stopped


@dataclass
class SupervisedRun:
    """What the loop trains and where it keeps its state."""

    name: str
    """For logs and progress bars (e.g. "linear", "finetune 10%")."""
    checkpoint_dir: str
    settings: dict[str, Any]
    """Everything that defines the run (recipe, sources, manifests); a saved state resumes only if it matches."""
    epochs: int
    base_lrs: list[float]
    """Peak lr of each optimizer parameter group (already scaled to the global batch)."""
    progress: bool = True
    state_extra: dict[str, Any] = field(default_factory=dict)


def _normalised(settings: dict[str, Any]) -> Any:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _resume(run: SupervisedRun, manager: CheckpointManager, trainable: nn.Module, optimizer: torch.optim.Optimizer,
            stream: Any, rank: int, world: int) -> tuple[int, int, int]:
    """Load the newest checkpoint if any: returns (step, epoch, batch in epoch)."""
    manager.cleanup_interrupted()
    path = manager.latest()
    if path is None:
        return 0, 0, 0
    state = load_training_checkpoint(path)
    saved = state["meta"].get("settings")
    if saved != _normalised(run.settings):
        diff = sorted(k for k in set(saved or {}) | set(run.settings)
                      if (saved or {}).get(k) != _normalised(run.settings).get(k))
        raise ValueError(f"{path} was written by a {run.name} run with different settings ({', '.join(diff)}); "
                         f"delete {run.checkpoint_dir} to start over, or write the results elsewhere (--out)")
    weights, _, _ = _load_model_state(path)
    trainable.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    saved_world = int(state["meta"].get("world_size", world))
    rank_state = load_rank_state(path, rank if rank < saved_world else 0)
    epoch, batch = stream.resume_batch(rank_state["data"], allow_resplit=True)
    if saved_world == world:
        restore_rng_state(rank_state["rng"])
    log.info("%s: resumed from %s at step %d (epoch %d, batch %d)", run.name, path, step, epoch, batch)
    return step, epoch, batch


def _save(run: SupervisedRun, manager: CheckpointManager, trainable: nn.Module, optimizer: torch.optim.Optimizer,
          stream: Any, step: int, steps_per_epoch: int, rank: int, world: int) -> None:
    epoch, batch = divmod(step, steps_per_epoch)
    payload = SavePayload(rank_state={"rng": capture_rng_state(), "data": stream.position_state(epoch, batch),
                                      "rank": rank})
    if rank == 0:
        payload.model_state = trainable.state_dict()
        payload.training_state = {"step": step, "epoch": epoch, "optimizer": optimizer.state_dict()}
        payload.meta = {"step": step, "epoch": step / steps_per_epoch, "world_size": world,
                        "git_revision": git_revision(), "settings": _normalised(run.settings), "stage": run.name}
    manager.save(step, payload)


def fit_supervised(run: SupervisedRun, trainable: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                   optimizer: torch.optim.Optimizer, stream: Any, device: torch.device, stop: StopCheck,
                   group: ProcessGroup | None = None, writer: Any = None, train_mode: Callable[[], None] | None = None,
                   keep: int = 2) -> str:
    """Train to ``run.epochs`` epochs of ``stream`` (resuming first); returns :data:`COMPLETED` or :data:`STOPPED`.

    ``trainable`` holds what is saved and resumed (the head, or backbone + head); ``forward(images)`` gives
    logits (through DDP, so gradients are averaged over ranks). ``train_mode`` sets the modules' modes at
    the start of every epoch (frozen backbone in eval mode for the linear protocol).
    """
    rank, world = get_rank(group), get_world_size(group)
    manager = CheckpointManager(run.checkpoint_dir, keep=keep, rank=rank, group=group)
    steps_per_epoch = int(stream.batches_per_epoch)
    total = run.epochs * steps_per_epoch
    step, epoch, start_batch = _resume(run, manager, trainable, optimizer, stream, rank, world)
    if step >= total:
        return COMPLETED
    log.info("%s: training %d epochs x %d steps per epoch from step %d", run.name, run.epochs, steps_per_epoch, step)
    bar = ProgressBar(total, step, enabled=run.progress and rank == 0, desc=run.name)
    try:
        while step < total:
            if train_mode is not None:
                train_mode()
            sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, samples: one reduce per epoch
            for item in stream.iterate(epoch, start_batch):
                images, labels = images_and_labels(item)
                labels = labels.to(device, non_blocking=True).long()
                for g, base in zip(optimizer.param_groups, run.base_lrs):
                    g["lr"] = cosine_lr(base, step / total)
                loss = F.cross_entropy(forward(images.to(device, non_blocking=True)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                sums += torch.stack([loss.detach().double() * labels.numel(),
                                     torch.full((), float(labels.numel()), dtype=torch.float64, device=device)])
                bar.update(1)
                if step % steps_per_epoch and stop.agreed(step):
                    _save(run, manager, trainable, optimizer, stream, step, steps_per_epoch, rank, world)
                    log.warning("%s: stopped (%s) at step %d of %d; checkpoint saved, rerun the same command to "
                                "resume", run.name, stop.reason, step, total)
                    return STOPPED
            if step % steps_per_epoch:
                raise RuntimeError(f"{run.name}: the training stream ended epoch {epoch} after "
                                   f"{step % steps_per_epoch} of {steps_per_epoch} batches")
            all_reduce_sum_no_grad(sums, group)
            loss_sum, count = sums.tolist()
            epoch += 1
            start_batch = 0
            _save(run, manager, trainable, optimizer, stream, step, steps_per_epoch, rank, world)
            stopping = step < total and stop.agreed()  # decided before the epoch is reported
            log.info("%s: epoch %d/%d train loss %.4f", run.name, epoch, run.epochs, loss_sum / max(count, 1.0))
            if writer is not None:
                writer.add_scalar(f"eval/{run.name.replace(' ', '_').replace('%', 'pct')}_train_loss",
                                  loss_sum / max(count, 1.0), epoch)
            if stopping:
                log.warning("%s: stopped (%s) after epoch %d; rerun the same command to resume", run.name,
                            stop.reason, epoch)
                return STOPPED
    finally:
        bar.close()
    return COMPLETED


@torch.no_grad()
def evaluate_classifier(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Any],
                        device: torch.device, group: ProcessGroup | None = None, progress: Any = None) -> dict[str, Any]:
    """Top-1/top-5 (%) and mean loss over batches that split the samples across ranks (sums all-reduced)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1 hits, top5 hits, loss sum, count
    for item in batches:
        images, labels = images_and_labels(item)
        labels = labels.to(device, non_blocking=True).long()
        logits = forward(images.to(device, non_blocking=True)).float()
        sums[:2] += topk_correct(logits, labels).double()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[3] += labels.numel()
        if progress is not None:
            progress.update(1)
    all_reduce_sum_no_grad(sums, group)
    top1, top5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "val_loss": loss / n, "num_val": int(sums[3].item())}


def wrap_ddp(module: nn.Module, device: torch.device, group: ProcessGroup | None = None) -> nn.Module:
    """DDP over ``group`` when distributed (gradients averaged over ranks), else the module itself."""
    if get_world_size(group) == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)
