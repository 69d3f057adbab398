"""Evaluate a backbone per the config: kNN, linear probe, fine-tuning; results as JSON and TensorBoard.

Shared by ``largessl eval linear|knn|finetune`` and the stages of a pretraining run. Every rank calls these
functions (each rank reads its share of the data and keeps its share of the features); only rank 0
writes result files. A stop request (SIGTERM, SIGUSR1/2) makes them return ``{"stopped": True, ...}``
after saving whatever can be resumed; the CLI exits 75 and the rerun continues.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed import ProcessGroup

from largessl.config import Config
from largessl.distributed.collectives import all_reduce_sum_no_grad, barrier, get_rank, get_world_size
from largessl.eval.features import (
    DTYPES,
    FeatureShard,
    cache_dir,
    cached_or_extracted,
    extract_shard,
)
from largessl.eval.finetune import finetune_all
from largessl.eval.inputs import eval_batches, labelled_manifests, show_progress, tb_writer, train_stream
from largessl.eval.knn import KnnShard, chunk_working_set_bytes, knn_predict, knn_rounds, prepare_features
from largessl.eval.linear import (
    linear_world_check,
    sweep_linear_probe,
    train_linear_full,
)
from largessl.eval.source import EvalSource
from largessl.eval.supervised import StopCheck
from largessl.run.durable import write_json_atomic
from largessl.run.layout import EVAL_DIR, KNN_JSON, LINEAR_JSON
from largessl.run.progress import ProgressBar

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
LINEAR_STATE_DIR = "linear"
PREPARE_ROWS = 65536
"""Rows normalised per step when features are prepared for the kNN (bounds the float64 temporaries)."""


def features(cfg: Config, source: EvalSource, manifest: Any, split: str, out_dir: Path, device: torch.device,
             group: ProcessGroup | None = None) -> FeatureShard:
    """This rank's eval-transform features of ``manifest``: from the per-rank cache when enabled, else extracted."""
    e = cfg.eval
    dtype = DTYPES[e.feature_dtype]
    stream = eval_batches(cfg, manifest, e.feature_batch_size, group)

    def extract() -> FeatureShard:
        bar = ProgressBar(stream.batches_per_epoch, 0, show_progress(cfg, group), desc=f"features ({split})")
        try:
            return extract_shard(source.backbone, stream.iterate(0), device, group, dtype, bar)
        finally:
            bar.close()

    folder = None
    if e.cache_features:
        folder = cache_dir(out_dir / EVAL_DIR / FEATURES_DIR, split, manifest.id, source.weights, cfg.data.image_size,
                           e.feature_dtype)
    meta = {"split": split, "manifest_id": manifest.id, "weights": source.weights,
            "image_size": str(cfg.data.image_size), "dtype": e.feature_dtype}
    return cached_or_extracted(folder, meta, extract, device, group)


def _stopped(stop: StopCheck, what: str) -> dict[str, Any]:
    log.warning("%s: stopped (%s); rerun the same command to continue", what, stop.reason)
    return {"stopped": True, "reason": stop.reason}


# ---------------------------------------------------------------------------------------------------
# kNN


def prepared(x: torch.Tensor) -> torch.Tensor:
    """:func:`~largessl.eval.knn.prepare_features` in blocks of rows (bounded float64 temporaries; row-wise, so exact)."""
    out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    for s in range(0, x.shape[0], PREPARE_ROWS):
        out[s:s + PREPARE_ROWS] = prepare_features(x[s:s + PREPARE_ROWS])
    return out


def knn_shard(train: FeatureShard, gather_max_mb: float, group: ProcessGroup | None = None) -> tuple[KnnShard, bool]:
    """(prepared train rows for the kNN, sharded?) — gathered on every rank when small enough.

    Gathering costs one all-gather and N·D·2 bytes per rank; it replaces the per-chunk broadcast and
    candidate all-gather of the sharded protocol. It is the cheaper choice while the whole prepared set
    fits in ``gather_max_mb`` (64 MB by default: e.g. CIFAR-scale sets, not ImageNet's 5.2 GB).
    """
    rows = prepared(train.features)
    world = get_world_size(group)
    if world > 1 and train.total * train.features.shape[1] * 2 <= gather_max_mb * 1e6:
        shard = FeatureShard(rows, train.labels, train.counts, train.rank).gathered(group)
        return KnnShard(shard.features, shard.labels, 0, shard.total), False
    return KnnShard(rows, train.labels, train.offset, train.total), world > 1


def knn_on_shards(train: KnnShard, sharded: bool, val: FeatureShard, ks: list[int], temperature: float,
                  num_classes: int, group: ProcessGroup | None = None, chunk_size: int = 512, block: int = 32768,
                  progress: bool = False) -> dict[str, Any]:
    """Weighted kNN top-1 (%) per k of every rank's val rows against the train rows (a collective)."""
    queries = prepared(val.features)
    bar = ProgressBar(knn_rounds(val.counts, chunk_size, sharded, val.rank), 0, progress, desc="kNN")
    try:
        preds = knn_predict(queries, train, ks, temperature, num_classes, chunk_size, block, group, sharded, bar)
    finally:
        bar.close()
    correct = torch.stack([(preds[k] == val.labels).sum() for k in ks]).to(torch.float64)
    all_reduce_sum_no_grad(correct, group)
    world = get_world_size(group) if sharded else 1
    # the bound with the sizes really used: a chunk never exceeds the largest query block, a tile the shard
    working = chunk_working_set_bytes(train.features.shape[1], min(chunk_size, max(val.counts)),
                                      min(block, max(1, train.features.shape[0])), min(max(ks), train.total),
                                      world, num_classes)
    return {"top1": {str(k): 100.0 * c / val.total for k, c in zip(ks, correct.tolist())}, "sharded": sharded,
            "memory_bound_bytes": train.nbytes + working}


def evaluate_knn(cfg: Config, source: EvalSource, out_dir: str | os.PathLike[str],
                 device: torch.device, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Weighted kNN top-1 for each ``eval.knn_k``; writes ``out_dir/eval/knn.json`` (rank 0)."""
    out = Path(out_dir)
    train_m, val_m = labelled_manifests(cfg)
    e = cfg.eval
    with StopCheck(device, group) as stop:
        train = features(cfg, source, train_m, "train", out, device, group)
        if stop.agreed():
            return _stopped(stop, "kNN")
        shard, sharded = knn_shard(train, e.knn_gather_max_mb, group)
        del train  # the raw rows are not needed any more: the rank holds only its prepared shard
        val = features(cfg, source, val_m, "val", out, device, group)
        if stop.agreed():
            return _stopped(stop, "kNN")
        res = knn_on_shards(shard, sharded, val, list(e.knn_k), e.knn_temperature, train_m.num_classes, group,
                            e.knn_chunk_size, e.knn_train_block, show_progress(cfg, group))
    result = {**res, "k": list(e.knn_k), "temperature": e.knn_temperature, "num_train": shard.total,
              "num_val": val.total, "feature_dtype": e.feature_dtype, "world_size": get_world_size(group),
              "protocol": "knn", "train_manifest": train_m.url, "val_manifest": val_m.url,
              "source": source.description}
    if get_rank(group) == 0:
        write_json_atomic(out / EVAL_DIR / KNN_JSON, result)
        writer = tb_writer(cfg, out, group)
        if writer is not None:
            for k, v in res["top1"].items():
                writer.add_scalar(f"eval/knn_top1_k{k}", v, 0)
            writer.close()
    log.info("kNN top-1: %s", ", ".join(f"k={k}: {v:.2f}%" for k, v in res["top1"].items()))
    barrier(group)
    return result


# ---------------------------------------------------------------------------------------------------
# Linear


def evaluate_linear(cfg: Config, source: EvalSource, out_dir: str | os.PathLike[str],
                    device: torch.device, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Linear probe per ``cfg.eval`` (cached features or the full augmented protocol); writes ``eval/linear.json``."""
    out = Path(out_dir)
    train_m, val_m = labelled_manifests(cfg)
    e = cfg.eval
    writer = tb_writer(cfg, out, group)
    try:
        with StopCheck(device, group) as stop:
            if e.cache_features:
                train = features(cfg, source, train_m, "train", out, device, group)
                if stop.agreed():
                    return _stopped(stop, "linear (cached features)")
                val = features(cfg, source, val_m, "val", out, device, group)
                if stop.agreed():
                    return _stopped(stop, "linear (cached features)")
                result = sweep_linear_probe(train, val, lrs=[e.linear_lr, *e.linear_lr_sweep],
                                            num_classes=train_m.num_classes, epochs=e.linear_epochs,
                                            batch_size=e.linear_batch_size, weight_decay=e.linear_weight_decay,
                                            momentum=e.linear_momentum, normalize=e.linear_normalize, seed=e.seed,
                                            device=device, group=group, progress=show_progress(cfg, group))
                if writer is not None:
                    writer.add_scalar("eval/linear_top1", result["top1"], e.linear_epochs)
                    writer.add_scalar("eval/linear_top5", result["top5"], e.linear_epochs)
            else:
                linear_world_check(e.linear_batch_size, group)
                stream = train_stream(cfg, train_m, e.linear_batch_size, e.seed, group)
                val_stream = eval_batches(cfg, val_m, e.feature_batch_size, group)
                fingerprint = {"weights": source.weights, "train": train_m.id, "val": val_m.id,
                               "image_size": cfg.data.image_size, "min_scale": e.linear_min_scale,
                               "world_size": get_world_size(group)}
                result = train_linear_full(
                    source.backbone, stream, val_stream, num_classes=train_m.num_classes,
                    checkpoint_dir=out / EVAL_DIR / LINEAR_STATE_DIR, epochs=e.linear_epochs, lr=e.linear_lr,
                    batch_size=e.linear_batch_size, weight_decay=e.linear_weight_decay, momentum=e.linear_momentum,
                    normalize=e.linear_normalize, seed=e.seed, device=device, group=group, fingerprint=fingerprint,
                    writer=writer, stop=stop, progress=show_progress(cfg, group))
                if result.get("stopped"):
                    return result
    finally:
        if writer is not None:
            writer.close()
    result.update(world_size=get_world_size(group), train_manifest=train_m.url, val_manifest=val_m.url,
                  source=source.description)
    if get_rank(group) == 0:
        write_json_atomic(out / EVAL_DIR / LINEAR_JSON, result)
    log.info("linear probe: top-1 %.2f%%, top-5 %.2f%% (%s)", result["top1"], result["top5"], result["protocol"])
    barrier(group)
    return result


def evaluate_finetune(cfg: Config, source: EvalSource, out_dir: str | os.PathLike[str],
                      device: torch.device, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Fine-tune on each ``eval.finetune.percents`` label subset; writes ``eval/finetune_<p>pct.json``."""

    return finetune_all(cfg, source, Path(out_dir), device, group)
