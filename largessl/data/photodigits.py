"""``photodigits``: scikit-learn's digits blended with patches of colour photographs (MNIST-M's construction).

Ganin & Lempitsky (2015) built MNIST-M by blending MNIST glyphs over random patches of BSDS500 photographs: each
output pixel is ``|patch − glyph|`` per channel, so the digit shows as an inversion of the background's colour and
texture. Random convolutional features, which already separate the clean digits (torchvision's random-init
ResNet-18: 95% kNN), are dominated by the background here, so an encoder has to learn to ignore texture and colour
to find the digit. That is what self-supervised pretraining with colour and crop augmentations is for, and what
the demo and ``largessl repro`` need to show a gain that can fail.

Built at run time from data that installed packages ship, nothing downloaded:

- glyphs: the 1797 digits of ``sklearn.datasets.load_digits`` (8×8, upscaled bicubic to ``image_size``);
- backgrounds: 17 photographs bundled inside scikit-image's wheel (``skimage/data/*.png|jpg``, read as files:
  the ``skimage.data`` loaders of other images would download, these never do).

Validation measures generalisation twice over: its glyphs are never seen in training (a seeded stratified 20%),
and its 4 photographs are never seen in training either. Every glyph is drawn ``copies`` times on independent
random patches (seeded), so the training set can be made larger than 1,437 images without repeating a pixel.
"""

from __future__ import annotations

import logging
from importlib import resources

import numpy as np
from PIL import Image

from largessl.data.digits import digit_glyphs, jpeg_bytes, reuse_manifests, write_splits
from largessl.data.writer import SourceSample

log = logging.getLogger(__name__)

TRAIN_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "clock_motion.png", "coffee.png",
                "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
                "retina.jpg")
"""Backgrounds of the training split: 13 of scikit-image's bundled photographs (colour and greyscale)."""
VAL_PHOTOS = ("chelsea.png", "coins.png", "grass.png", "rocket.jpg")
"""Backgrounds held out for validation: two colour (a cat, a rocket launch), two greyscale (coins, grass)."""


def load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """The named photographs from scikit-image's package data, as HxWx3 float32 in [0, 1]."""
    try:
        root = resources.files("skimage.data")
    except ModuleNotFoundError as e:
        raise RuntimeError("the photodigits dataset needs scikit-image (pip install scikit-image), whose wheel "
                           "bundles the background photographs") from e
    out = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise RuntimeError(f"scikit-image's bundled photograph {name!r} is missing at {path}; reinstall "
                               "scikit-image (the dataset never downloads it)")
        with path.open("rb") as f:
            out.append(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0)
    return out


def blend(glyphs: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """``|patch − glyph|`` for each glyph (N×S×S in [0, 1]) over a uniformly drawn photograph and position;
    N×S×S×3 uint8."""
    n, size = glyphs.shape[0], glyphs.shape[1]
    which = rng.integers(len(photos), size=n)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        photo = photos[which[i]]
        y = rng.integers(photo.shape[0] - size + 1)
        x = rng.integers(photo.shape[1] - size + 1)
        patch = photo[y:y + size, x:x + size]
        out[i] = np.round(np.abs(patch - glyphs[i][:, :, None]) * 255.0).astype(np.uint8)
    return out


def stratified_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, val): ``val_fraction`` of every class to val, the rest to train; both shuffled."""
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.extend(idx[:int(round(len(idx) * val_fraction))].tolist())
    is_val = np.zeros(len(labels), bool)
    is_val[val] = True
    return rng.permutation(np.flatnonzero(~is_val)), rng.permutation(np.flatnonzero(is_val))


def photodigits_arrays(image_size: int = 32, val_fraction: float = 0.2, copies: int = 1,
                       seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'train': (images N×S×S×3 uint8, labels), 'val': (...)}``; deterministic for the arguments."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (got {image_size})")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    if copies < 1:
        raise ValueError(f"copies must be >= 1 (got {copies})")
    glyphs, labels = digit_glyphs(image_size)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = stratified_split(labels, val_fraction, rng)
    out = {}
    for split, idx, names in (("train", train_idx, TRAIN_PHOTOS), ("val", val_idx, VAL_PHOTOS)):
        photos = load_photos(names)
        small = [n for n, p in zip(names, photos) if min(p.shape[:2]) < image_size]
        if small:
            raise ValueError(f"image_size {image_size} is larger than photographs {small}")
        rep = np.tile(idx, copies)
        out[split] = (blend(glyphs[rep], photos, rng), labels[rep])
    return out


def write_photodigits_shards(dest: str, image_size: int = 32, val_fraction: float = 0.2, copies: int = 1,
                             seed: int = 0, progress: bool = False) -> tuple[str, str]:
    """Write train/val photodigits shards under ``dest`` (``dest/train``, ``dest/val``); returns both manifest URLs.

    Idempotent: when both manifests exist with the same parameters they are reused.
    """
    params = {"image_size": image_size, "val_fraction": val_fraction, "copies": copies, "seed": seed,
              "dataset": "photodigits", "train_photos": list(TRAIN_PHOTOS), "val_photos": list(VAL_PHOTOS)}
    if (urls := reuse_manifests(dest, "photodigits", params)) is not None:
        return urls
    arrays = photodigits_arrays(image_size, val_fraction, copies, seed)
    samples = {split: [SourceSample(f"{split}{i:05d}", jpeg_bytes(img), int(y), "jpg")
                       for i, (img, y) in enumerate(zip(imgs, labels))]
               for split, (imgs, labels) in arrays.items()}
    return write_splits(dest, samples, "photodigits", params, progress)
