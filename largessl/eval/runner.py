"""Evaluate a frozen backbone per the config: linear probe and kNN, results as JSON and TensorBoard.

Shared by ``largessl eval linear|knn`` and the ``linear``/``knn`` stages of a pretraining run. Every rank
calls these functions (each rank reads its share of the data); only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.config import Config
from largessl.dist.collectives import barrier, get_rank, get_world_size
from largessl.eval.features import extract_features, load_feature_cache, save_feature_cache
from largessl.eval.knn import knn_accuracy
from largessl.eval.linear import sweep_linear_probe, train_linear_full, write_json_atomic
from largessl.hub.card import EVAL_DIR, KNN_JSON, LINEAR_JSON

log = logging.getLogger(__name__)


@dataclass
class EvalSource:
    """The backbone under evaluation and where it came from (recorded in the results)."""

    backbone: nn.Module
    description: dict[str, Any] = field(default_factory=dict)
    """E.g. {"checkpoint": ".../step-00000100", "step": 100} or {"hub": "s3://...", "model": "bt@v1"}."""

    @property
    def cache_key(self) -> str:
        """Identifies the weights for feature-cache file names."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:12]


def _per_rank(global_batch: int, world: int, what: str) -> int:
    if global_batch % world:
        raise ValueError(f"{what}={global_batch} is not divisible by the world size {world}; use a multiple of {world}")
    return global_batch // world


def _manifests(cfg: Config) -> tuple[Any, Any]:
    from largessl.data.io import storage_options_for
    from largessl.data.manifest import read_manifest

    if not cfg.data.train_manifest or not cfg.data.val_manifest:
        raise ValueError("evaluation needs labelled train and val manifests: pass --train and --val "
                         "(or set data.train_manifest and data.val_manifest)")
    train, val = (read_manifest(url, storage_options_for(url, cfg.data.endpoint_url))
                  for url in (cfg.data.train_manifest, cfg.data.val_manifest))
    if train.num_classes < 2:
        raise ValueError(f"{cfg.data.train_manifest} has {train.num_classes} classes; evaluation needs labels")
    if val.class_names != train.class_names:
        raise ValueError(f"train and val manifests disagree on the class names "
                         f"({train.num_classes} vs {val.num_classes} classes); use splits of the same dataset")
    return train, val


def _stream(cfg: Config, manifest: Any, global_batch: int, transform: str, epoch: int = 0) -> Iterable[Any]:
    from largessl.data.stream import build_eval_stream

    rank, world = get_rank(), get_world_size()
    per_rank = _per_rank(global_batch, world, "eval batch size")
    stream = build_eval_stream(cfg.data, manifest, per_rank, rank, world, transform=transform, seed=cfg.eval.seed)
    return stream.iterate(epoch)


def cached_features(cfg: Config, source: EvalSource, manifest: Any, split: str, out_dir: Path,
                    device: torch.device, group: ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-transform features of ``manifest``: read from the cache when enabled and present, else extracted."""
    path = out_dir / EVAL_DIR / "features" / f"{split}-{manifest.id[:12]}-{source.cache_key}.safetensors"
    if cfg.eval.cache_features and path.is_file():
        log.info("using cached %s features %s", split, path)
        return load_feature_cache(path)
    stream = _stream(cfg, manifest, cfg.eval.feature_batch_size, "eval")
    feats, labels = extract_features(source.backbone, stream, device, group)
    if cfg.eval.cache_features and get_rank(group) == 0:
        save_feature_cache(path, feats, labels, {"source": str(source.description), "split": split})
    return feats, labels


def _writer(cfg: Config, out_dir: Path) -> Any:
    if not cfg.log.tensorboard or get_rank() != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"))


def evaluate_knn(cfg: Config, source: EvalSource, out_dir: str | os.PathLike[str],
                 device: torch.device, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Weighted kNN top-1 for each ``eval.knn_k``; writes ``out_dir/eval/knn.json`` (rank 0)."""
    out = Path(out_dir)
    train_m, val_m = _manifests(cfg)
    tf, tl = cached_features(cfg, source, train_m, "train", out, device, group)
    vf, vl = cached_features(cfg, source, val_m, "val", out, device, group)
    acc = knn_accuracy(tf, tl, vf, vl, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                       num_classes=train_m.num_classes)
    result = {"top1": {str(k): v for k, v in acc.items()}, "k": list(cfg.eval.knn_k),
              "temperature": cfg.eval.knn_temperature, "num_train": int(tf.shape[0]), "num_val": int(vf.shape[0]),
              "train_manifest": train_m.url, "val_manifest": val_m.url, "source": source.description}
    if get_rank(group) == 0:
        write_json_atomic(out / EVAL_DIR / KNN_JSON, result)
        writer = _writer(cfg, out)
        if writer is not None:
            for k, v in acc.items():
                writer.add_scalar(f"eval/knn_top1_k{k}", v, 0)
            writer.close()
    log.info("kNN top-1: %s", ", ".join(f"k={k}: {v:.2f}%" for k, v in acc.items()))
    barrier(group)
    return result


def evaluate_linear(cfg: Config, source: EvalSource, out_dir: str | os.PathLike[str],
                    device: torch.device, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Linear probe per ``cfg.eval`` (cached features or the full augmented protocol); writes ``eval/linear.json``."""
    out = Path(out_dir)
    train_m, val_m = _manifests(cfg)
    e = cfg.eval
    writer = _writer(cfg, out)
    try:
        if e.cache_features:
            tf, tl = cached_features(cfg, source, train_m, "train", out, device, group)
            vf, vl = cached_features(cfg, source, val_m, "val", out, device, group)
            # every rank holds the same gathered features and seed, so every rank trains the same head
            result = sweep_linear_probe(tf, tl, vf, vl, lrs=[e.linear_lr, *e.linear_lr_sweep],
                                        num_classes=train_m.num_classes, epochs=e.linear_epochs,
                                        batch_size=e.linear_batch_size, weight_decay=e.linear_weight_decay,
                                        momentum=e.linear_momentum, normalize=e.linear_normalize, seed=e.seed,
                                        device=device)
            if writer is not None:
                writer.add_scalar("eval/linear_top1", result["top1"], e.linear_epochs)
                writer.add_scalar("eval/linear_top5", result["top5"], e.linear_epochs)
        else:
            _per_rank(e.linear_batch_size, get_world_size(group), "eval.linear_batch_size")
            result = train_linear_full(
                source.backbone,
                lambda epoch: _stream(cfg, train_m, e.linear_batch_size, "train_linear", epoch),
                lambda: _stream(cfg, val_m, e.feature_batch_size, "eval"),
                num_classes=train_m.num_classes, num_train_samples=train_m.num_samples,
                out_dir=out / EVAL_DIR, epochs=e.linear_epochs, lr=e.linear_lr, batch_size=e.linear_batch_size,
                weight_decay=e.linear_weight_decay, momentum=e.linear_momentum, normalize=e.linear_normalize,
                seed=e.seed, device=device, group=group,
                fingerprint={"source": source.description, "train": train_m.id, "val": val_m.id}, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    result.update(train_manifest=train_m.url, val_manifest=val_m.url, source=source.description)
    if get_rank(group) == 0:
        write_json_atomic(out / EVAL_DIR / LINEAR_JSON, result)
    log.info("linear probe: top-1 %.2f%%, top-5 %.2f%% (%s)", result["top1"], result["top5"], result["protocol"])
    barrier(group)
    return result
