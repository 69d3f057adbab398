"""What an evaluation reads: labelled manifests, this rank's batches and transforms, progress and TensorBoard.

Shared by the kNN and linear protocols (:mod:`largessl.eval.runner`) and fine-tuning (:mod:`largessl.eval.finetune`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.distributed import ProcessGroup

from largessl.config import Config
from largessl.distributed.collectives import get_rank, get_world_size


def _per_rank(global_batch: int, world: int, what: str) -> int:
    if global_batch % world:
        raise ValueError(f"{what}={global_batch} is not divisible by the world size {world}; use a multiple of {world}")
    return global_batch // world


def read_labelled(cfg: Config, url: str) -> Any:
    """A manifest read with ``data.endpoint_url`` (S3-compatible stores)."""
    from largessl.data.io import storage_options_for
    from largessl.data.manifest import read_manifest

    return read_manifest(url, storage_options_for(url, cfg.data.endpoint_url))


def labelled_manifests(cfg: Config) -> tuple[Any, Any]:
    """The labelled (train, val) manifests of ``cfg.data``, checked to be splits of one labelled dataset."""
    if not cfg.data.train_manifest or not cfg.data.val_manifest:
        raise ValueError("evaluation needs labelled train and val manifests: pass --train and --val "
                         "(or set data.train_manifest and data.val_manifest)")
    train = read_labelled(cfg, cfg.data.train_manifest)
    val = read_labelled(cfg, cfg.data.val_manifest)
    if train.num_classes < 2:
        raise ValueError(f"{cfg.data.train_manifest} has {train.num_classes} classes; evaluation needs labels")
    if val.class_names != train.class_names:
        raise ValueError(f"train and val manifests disagree on the class names "
                         f"({train.num_classes} vs {val.num_classes} classes); use splits of the same dataset")
    return train, val


def eval_batches(cfg: Config, manifest: Any, global_batch: int, group: ProcessGroup | None = None) -> Any:
    """This rank's share of ``manifest`` with the eval transform (each sample on exactly one rank)."""
    from largessl.data.stream import build_eval_stream

    rank, world = get_rank(group), get_world_size(group)
    per_rank = _per_rank(global_batch, world, "eval.feature_batch_size")
    return build_eval_stream(cfg.data, manifest, per_rank, rank, world, transform="eval", seed=cfg.eval.seed)


def train_transform(cfg: Config) -> Any:
    """RandomResizedCrop + flip of the linear and fine-tuning protocols (``eval.linear_min_scale``)."""
    from largessl.data.augment import ViewSpec, ViewTransform, build_eval_transform

    if cfg.eval.linear_min_scale > 0:
        return ViewTransform([ViewSpec(cfg.data.image_size, scale=(cfg.eval.linear_min_scale, 1.0), jitter_p=0.0,
                                       gray_p=0.0)])
    return build_eval_transform("train_linear", cfg.data.image_size)


def train_stream(cfg: Config, manifest: Any, global_batch: int, seed: int, group: ProcessGroup | None = None) -> Any:
    """This rank's augmented training batches (equal counts on every rank, exactly resumable)."""
    from largessl.data.stream import build_train_stream

    rank, world = get_rank(group), get_world_size(group)
    per_rank = _per_rank(global_batch, world, "the global batch size")
    return build_train_stream(cfg.data, manifest, per_rank, rank, world, seed, transform=train_transform(cfg))


def show_progress(cfg: Config, group: ProcessGroup | None) -> bool:
    """Whether this rank draws progress bars (rank 0 with ``log.progress``)."""
    return bool(cfg.log.progress) and get_rank(group) == 0


def tb_writer(cfg: Config, out_dir: Path, group: ProcessGroup | None = None) -> Any:
    """A TensorBoard writer under ``out_dir/tb`` on rank 0 with ``log.tensorboard``, else None."""
    if not cfg.log.tensorboard or get_rank(group) != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"))
