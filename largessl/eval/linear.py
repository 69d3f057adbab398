"""Linear evaluation of a frozen backbone: SGD with momentum, cosine schedule, top-1/top-5.

Two paths share the head, schedule and metrics:

- :func:`train_linear_probe` trains on cached features (tensors in memory; no augmentation): seconds per
  run, so a sweep over learning rates is cheap.
- :func:`train_linear_full` is the papers' protocol: every step runs the frozen backbone on freshly
  augmented images (RandomResizedCrop + flip), the head's gradients are summed over ranks, state is saved
  after every epoch and a rerun resumes from it.

Learning rates are given at batch 256 and scaled linearly with the global batch (VICReg App. C.2: SGD lr
0.02, wd 1e-6, batch 256, 100 epochs, cosine; Shuffled-DBN §4.1: lr 30, no wd).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largessl.dist.collectives import all_reduce_sum_no_grad, get_rank
from largessl.eval.features import images_and_labels

log = logging.getLogger(__name__)

STATE_FILE = "linear_state.pt"


class LinearHead(nn.Module):
    """Linear classifier, optionally behind a BatchNorm without affine that standardises the features."""

    def __init__(self, num_features: int, num_classes: int, normalize: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, affine=False) if normalize else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (B, num_features)."""
        return self.fc(self.norm(x))


def cosine_lr(base_lr: float, progress: float) -> float:
    """Cosine decay from ``base_lr`` to 0 as ``progress`` goes from 0 to 1 (a pure function of progress)."""
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(lr_at_256: float, global_batch_size: int) -> float:
    """The linear scaling rule: lr × global batch / 256."""
    return lr_at_256 * global_batch_size / 256


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k clipped to the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).float()


def _make_optimizer(head: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} labels must be in [0, {num_classes}); got [{int(labels.min())}, "
                         f"{int(labels.max())}]; is the manifest labelled?")


@torch.no_grad()
def evaluate_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean loss of ``head`` on in-memory features."""
    head.eval()
    correct = torch.zeros(2)
    loss = 0.0
    for f, y in zip(feats.split(batch_size), labels.split(batch_size)):
        logits = head(f)
        correct += topk_correct(logits, y).cpu()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
    n = max(1, feats.shape[0])
    return {"top1": 100.0 * correct[0].item() / n, "top5": 100.0 * correct[1].item() / n, "loss": loss / n}


def train_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                       val_labels: torch.Tensor, num_classes: int | None = None, epochs: int = 100,
                       lr: float = 0.02, batch_size: int = 256, weight_decay: float = 1e-6, momentum: float = 0.9,
                       normalize: bool = False, seed: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train a linear head on cached features; returns val ``top1``/``top5`` (%) and the settings used.

    Deterministic for a given ``seed``, so every rank that holds the same gathered features gets the same
    head without communicating. ``lr`` is at batch 256 and scaled by ``batch_size / 256``.
    """
    if train_feats.shape[0] != train_labels.shape[0] or val_feats.shape[0] != val_labels.shape[0]:
        raise ValueError("need exactly one label per feature row")
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError("linear probe needs non-empty train and val features")
    num_classes = int(num_classes or int(max(train_labels.max(), val_labels.max())) + 1)
    _check_labels(train_labels, num_classes, "train")
    _check_labels(val_labels, num_classes, "val")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearHead(train_feats.shape[1], num_classes, normalize).to(device)
    peak = scaled_lr(lr, batch_size)
    opt = _make_optimizer(head, peak, momentum, weight_decay)
    xf, yf = train_feats.float().to(device), train_labels.long().to(device)
    n = xf.shape[0]
    steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch, as the full protocol does
    total = epochs * steps_per_epoch
    step = 0
    last_loss = float("nan")
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(peak, step / total)
            loss = F.cross_entropy(head(xf[idx]), yf[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        last_loss = loss.item()
    val = evaluate_head(head, val_feats.float().to(device), val_labels.long().to(device))
    return {"top1": val["top1"], "top5": val["top5"], "val_loss": val["loss"], "train_loss": last_loss,
            "lr": lr, "epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay,
            "num_train": n, "num_val": int(val_feats.shape[0]), "protocol": "cached_features"}


def sweep_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                       val_labels: torch.Tensor, lrs: Sequence[float], **kwargs: Any) -> dict[str, Any]:
    """Run :func:`train_linear_probe` for each lr; the best val top-1 is returned with every run under ``sweep``."""
    if not lrs:
        raise ValueError("give at least one learning rate to sweep")
    runs = [train_linear_probe(train_feats, train_labels, val_feats, val_labels, lr=lr, **kwargs) for lr in lrs]
    best = dict(max(runs, key=lambda r: r["top1"]))
    best["sweep"] = [{"lr": r["lr"], "top1": r["top1"], "top5": r["top5"]} for r in runs]
    return best


# ---------------------------------------------------------------------------------------------------
# Full protocol: frozen backbone on augmented images, distributed, resumable


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON via a temp file + rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _sync_grads_and_count(head: nn.Module, n_local: int, device: torch.device,
                          group: ProcessGroup | None) -> int:
    """Sum gradients of summed losses over ranks and divide by the global sample count; returns that count."""
    count = all_reduce_sum_no_grad(torch.tensor([float(n_local)], device=device), group)
    n = int(count.item())
    for p in head.parameters():
        if p.grad is not None:
            all_reduce_sum_no_grad(p.grad, group).div_(max(n, 1))
    return n


@torch.no_grad()
def _features(backbone: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return backbone(images.to(device, non_blocking=True)).float().flatten(1)


@torch.no_grad()
def evaluate_stream(backbone: nn.Module, head: nn.Module, stream: Iterable[Any], device: torch.device,
                    group: ProcessGroup | None = None) -> dict[str, float]:
    """Top-1/top-5 (%) of backbone + head over a stream that splits the samples across ranks."""
    backbone.eval()
    head.eval()
    sums = torch.zeros(4, device=device)  # top1 hits, top5 hits, loss sum, count
    for item in stream:
        images, labels = images_and_labels(item)
        labels = labels.to(device).long()
        logits = head(_features(backbone, images, device))
        sums[:2] += topk_correct(logits, labels)
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
    all_reduce_sum_no_grad(sums, group)
    n = max(1.0, sums[3].item())
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n,
            "loss": sums[2].item() / n, "num_val": int(sums[3].item())}


def _exactly(make_stream: Callable[[int], Iterable[Any]], epoch: int, steps: int) -> Iterable[Any]:
    """Exactly ``steps`` batches of ``epoch``, restarting the stream if it runs short.

    Every rank must take the same number of steps or the gradient all-reduce would hang; a rank's share
    of the data can be one batch short of ``num_train_samples // batch_size`` after the rank split.
    """
    taken = 0
    while taken < steps:
        before = taken
        for item in make_stream(epoch):
            yield item
            taken += 1
            if taken == steps:
                return
        if taken == before:
            raise RuntimeError(f"the linear-eval training stream of epoch {epoch} yielded no batches")
        log.debug("linear eval: stream of epoch %d ran short after %d of %d steps; restarting it",
                  epoch, taken, steps)


def train_linear_full(backbone: nn.Module, make_train_stream: Callable[[int], Iterable[Any]],
                      make_val_stream: Callable[[], Iterable[Any]], num_classes: int, num_train_samples: int,
                      out_dir: str | os.PathLike[str], epochs: int = 100, lr: float = 0.02,
                      batch_size: int = 256, weight_decay: float = 1e-6, momentum: float = 0.9,
                      normalize: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                      group: ProcessGroup | None = None, fingerprint: dict[str, Any] | None = None,
                      writer: Any = None) -> dict[str, Any]:
    """The standard protocol on a frozen ``backbone``; resumes from ``out_dir/linear_state.pt`` when present.

    ``make_train_stream(epoch)`` yields this rank's augmented batches for ``epoch`` (per-rank batch =
    ``batch_size`` / world size); ``make_val_stream()`` yields this rank's share of the val set. Gradients
    of the summed loss are summed over ranks and divided by the global count, so W ranks × B ≡ 1 rank × W·B.
    ``fingerprint`` (e.g. the checkpoint and manifests) must match a saved state for it to be resumed.
    ``writer`` is an optional TensorBoard ``SummaryWriter`` (rank 0 only).
    """
    device = torch.device(device)
    rank = get_rank(group)
    out = Path(out_dir)
    state_path = out / STATE_FILE
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    torch.manual_seed(seed)  # same head init on every rank
    num_features = int(backbone.num_features)
    head = LinearHead(num_features, num_classes, normalize).to(device)
    peak = scaled_lr(lr, batch_size)
    opt = _make_optimizer(head, peak, momentum, weight_decay)
    settings = {"num_features": num_features, "num_classes": num_classes, "epochs": epochs, "lr": lr,
                "batch_size": batch_size, "weight_decay": weight_decay, "momentum": momentum,
                "normalize": normalize, "seed": seed, **(fingerprint or {})}
    start_epoch = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state.get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(
                f"{state_path} was written by a linear evaluation with different settings "
                f"({state.get('settings')}); delete {state_path} to start over or use another output directory"
            )
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        log.info("linear eval: resuming after epoch %d of %d from %s", start_epoch, epochs, state_path)
    steps_per_epoch = max(1, num_train_samples // batch_size)
    total = epochs * steps_per_epoch
    for epoch in range(start_epoch, epochs):
        head.train()
        loss_sum = torch.zeros(2, device=device)
        for i, item in enumerate(_exactly(make_train_stream, epoch, steps_per_epoch)):
            images, labels = images_and_labels(item)
            labels = labels.to(device).long()
            for g in opt.param_groups:
                g["lr"] = cosine_lr(peak, (epoch * steps_per_epoch + i) / total)
            feats = _features(backbone, images, device)
            loss = F.cross_entropy(head(feats), labels, reduction="sum")
            opt.zero_grad(set_to_none=False)
            loss.backward()
            _sync_grads_and_count(head, labels.numel(), device, group)
            opt.step()
            loss_sum += torch.stack([loss.detach(), torch.tensor(float(labels.numel()), device=device)])
        all_reduce_sum_no_grad(loss_sum, group)
        train_loss = loss_sum[0].item() / max(1.0, loss_sum[1].item())
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save({"head": head.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                                "settings": json.loads(json.dumps(settings))}, state_path)
            if writer is not None:
                writer.add_scalar("eval/linear_train_loss", train_loss, epoch + 1)
        log.info("linear eval: epoch %d/%d train loss %.4f", epoch + 1, epochs, train_loss)
    val = evaluate_stream(backbone, head, make_val_stream(), device, group)
    if writer is not None and rank == 0:
        writer.add_scalar("eval/linear_top1", val["top1"], epochs)
        writer.add_scalar("eval/linear_top5", val["top5"], epochs)
    return {"top1": val["top1"], "top5": val["top5"], "val_loss": val["loss"], "num_val": val["num_val"],
            "lr": lr, "epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay,
            "num_train": num_train_samples, "protocol": "full"}
