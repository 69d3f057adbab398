"""A tiny real dataset with no download: scikit-learn's 1797 handwritten digits as WebDataset shards.

The 8×8 greyscale digits are upscaled (bicubic) to ``image_size`` RGB JPEGs and written with the same
writer and manifest as ImageNet, split into train and val manifests. The demo and many tests use it.
"""

from __future__ import annotations

import io as pyio
import json
import logging

import numpy as np
from PIL import Image

from largessl.data import io
from largessl.data.manifest import MANIFEST_NAME
from largessl.data.writer import SourceSample, tar_bytes, write_shards

log = logging.getLogger(__name__)

TRAIN_SHARDS = 7
"""Train shards: uneven and fewer than e.g. 3 ranks × 3 workers, which is what the stream must handle."""


def digit_jpegs(image_size: int = 32) -> tuple[list[bytes], np.ndarray]:
    """JPEG bytes of the 1797 digits upscaled to ``image_size`` RGB, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for img in digits.images:
        g = Image.fromarray(np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        g = g.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
        buf = pyio.BytesIO()
        g.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out, digits.target.astype(np.int64)


def write_digits_shards(dest: str, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                        progress: bool = False) -> tuple[str, str]:
    """Write train/val digits shards under ``dest`` (``dest/train``, ``dest/val``); returns both manifest URLs.

    Idempotent: when both manifests exist with the same parameters they are reused.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (got {image_size})")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    params = {"image_size": image_size, "val_fraction": val_fraction, "seed": seed, "dataset": "sklearn-digits"}
    train_url = io.join_url(io.join_url(dest, "train"), MANIFEST_NAME)
    val_url = io.join_url(io.join_url(dest, "val"), MANIFEST_NAME)
    opts = io.storage_options_for(dest)
    if all(io.exists(u, opts) for u in (train_url, val_url)):
        try:
            with io.open_url(train_url, "rb", opts) as f:
                if json.load(f).get("extra", {}).get("digits") == params:
                    return train_url, val_url
        except (OSError, ValueError):
            pass  # unreadable: rewrite below
    images, labels = digit_jpegs(image_size)
    # shuffled once (seeded) so every shard holds all classes, as a shuffled ImageNet write would
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    names = [str(i) for i in range(10)]
    for split, idx in splits.items():
        samples = [SourceSample(f"{split}{i:05d}", images[j], int(labels[j]), "jpg") for i, j in enumerate(idx)]
        total = sum(tar_bytes(s) for s in samples)
        shards = TRAIN_SHARDS if split == "train" else 2
        write_shards(samples, names, io.join_url(dest, split), shard_bytes=total // shards + 1, prefix=split,
                     workers=2, overwrite=True, storage_options=opts, progress=progress,
                     extra={"digits": params})
    log.info("digits shards at %s: %d train, %d val", dest, len(splits["train"]), len(splits["val"]))
    return train_url, val_url
