"""Tiny real datasets with no download, as WebDataset shards with the same writer and manifest as ImageNet.

- ``digits``: scikit-learn's 1797 handwritten digits, upscaled (bicubic) to ``image_size`` RGB JPEGs. At the
  ceiling for representation learning: random convolutional features already separate them.
- ``photodigits``: the same glyphs blended with patches of scikit-image's bundled photographs (MNIST-M's
  construction), split by glyph *and* by photograph; see :mod:`largessl.data.photodigits` and docs/data.md.

Both are split into train and val manifests; the demo, ``largessl repro`` and many tests use them.
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

CLASS_NAMES = [str(i) for i in range(10)]


def digit_glyphs(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as float32 glyphs in [0, 1], upscaled (bicubic) to ``image_size``², and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = np.empty((len(digits.images), image_size, image_size), np.float32)
    for i, img in enumerate(digits.images):
        g = Image.fromarray(np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        out[i] = np.asarray(g.resize((image_size, image_size), Image.Resampling.BICUBIC), np.float32) / 255.0
    return out, digits.target.astype(np.int64)


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    """One HxWx3 uint8 image as quality-95 JPEG bytes."""
    buf = pyio.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def digit_jpegs(image_size: int = 32) -> tuple[list[bytes], np.ndarray]:
    """JPEG bytes of the 1797 digits upscaled to ``image_size`` RGB, and their labels."""
    glyphs, labels = digit_glyphs(image_size)
    grey = np.round(glyphs * 255.0).astype(np.uint8)
    return [jpeg_bytes(np.repeat(g[:, :, None], 3, axis=2)) for g in grey], labels


def reuse_manifests(dest: str, key: str, params: dict) -> tuple[str, str] | None:
    """The train/val manifest URLs under ``dest`` when both exist and were written with ``params`` (under
    ``extra[key]``); None when they must be (re)written."""
    train_url = io.join_url(io.join_url(dest, "train"), MANIFEST_NAME)
    val_url = io.join_url(io.join_url(dest, "val"), MANIFEST_NAME)
    opts = io.storage_options_for(dest)
    if all(io.exists(u, opts) for u in (train_url, val_url)):
        try:
            with io.open_url(train_url, "rb", opts) as f:
                if json.load(f).get("extra", {}).get(key) == params:
                    return train_url, val_url
        except (OSError, ValueError):
            pass  # unreadable: rewrite
    return None


def write_splits(dest: str, splits: dict[str, list[SourceSample]], key: str, params: dict,
                 progress: bool = False) -> tuple[str, str]:
    """Write ``splits['train']`` (``TRAIN_SHARDS`` shards) and ``splits['val']`` (2 shards) under ``dest``;
    ``params`` goes into each manifest's ``extra[key]`` so a rerun with the same parameters reuses them."""
    opts = io.storage_options_for(dest)
    for split in ("val", "train"):
        samples = splits[split]
        total = sum(tar_bytes(s) for s in samples)
        shards = TRAIN_SHARDS if split == "train" else 2
        write_shards(samples, CLASS_NAMES, io.join_url(dest, split), shard_bytes=total // shards + 1, prefix=split,
                     workers=2, overwrite=True, storage_options=opts, progress=progress, extra={key: params})
    log.info("%s shards at %s: %d train, %d val", key, dest, len(splits["train"]), len(splits["val"]))
    return (io.join_url(io.join_url(dest, "train"), MANIFEST_NAME),
            io.join_url(io.join_url(dest, "val"), MANIFEST_NAME))


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
    if (urls := reuse_manifests(dest, "digits", params)) is not None:
        return urls
    images, labels = digit_jpegs(image_size)
    # shuffled once (seeded) so every shard holds all classes, as a shuffled ImageNet write would
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    samples = {split: [SourceSample(f"{split}{i:05d}", images[j], int(labels[j]), "jpg") for i, j in enumerate(idx)]
               for split, idx in splits.items()}
    return write_splits(dest, samples, "digits", params, progress)
