"""Frozen-backbone feature extraction, sharded over ranks, with a per-rank on-disk cache.

Each rank extracts its own share of a split (the eval stream gives rank r the samples
``[r·N/W, (r+1)·N/W)`` of the manifest order) and keeps only those rows, on its device, in
``eval.feature_dtype`` (fp16 by default: the kNN rounds features to an 11-bit grid anyway and the linear
head trains in fp32 on the upcast rows). No rank holds the whole split; the global index of a row is its
rank's offset plus its local position, i.e. its place in the rank-ordered concatenation.

The cache is one safetensors file per rank and split under
``<out>/eval/features/<split>-<manifest id>-<weights hash>-<size>px-<dtype>/rank-RRRRR-of-WWWWW.safetensors``,
written atomically; it is reused only when every rank finds its file with matching metadata (an all-reduce
decides, so ranks never disagree about extracting).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from torch.distributed import ProcessGroup

from largessl.data.batch import Batch
from largessl.distributed.collectives import (
    all_gather_counts,
    all_gather_variable,
    all_reduce_sum_no_grad,
    get_rank,
    get_world_size,
)

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_FP16_MAX = 65504.0


def images_and_labels(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a single-view :class:`Batch` or an ``(images, labels)`` pair from a plain DataLoader."""
    if isinstance(item, Batch):
        return item.views[0], item.labels
    images, labels = item[0], item[1]
    return images, torch.as_tensor(labels)


@dataclass
class FeatureShard:
    """This rank's rows of a split: global rows ``offset .. offset + len - 1`` of ``sum(counts)``."""

    features: torch.Tensor
    """(n, D) on the device, in the storage dtype."""
    labels: torch.Tensor
    """(n,) int64 on the device."""
    counts: list[int]
    """Rows of every rank, in rank order."""
    rank: int = 0

    @property
    def offset(self) -> int:
        """Global index of this rank's first row."""
        return sum(self.counts[: self.rank])

    @property
    def total(self) -> int:
        """Rows over all ranks."""
        return sum(self.counts)

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's features."""
        return self.features.numel() * self.features.element_size()

    def gathered(self, group: ProcessGroup | None = None) -> FeatureShard:
        """Every rank's rows on every rank, in global order (a collective; only for small sets)."""
        feats = all_gather_variable(self.features, group, self.counts)
        labels = all_gather_variable(self.labels, group, self.counts)
        return FeatureShard(feats, labels, [self.total], 0)


def weights_hash(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes, bytes): identifies the weights whatever their source."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _autocast(device: torch.device) -> Any:
    # bf16 forward on CUDA (the evaluated features are stored in 16 bits anyway); fp32 on CPU
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def extract_local(backbone: nn.Module, batches: Iterable[Any], device: torch.device | str,
                  dtype: torch.dtype = torch.float16, progress: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, D) in ``dtype`` and labels of this rank's batches, kept on ``device``; no collective."""
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()  # frozen protocol: BN uses its running statistics
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    peak = torch.zeros((), device=device)  # checked once at the end: no host sync per batch
    try:
        for item in batches:
            images, y = images_and_labels(item)
            with _autocast(device):
                f = backbone(images.to(device, non_blocking=True)).float().flatten(1)
            if dtype == torch.float16 and f.numel():
                peak = torch.maximum(peak, f.abs().amax())
            feats.append(f.to(dtype))
            labels.append(y.to(device=device, dtype=torch.long))
            if progress is not None:
                progress.update(1)
    finally:
        backbone.train(was_training)
    if dtype == torch.float16 and not bool(peak <= _FP16_MAX):
        raise ValueError(f"backbone features reach {float(peak):.3g}, beyond fp16's range; "
                         "set eval.feature_dtype=bf16 (or fp32)")
    dim = int(getattr(backbone, "num_features", 0)) or (feats[0].shape[1] if feats else 0)
    local_f = torch.cat(feats) if feats else torch.zeros((0, dim), dtype=dtype, device=device)
    local_y = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=device)
    return local_f, local_y


def extract_shard(backbone: nn.Module, batches: Iterable[Any], device: torch.device | str,
                  group: ProcessGroup | None = None, dtype: torch.dtype = torch.float16,
                  progress: Any = None) -> FeatureShard:
    """This rank's :class:`FeatureShard` of a split (a collective: the row counts are all-gathered).

    The stream must give each sample to exactly one rank (``build_eval_stream`` does).
    """
    device = torch.device(device)
    feats, labels = extract_local(backbone, batches, device, dtype, progress)
    counts = all_gather_counts(feats.shape[0], device, group)
    if sum(counts) == 0:
        raise ValueError("feature extraction saw no samples; check the manifest and the eval stream")
    log.info("extracted %d features of dim %d (%d on this rank, %s)", sum(counts), feats.shape[1],
             feats.shape[0], str(dtype).replace("torch.", ""))
    return FeatureShard(feats, labels, counts, get_rank(group))


def extract_features(backbone: nn.Module, batches: Iterable[Any], device: torch.device | str,
                     group: ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's features (fp32) and labels, gathered in rank order onto every rank, on CPU.

    For small sets only (the repro tables, unit tests): it holds the whole split on every rank. The
    evaluation stages use :func:`extract_shard` and keep one shard per rank.
    """
    shard = extract_shard(backbone, batches, device, group, torch.float32).gathered(group)
    return shard.features.cpu(), shard.labels.cpu()


# ---------------------------------------------------------------------------------------------------
# Cache: one safetensors file per rank and split


def cache_dir(root: str | os.PathLike[str], split: str, manifest_id: str, weights: str, image_size: int,
              dtype_name: str) -> Path:
    """The cache folder of one split for one set of weights (see the module docstring)."""
    return Path(root) / f"{split}-{manifest_id[:16]}-{weights[:16]}-{image_size}px-{dtype_name}"


def cache_file(folder: Path, rank: int, world: int) -> Path:
    """This rank's file in a cache folder."""
    return folder / f"rank-{rank:05d}-of-{world:05d}.safetensors"


def save_shard(path: str | os.PathLike[str], shard: FeatureShard, meta: dict[str, str]) -> None:
    """Write this rank's features, labels and row counts as one safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {**meta, "counts": ",".join(map(str, shard.counts)), "rank": str(shard.rank)}
    save_file({"features": shard.features.detach().cpu().contiguous(),
               "labels": shard.labels.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _read_meta(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError):
        return None


def load_shard(path: str | os.PathLike[str], device: torch.device | str) -> FeatureShard:
    """A rank's :class:`FeatureShard` from :func:`save_shard`, moved to ``device``."""
    path = Path(path)
    meta = _read_meta(path)
    tensors = load_file(str(path))
    if meta is None or set(tensors) != {"features", "labels"} or "counts" not in meta:
        raise ValueError(f"{path} is not a feature-cache shard; delete it to re-extract")
    counts = [int(c) for c in meta["counts"].split(",")]
    return FeatureShard(tensors["features"].to(device), tensors["labels"].to(device), counts, int(meta["rank"]))


def cached_or_extracted(folder: Path | None, meta: dict[str, str], extract: Any, device: torch.device,
                        group: ProcessGroup | None = None) -> FeatureShard:
    """Every rank's cached shard when all ranks have a valid one, else ``extract()`` (then cached if ``folder``).

    ``meta`` must match the stored metadata exactly (manifest, weights, image size, dtype, split).
    """
    rank, world = get_rank(group), get_world_size(group)
    path = cache_file(folder, rank, world) if folder is not None else None
    ok = 0.0
    if path is not None and path.is_file():
        stored = _read_meta(path)
        ok = 1.0 if stored is not None and all(stored.get(k) == v for k, v in meta.items()) else 0.0
    # every rank must take the same branch: extraction and loading run different collectives
    flag = all_reduce_sum_no_grad(torch.tensor([ok], dtype=torch.float32, device=device), group)
    if folder is not None and int(flag.item()) == world:
        assert path is not None
        shard = load_shard(path, device)
        if len(shard.counts) != world or shard.rank != rank:
            raise AssertionError(f"{path} belongs to rank {shard.rank} of {len(shard.counts)}")
        log.info("using cached features %s (%d rows on this rank of %d)", folder, shard.features.shape[0],
                 shard.total)
        return shard
    shard = extract()
    if path is not None:
        save_shard(path, shard, meta)
    return shard
