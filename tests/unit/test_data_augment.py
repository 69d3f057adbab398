"""The augmentation factory: recipes, determinism, fused colour ops against torchvision, reduced-size decoding."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, JpegImagePlugin

from largessl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    DecodeError,
    ViewSpec,
    _colour_matrix,
    build_eval_transform,
    build_views,
    recipe_specs,
)


def _photo(w: int = 160, h: int = 120) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_makes_normalised_views(recipe: str) -> None:
    tf = build_views(recipe, 32, 4)
    views = tf(_photo(), random.Random(0))
    assert len(views) == 4
    sizes = [v.shape for v in views]
    if recipe == "multicrop":
        assert sizes[:2] == [(3, 32, 32)] * 2 and sizes[2:] == [(3, 14, 14)] * 2
    else:
        assert sizes == [(3, 32, 32)] * 4
    for v in views:
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert (v >= lo.view(3, 1, 1) - 1e-5).all() and (v <= hi.view(3, 1, 1) + 1e-5).all()
    if recipe == "none":
        assert all(torch.equal(views[0], v) for v in views[1:])
    else:
        assert not torch.equal(views[0], views[1])


def test_recipe_parameters() -> None:
    bt = recipe_specs("barlow_twins", 224, 2)
    assert [v.blur_p for v in bt] == [1.0, 0.1] and [v.solarize_p for v in bt] == [0.0, 0.2]
    assert bt[0].scale == (0.08, 1.0) and (bt[0].brightness, bt[0].contrast, bt[0].saturation, bt[0].hue) == (
        0.4, 0.4, 0.2, 0.1)
    assert bt[0].jitter_p == 0.8 and bt[0].gray_p == 0.2
    vic = recipe_specs("vicreg", 224, 2)
    assert vic[0] == vic[1] and vic[0].blur_p == 0.5 and vic[0].solarize_p == 0.1
    assert recipe_specs("decorrelation", 224, 2)[0].scale == (0.2, 1.0)
    assert all(v.blur_p == 0 for v in recipe_specs("small", 32, 2))
    assert [v.blur_p for v in recipe_specs("barlow_twins", 64, 5)] == [1.0, 0.1, 1.0, 0.1, 1.0]  # M views
    assert recipe_specs("simsiam", 224, 2, min_scale=0.3)[0].scale == (0.3, 1.0)
    with pytest.raises(ValueError, match="allowed: barlow_twins"):
        build_views("byol2", 224, 2)


def test_views_are_deterministic_in_the_rng() -> None:
    tf = build_views("barlow_twins", 32, 2)
    data = _jpeg(_photo())
    a = tf.decode(data, random.Random(7))
    b = tf.decode(data, random.Random(7))
    c = tf.decode(data, random.Random(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def _apply(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (a @ x.reshape(3, -1) + t[:, None]).reshape_as(x)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_fused_colour_ops_match_torchvision(op: str) -> None:
    # a mid-range image so that torchvision's per-op clamping never triggers
    x = torch.rand(3, 16, 16) * 0.4 + 0.3
    factors = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, op: 0.3}
    spec = ViewSpec(16, jitter_p=1.0, gray_p=0.0, **factors)
    rng = random.Random(3)
    a, t = _colour_matrix(spec, rng, x.mean(dim=(1, 2)))
    # replay the same random draws: jitter flag, gray flag, op order, then the factor
    r = random.Random(3)
    r.random(), r.random()
    r.shuffle([0, 1, 2, 3])
    f = r.uniform(0.7, 1.3)
    ref = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation}[op](x, f)
    assert torch.allclose(_apply(a, t, x), ref, atol=1e-5)


def test_grayscale_and_hue_rotation() -> None:
    x = torch.rand(3, 8, 8)
    a, t = _colour_matrix(ViewSpec(8, jitter_p=0.0, gray_p=1.0), random.Random(0), x.mean(dim=(1, 2)))
    assert torch.allclose(_apply(a, t, x), TF.rgb_to_grayscale(x, 3), atol=1e-3)  # 0.2989 vs 0.299
    a, t = _colour_matrix(ViewSpec(8, jitter_p=1.0, gray_p=0.0, brightness=0, contrast=0, saturation=0, hue=0.5),
                          random.Random(1), x.mean(dim=(1, 2)))
    y = _apply(a, t, x)
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert torch.allclose(luma @ y.reshape(3, -1), luma @ x.reshape(3, -1), atol=1e-5)  # hue keeps luma
    assert not torch.allclose(y, x, atol=1e-3)


def test_reduced_size_decoding_when_crops_allow(monkeypatch) -> None:
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *args):
        out = real(self, mode, size, *args)
        calls.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    big = _jpeg(_photo(800, 600))
    views = build_views("small", 32, 2).decode(big, random.Random(0))
    assert calls and calls[0][0] <= 400  # decoded at 1/2 scale or less, never the full 800 px
    assert [v.shape for v in views] == [(3, 32, 32)] * 2
    calls.clear()
    build_views("barlow_twins", 224, 2).decode(_jpeg(_photo(500, 375)), random.Random(0))
    assert not calls  # a 224 crop of a 500x375 image needs full resolution


def test_eval_transforms() -> None:
    img = _photo()
    ev = build_eval_transform("eval", 32)
    a, b = ev(img, random.Random(0)), ev(img, random.Random(1))
    assert len(a) == 1 and torch.equal(a[0], b[0])  # deterministic: resize + center crop
    lin = build_eval_transform("train_linear", 32)
    assert lin(img, random.Random(0))[0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="allowed: eval, train_linear"):
        build_eval_transform("test", 32)


def test_undecodable_bytes_raise_decode_error() -> None:
    tf = build_views("small", 16, 2)
    with pytest.raises(DecodeError):
        tf.decode(b"garbage bytes", random.Random(0))
    data = _jpeg(_photo())
    with pytest.raises(DecodeError):
        tf.decode(data[: len(data) // 3], random.Random(0))
    assert np.isfinite(tf.decode(data, random.Random(0))[0].numpy()).all()
