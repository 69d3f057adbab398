"""Data pipeline configuration."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "gpu")


@dataclass
class DataConfig:
    """Where shards come from and how views are made."""

    train_manifest: str = ""
    """Dataset manifest (JSON written by `largessl shards write`): path or fsspec URL (file://, s3://, gs://, http://)."""
    val_manifest: str = ""
    """Manifest of the labelled validation split (used by evaluation stages and the online probe's report)."""
    augment: str = "barlow_twins"
    """Augmentation recipe: barlow_twins, vicreg, decorrelation, simsiam, small, multicrop, none."""
    image_size: int = 224
    """Side of the square crops fed to the backbone."""
    num_views: int = 2
    """Views per image (the multiview method uses M > 2)."""
    min_scale: float = 0.0
    """RandomResizedCrop lower scale bound; 0 = the recipe's default (0.08, or 0.2 for decorrelation)."""
    num_workers: int = 4
    """DataLoader workers per rank."""
    shuffle_buffer: int = 2000
    """Samples (undecoded bytes) held in the shuffle buffer of each worker."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    pin_memory: bool = True
    """Page-locked host buffers for faster, non-blocking host-to-GPU copies (CUDA only)."""
    endpoint_url: str = ""
    """S3 endpoint (e.g. http://127.0.0.1:8333); empty = AWS_ENDPOINT_URL from the environment."""
    retries: int = 3
    """Attempts to open/read a shard before it is skipped (exponential backoff)."""
    retry_backoff_s: float = 1.0
    """Delay before the first retry of a failed shard read; doubled after each further failure."""
    decode: str = "cpu"
    """Where training images are decoded and augmented: ``cpu`` (in the DataLoader workers, one sample at a
    time) or ``gpu`` (workers only read the bytes; the main process decodes each batch with nvJPEG and
    augments it with batched tensor ops on the training device; on a CPU device the same code runs on CPU
    tensors). Same augmentation parameters, order and exact resume in both (docs/data.md)."""
    gpu_decode: bool = False
    """Deprecated alias: true means ``data.decode=gpu``."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if self.image_size < 8:
            raise ValueError(f"data.image_size must be >= 8 (got {self.image_size})")
        if self.num_views < 2:
            raise ValueError(f"data.num_views must be >= 2 (got {self.num_views}); SSL needs at least two views")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if not 0.0 <= self.min_scale < 1.0:
            raise ValueError(f"data.min_scale must be in [0, 1) (got {self.min_scale})")
        if self.retries < 1:
            raise ValueError("data.retries must be >= 1")
        if self.retry_backoff_s < 0:
            raise ValueError(f"data.retry_backoff_s must be >= 0 (got {self.retry_backoff_s})")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (got {self.shuffle_buffer}); 1 disables shuffling")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"data.decode={self.decode!r} is unknown; allowed: {', '.join(DECODE_MODES)}")
        if self.gpu_decode:
            log.warning("data.gpu_decode is deprecated; use data.decode=gpu (taken as data.decode=gpu now)")
            self.decode = "gpu"
            self.gpu_decode = False
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1 (got {self.prefetch_factor})")
        from largessl.data.augment import RECIPES

        if self.augment not in RECIPES:
            raise ValueError(f"data.augment={self.augment!r} is unknown; allowed: {', '.join(RECIPES)}")
