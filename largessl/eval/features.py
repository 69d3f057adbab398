"""Frozen-backbone feature extraction, gathered over ranks, with an optional on-disk cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed import ProcessGroup

from largessl.data.batch import Batch
from largessl.dist.collectives import all_gather_no_grad, get_world_size

log = logging.getLogger(__name__)


def images_and_labels(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a single-view :class:`Batch` or an ``(images, labels)`` pair from a plain DataLoader."""
    if isinstance(item, Batch):
        return item.views[0], item.labels
    images, labels = item[0], item[1]
    return images, torch.as_tensor(labels)


def gather_variable(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` over ranks in rank order when ranks hold different numbers of rows."""
    if get_world_size(group) == 1:
        return x
    # all_gather needs equal shapes: share the row counts, pad to the largest, trim after.
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = all_gather_no_grad(n, group).tolist()
    biggest = max(counts)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = all_gather_no_grad(padded, group).split(biggest)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@torch.no_grad()
def extract_features(backbone: nn.Module, stream_or_loader: Iterable[Any], device: torch.device | str,
                     group: ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of every sample of ``stream_or_loader``, gathered over ranks, on CPU.

    The stream must give each sample to exactly one rank (``build_eval_stream`` does); the result is the
    concatenation of every rank's samples in rank order, identical on all ranks. Features are fp32.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()  # frozen protocol: BN uses its running statistics
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for item in stream_or_loader:
            images, y = images_and_labels(item)
            feats.append(backbone(images.to(device, non_blocking=True)).float().flatten(1))
            labels.append(y.to(device=device, dtype=torch.long))
    finally:
        backbone.train(was_training)
    dim = int(getattr(backbone, "num_features", 0)) or (feats[0].shape[1] if feats else 0)
    local_f = torch.cat(feats) if feats else torch.zeros((0, dim), device=device)
    local_y = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=device)
    all_f = gather_variable(local_f, group).cpu()
    all_y = gather_variable(local_y, group).cpu()
    if all_f.shape[0] == 0:
        raise ValueError("feature extraction saw no samples; check the manifest and the eval stream")
    log.info("extracted %d features of dim %d", all_f.shape[0], all_f.shape[1])
    return all_f, all_y


def save_feature_cache(path: str | os.PathLike[str], feats: torch.Tensor, labels: torch.Tensor,
                       meta: dict[str, str] | None = None) -> None:
    """Write features and labels as one safetensors file, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata=meta or {})
    os.replace(tmp, path)


def load_feature_cache(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels written by :func:`save_feature_cache`."""
    tensors = load_file(str(path))
    if set(tensors) != {"features", "labels"}:
        raise ValueError(f"{path} is not a feature cache (tensors {sorted(tensors)}); delete it to re-extract")
    return tensors["features"], tensors["labels"]
