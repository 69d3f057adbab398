"""The photodigits set (digits blended over photographs, MNIST-M's construction): split by glyph and by
photograph, deterministic, written through `largessl shards photodigits` with the usual manifest and indexes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from largessl.cli import main
from largessl.data import photodigits as pd
from largessl.data.digits import digit_glyphs
from largessl.data.manifest import read_manifest


def test_photographs_are_bundled_and_disjoint() -> None:
    assert len(pd.TRAIN_PHOTOS) + len(pd.VAL_PHOTOS) == 17 and not set(pd.TRAIN_PHOTOS) & set(pd.VAL_PHOTOS)
    photos = pd.load_photos(pd.TRAIN_PHOTOS + pd.VAL_PHOTOS)  # package files, never a download
    assert all(p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 64 for p in photos)


def test_blend_is_abs_difference_of_patch_and_glyph() -> None:
    glyph = np.zeros((1, 8, 8), np.float32)
    glyph[0, 2:6, 3:5] = 1.0
    photo = np.full((20, 30, 3), 0.25, np.float32)
    photo[..., 2] = 1.0  # blue everywhere
    out = pd.blend(glyph, [photo], np.random.default_rng(0))[0]
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [64, 64, 255])  # background: the photo
    np.testing.assert_array_equal(out[3, 3], [191, 191, 0])  # stroke: |photo - 1|


def test_split_by_glyph_and_by_photograph_and_deterministic() -> None:
    a = pd.photodigits_arrays(image_size=16, copies=2, seed=3)
    b = pd.photodigits_arrays(image_size=16, copies=2, seed=3)
    c = pd.photodigits_arrays(image_size=16, copies=2, seed=4)
    for split in ("train", "val"):
        np.testing.assert_array_equal(a[split][0], b[split][0])
    assert not np.array_equal(a["train"][0], c["train"][0])
    (xt, yt), (xv, yv) = a["train"], a["val"]
    assert len(xt) + len(xv) == 2 * 1797 and len(xv) == 2 * 359
    # stratified: every class in val, about 20% of each
    counts = np.bincount(yv, minlength=10) / np.bincount(np.concatenate([yt, yv]), minlength=10)
    assert np.all(np.abs(counts - 0.2) < 0.02)
    # the glyph split is drawn first from the seeded generator: the same draw has disjoint train and val glyphs
    _, labels = digit_glyphs(16)
    train_idx, val_idx = pd.stratified_split(labels, 0.2, np.random.default_rng(3))
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == 1797


def test_val_backgrounds_come_only_from_held_out_photographs() -> None:
    glyphs = np.zeros((200, 16, 16), np.float32)  # no stroke: the output is the patch itself
    rng = np.random.default_rng(0)
    train_photos, val_photos = pd.load_photos(pd.TRAIN_PHOTOS), pd.load_photos(pd.VAL_PHOTOS)
    patches = pd.blend(glyphs, val_photos, rng)

    def found_in(patch: np.ndarray, photos: list[np.ndarray]) -> bool:
        for p in photos:
            q = np.round(p * 255).astype(np.uint8)
            hits = np.argwhere(np.all(q[:-15, :-15] == patch[0, 0], axis=-1))
            if any(np.array_equal(q[y:y + 16, x:x + 16], patch) for y, x in hits[:5000]):
                return True
        return False

    assert all(found_in(p, val_photos) for p in patches[:5])
    assert not any(found_in(p, train_photos) for p in patches[:5])


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="copies"):
        pd.photodigits_arrays(copies=0)
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        pd.photodigits_arrays(image_size=4)
    with pytest.raises(ValueError, match="larger than photographs"):
        pd.photodigits_arrays(image_size=200)


def test_shards_command_writes_manifests_and_reuses_them(tmp_path: Path, capsys) -> None:
    dest = tmp_path / "pd"
    assert main(["shards", "photodigits", str(dest), "--image-size", "16"]) == 0
    train, val = capsys.readouterr().out.split()
    mt, mv = read_manifest(train), read_manifest(val)
    assert (mt.num_samples, mv.num_samples) == (1438, 359) and mt.class_names == [str(i) for i in range(10)]
    assert len(mt.shards) >= 7
    with tarfile.open(mt.shards[0].url) as tar:
        img = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))
    assert Image.open(io.BytesIO(img)).mode == "RGB" and Image.open(io.BytesIO(img)).size == (16, 16)
    assert mt.extra["photodigits"]["val_photos"] == list(pd.VAL_PHOTOS)
    stamp = Path(train).stat().st_mtime_ns
    assert main(["shards", "photodigits", str(dest), "--image-size", "16"]) == 0  # same parameters: reused
    assert Path(train).stat().st_mtime_ns == stamp
    assert main(["shards", "photodigits", str(dest), "--image-size", "16", "--copies", "0"]) == 2
