"""Linear evaluation of a frozen backbone: SGD with momentum, cosine schedule, top-1/top-5.

Two paths share the head, schedule and metrics, and both are data-parallel over the ranks:

- :func:`train_linear_probe` trains on cached features (each rank holds its own shard): seconds per run,
  so a sweep over learning rates is cheap. Each epoch draws one permutation of the global row indices
  (the same on every rank); the global batch is a slice of it, and each rank contributes the members it
  holds. The batches are therefore the same on any number of ranks, and W ranks give the 1-rank head up
  to float summation order.
- :func:`train_linear_full` is the papers' protocol: every step runs the frozen backbone on freshly
  augmented images (RandomResizedCrop + flip), gradients are averaged over ranks, and it checkpoints and
  requeues like pretraining (see :mod:`largessl.eval.supervised`).

Learning rates are given at batch 256 and scaled linearly with the global batch (Barlow Twins: lr 0.3,
wd 1e-6; VICReg App. C.2: lr 0.02, wd 1e-6; batch 256, 100 epochs, cosine; Shuffled-DBN §4.1: lr 30,
no wd). ``normalize`` puts a BatchNorm without affine in front of the head whose statistics are over the
global batch of all ranks (:class:`~largessl.nn.batchnorm.GlobalBatchNorm1d`), so it does not change with
the world size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum_no_grad, get_world_size
from largessl.eval.features import FeatureShard
from largessl.eval.supervised import (
    COMPLETED,
    STOPPED,
    StopCheck,
    SupervisedRun,
    cosine_lr,
    evaluate_classifier,
    fit_supervised,
    topk_correct,
    wrap_ddp,
)
from largessl.nn.batchnorm import GlobalBatchNorm1d
from largessl.run.progress import ProgressBar

log = logging.getLogger(__name__)

__all__ = ["LinearHead", "cosine_lr", "scaled_lr", "topk_correct", "train_linear_probe", "sweep_linear_probe",
           "train_linear_full", "STOPPED", "COMPLETED"]


class LinearHead(nn.Module):
    """Linear classifier, optionally behind a global BatchNorm without affine that standardises the features."""

    def __init__(self, num_features: int, num_classes: int, normalize: bool = False,
                 group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.norm = GlobalBatchNorm1d(num_features, affine=False, group=group) if normalize else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (B, num_features)."""
        return self.fc(self.norm(x))


def scaled_lr(lr_at_256: float, global_batch_size: int) -> float:
    """The linear scaling rule: lr × global batch / 256."""
    return lr_at_256 * global_batch_size / 256


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} labels must be in [0, {num_classes}); got [{int(labels.min())}, "
                         f"{int(labels.max())}]; is the manifest labelled?")


# ---------------------------------------------------------------------------------------------------
# Cached features: sharded, data-parallel


@torch.no_grad()
def _evaluate_shard(head: nn.Module, shard: FeatureShard, device: torch.device, group: ProcessGroup | None,
                    batch_size: int = 1024) -> dict[str, Any]:
    head.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for f, y in zip(shard.features.split(batch_size), shard.labels.split(batch_size)):
        logits = head(f.float())
        sums[:2] += topk_correct(logits, y).double()
        sums[2] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[3] += y.numel()
    all_reduce_sum_no_grad(sums, group)
    top1, top5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "val_loss": loss / n, "num_val": int(n)}


def train_linear_probe(train: FeatureShard, val: FeatureShard, num_classes: int, epochs: int = 100,
                       lr: float = 0.02, batch_size: int = 256, weight_decay: float = 1e-6, momentum: float = 0.9,
                       normalize: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                       group: ProcessGroup | None = None, progress: bool = False) -> dict[str, Any]:
    """Train a linear head on this rank's cached feature shard, data-parallel; val ``top1``/``top5`` (%).

    A collective when distributed (every rank calls it with its shard). ``lr`` is at batch 256 and scaled
    by ``batch_size / 256``; the ragged last batch of an epoch is dropped.
    """
    device = torch.device(device)
    n = train.total
    if train.features.shape[0] != train.labels.shape[0] or val.features.shape[0] != val.labels.shape[0]:
        raise ValueError("need exactly one label per feature row")
    if n == 0 or val.total == 0:
        raise ValueError("linear probe needs non-empty train and val features")
    if batch_size > n:
        raise ValueError(f"eval.linear_batch_size={batch_size} exceeds the {n} training samples; lower it")
    _check_labels(train.labels, num_classes, "train")
    _check_labels(val.labels, num_classes, "val")
    torch.manual_seed(seed)  # same head on every rank
    head = LinearHead(train.features.shape[1], num_classes, normalize, group).to(device)
    peak = scaled_lr(lr, batch_size)
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    lo, hi = train.offset, train.offset + train.features.shape[0]
    bar = ProgressBar(total, 0, enabled=progress, desc=f"linear (cached, lr {lr:g})")
    step = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for epoch in range(epochs):
            head.train()
            # the same permutation on every rank (CPU generator); each rank keeps the rows it holds
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(device)
            loss_sum.zero_()
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                mine = idx[(idx >= lo) & (idx < hi)] - lo
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(peak, step / total)
                logits = head(train.features[mine].float())
                # summed over this rank's members; gradients summed over ranks and divided by the real batch
                loss = F.cross_entropy(logits, train.labels[mine], reduction="sum")
                opt.zero_grad(set_to_none=False)
                loss.backward()
                for p in head.parameters():
                    if p.grad is not None:
                        all_reduce_sum_no_grad(p.grad, group).div_(batch_size)
                opt.step()
                loss_sum += loss.detach().double()
                step += 1
                bar.update(1)
    finally:
        bar.close()
    all_reduce_sum_no_grad(loss_sum, group)
    val_metrics = _evaluate_shard(head, val, device, group)
    return {**val_metrics, "train_loss": float(loss_sum.item()) / max(1, steps_per_epoch * batch_size),
            "lr": lr, "epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay, "num_train": n,
            "normalize": normalize, "protocol": "cached_features"}


def sweep_linear_probe(train: FeatureShard, val: FeatureShard, lrs: Sequence[float], **kwargs: Any) -> dict[str, Any]:
    """Run :func:`train_linear_probe` for each lr; the best val top-1 is returned with every run under ``sweep``."""
    if not lrs:
        raise ValueError("give at least one learning rate to sweep")
    runs = [train_linear_probe(train, val, lr=lr, **kwargs) for lr in lrs]
    best = dict(max(runs, key=lambda r: r["top1"]))
    best["sweep"] = [{"lr": r["lr"], "top1": r["top1"], "top5": r["top5"]} for r in runs]
    return best


# ---------------------------------------------------------------------------------------------------
# Full protocol: frozen backbone on augmented images, distributed, requeueable


class _FrozenThenHead(nn.Module):
    """Frozen backbone (eval mode, no grad, bf16 autocast on CUDA) followed by the trainable head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type=images.device.type, dtype=torch.bfloat16,
                                             enabled=images.device.type == "cuda"):
            feats = self.backbone(images).float().flatten(1)
        return self.head(feats)


def train_linear_full(backbone: nn.Module, train_stream: Any, val_stream: Any, num_classes: int,
                      checkpoint_dir: str | os.PathLike[str], epochs: int = 100, lr: float = 0.02,
                      batch_size: int = 256, weight_decay: float = 1e-6, momentum: float = 0.9,
                      normalize: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                      group: ProcessGroup | None = None, fingerprint: dict[str, Any] | None = None,
                      writer: Any = None, stop: StopCheck | None = None, progress: bool = False) -> dict[str, Any]:
    """The standard protocol on a frozen ``backbone``; resumes from ``checkpoint_dir`` when it holds a checkpoint.

    ``train_stream`` is this rank's :class:`~largessl.data.stream.TrainStream` of augmented single views (per-rank
    batch = ``batch_size`` / world size); ``val_stream`` (``iterate(0)``, ``batches_per_epoch``) gives this
    rank's share of the val set.
    ``fingerprint`` (e.g. the weights and manifests) must match a saved state for it to be resumed. Returns
    the val metrics, or ``{"stopped": True}`` after a stop request was saved (rerun to resume).
    """
    device = torch.device(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    torch.manual_seed(seed)  # same head init on every rank
    num_features = int(backbone.num_features)
    head = LinearHead(num_features, num_classes, normalize, group).to(device)
    model = _FrozenThenHead(backbone, wrap_ddp(head, device, group))
    peak = scaled_lr(lr, batch_size)
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=momentum, weight_decay=weight_decay)
    settings = {"num_features": num_features, "num_classes": num_classes, "epochs": epochs, "lr": lr,
                "batch_size": batch_size, "weight_decay": weight_decay, "momentum": momentum,
                "normalize": normalize, "seed": seed, **(fingerprint or {})}
    run = SupervisedRun("linear", str(checkpoint_dir), settings, epochs, [peak], progress)

    def modes() -> None:
        backbone.eval()  # frozen: BN uses its running statistics, as at feature-extraction time
        head.train()

    own_stop = stop is None
    stop = stop or StopCheck(device, group)
    if own_stop:
        stop.__enter__()
    try:
        status = fit_supervised(run, head, model, opt, train_stream, device, stop, group, writer, modes)
    finally:
        if own_stop:
            stop.__exit__()
    if status == STOPPED:
        return {"stopped": True, "reason": stop.reason}
    backbone.eval()
    head.eval()
    bar = ProgressBar(int(val_stream.batches_per_epoch), 0, progress, desc="linear (val)")
    try:
        val = evaluate_classifier(model, val_stream.iterate(0), device, group, bar)
    finally:
        bar.close()
    if writer is not None:
        writer.add_scalar("eval/linear_top1", val["top1"], epochs)
        writer.add_scalar("eval/linear_top5", val["top5"], epochs)
    return {**val, "lr": lr, "epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay,
            "momentum": momentum, "normalize": normalize,
            "num_train": int(train_stream.batches_per_epoch) * batch_size, "protocol": "full"}


def linear_world_check(batch_size: int, group: ProcessGroup | None = None) -> int:
    """Per-rank batch of ``batch_size`` (must divide by the world size)."""
    world = get_world_size(group)
    if batch_size % world:
        raise ValueError(f"eval.linear_batch_size={batch_size} is not divisible by the world size {world}; "
                         f"use a multiple of {world}")
    return batch_size // world
