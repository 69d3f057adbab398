"""The CPU augmentation path: recipes, parameters, backends against torchvision, decoders, reduced-size decoding."""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from largessl.data import augment, decode
from largessl.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    SATURATION,
    DecodeError,
    ViewParams,
    ViewSpec,
    build_eval_transform,
    build_views,
    make_view,
    recipe_specs,
)
from largessl.data.decode import CPU_DECODERS, decode_cpu, draft_reduce, probe

BACKENDS = ["pil", pytest.param("opencv", marks=pytest.mark.skipif(not decode.opencv_available(),
                                                                   reason="OpenCV (the fast extra) is not installed"))]


def _photo(w: int = 160, h: int = 120) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _corrupt_body(data: bytes) -> bytes:
    sos = data.index(b"\xff\xda")
    out = bytearray(data)
    for i in range(sos + 40, len(data) - 40, 5):
        out[i] = 0xFF
    return bytes(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_makes_normalised_views(recipe: str, backend: str) -> None:
    tf = build_views(recipe, 32, 4, backend=backend)
    views = tf.decode(_jpeg(_photo()), random.Random(0))
    assert len(views) == 4 and tf.backend == backend
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
    # digits = small without the flip (the demo's recipe): a mirrored glyph is another glyph
    assert [replace(v, flip_p=0.5) for v in recipe_specs("digits", 32, 2)] == recipe_specs("small", 32, 2)
    assert all(v.flip_p == 0.0 for v in recipe_specs("digits", 32, 2, min_scale=0.6))
    assert [v.blur_p for v in recipe_specs("barlow_twins", 64, 5)] == [1.0, 0.1, 1.0, 0.1, 1.0]  # M views
    assert recipe_specs("simsiam", 224, 2, min_scale=0.3)[0].scale == (0.3, 1.0)
    with pytest.raises(ValueError, match="allowed: barlow_twins"):
        build_views("byol2", 224, 2)
    with pytest.raises(ValueError, match="allowed: auto, opencv, pil"):
        build_views("small", 32, 2, backend="simd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_are_deterministic_in_the_rng(backend: str) -> None:
    tf = build_views("barlow_twins", 32, 2, backend=backend)
    data = _jpeg(_photo())
    a = tf.decode(data, random.Random(7))
    b = tf.decode(data, random.Random(7))
    c = tf.decode(data, random.Random(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def _one_op(backend: str, img: Image.Image, **p) -> np.ndarray:
    """One view with only the given ops, full-image crop at the image's own size (an identity resize)."""
    spec = ViewSpec(img.size[0])
    params = ViewParams(box=(0, 0, *img.size), flip=False, blur_sigma=0.0, colour=p.get("colour", ()),
                        gray=p.get("gray", False), solarize=p.get("solarize", False))
    ops = augment._ops(backend)
    v = make_view(ops, ops.from_pil(img), params.box, spec, params)
    return v.permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_op_matches_torchvision_on_pil_images(backend: str) -> None:
    img = _photo(48, 48)
    ref_of = {
        BRIGHTNESS: lambda f: TF.adjust_brightness(img, f), CONTRAST: lambda f: TF.adjust_contrast(img, f),
        SATURATION: lambda f: TF.adjust_saturation(img, f), HUE: lambda f: TF.adjust_hue(img, f),
    }
    for op, f in [(BRIGHTNESS, 1.3), (BRIGHTNESS, 0.7), (CONTRAST, 1.35), (CONTRAST, 0.6), (SATURATION, 1.2),
                  (SATURATION, 0.8), (HUE, 0.08), (HUE, -0.06)]:
        ours = _one_op(backend, img, colour=((op, f),))
        ref = np.asarray(ref_of[op](f)).astype(int)
        err = np.abs(ours - ref)
        # PIL's HSV is torchvision's own path on PIL images; OpenCV rounds its 8-bit HSV differently
        tol = 8 if (op == HUE and backend == "opencv") else 1
        assert err.max() <= tol and err.mean() < 0.5, (op, f, err.max(), err.mean())
    gray = np.asarray(TF.rgb_to_grayscale(img, 3)).astype(int)
    assert np.abs(_one_op(backend, img, gray=True) - gray).max() <= 1
    sol = np.asarray(TF.solarize(img, 128)).astype(int)
    assert np.abs(_one_op(backend, img, solarize=True) - sol).max() == 0


@pytest.mark.skipif(not decode.opencv_available(), reason="OpenCV (the fast extra) is not installed")
def test_opencv_backend_agrees_with_the_pil_fallback() -> None:
    data = _jpeg(_photo(200, 150))
    a = build_views("barlow_twins", 64, 2, backend="opencv")
    b = build_views("barlow_twins", 64, 2, backend="pil")
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    diffs = []
    for seed in range(12):
        for x, y in zip(a.decode(data, random.Random(seed)), b.decode(data, random.Random(seed))):
            diffs.append(((x - y) * std * 255).abs().mean().item())
    # same parameters; they differ in the blur (true Gaussian vs PIL's box approximation) and 8-bit HSV rounding
    assert np.mean(diffs) < 1.5 and max(diffs) < 5, (np.mean(diffs), max(diffs))


def test_auto_backend_falls_back_to_pure_pil_without_the_fast_extra(monkeypatch) -> None:
    monkeypatch.setattr(augment, "opencv_available", lambda: False)
    monkeypatch.setattr(decode, "simplejpeg_available", lambda: False)
    monkeypatch.setattr(augment, "_OPS", {})
    tf = build_views("barlow_twins", 32, 2)
    assert tf.backend == "pil"
    views = tf.decode(_jpeg(_photo()), random.Random(0))
    assert [v.shape for v in views] == [(3, 32, 32)] * 2
    with pytest.raises(RuntimeError, match="fast"):
        build_views("small", 32, 2, backend="opencv")


def test_fast_decoder_gives_pils_pixels_and_verdicts() -> None:
    pytest.importorskip("simplejpeg", reason="simplejpeg (the fast extra) is not installed")
    good = _jpeg(_photo(203, 157))
    grey = _jpeg(_photo(64, 48).convert("L"))
    for data in (good, grey):
        for r in (1, 2, 4, 8):
            assert np.array_equal(CPU_DECODERS["simplejpeg"](data, r), CPU_DECODERS["pil"](data, r)), r
    bad = [b"garbage" * 10, good[: len(good) // 2], good[:-30], _corrupt_body(good)]
    for i in range(10):  # bit flips in the scan: some only warn (PIL accepts), some break the stream
        b = bytearray(_jpeg(_photo(64 + i, 48)))
        b[len(b) // 3] ^= 0xA5
        b[len(b) // 3 + 7] ^= 0x5A
        bad.append(bytes(b))
    for data in bad:
        try:
            CPU_DECODERS["pil"](data, 1)
            pil_ok = True
        except DecodeError:
            pil_ok = False
        try:
            decode_cpu(data)
            ours_ok = True
        except DecodeError:
            ours_ok = False
        assert ours_ok == pil_ok


def test_probe_reads_headers_without_decoding() -> None:
    img = _photo(123, 45)
    info = probe(_jpeg(img))
    assert (info.width, info.height, info.jpeg, info.components, info.complete) == (123, 45, True, 3, True)
    assert info.device_decodable
    assert probe(_jpeg(img.convert("L"))).components == 1
    cmyk = probe(_jpeg(img.convert("CMYK")))
    assert cmyk.components == 4 and not cmyk.device_decodable
    data = _jpeg(img)
    assert not probe(data[: len(data) - 100]).complete
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = probe(buf.getvalue())
    assert (png.width, png.height, png.jpeg, png.device_decodable) == (123, 45, False, False)
    with pytest.raises(DecodeError):
        probe(b"not an image at all")


def test_reduced_size_decoding_when_crops_allow(monkeypatch) -> None:
    calls = []
    real = augment.ViewTransform.decode.__globals__["draft_reduce"]

    def spy(w, h, factor):
        calls.append(real(w, h, factor))
        return calls[-1]

    monkeypatch.setattr(augment, "draft_reduce", spy)
    views = build_views("small", 32, 2).decode(_jpeg(_photo(800, 600)), random.Random(0))
    assert calls and calls[0] >= 2  # decoded at 1/2 scale or less, never the full 800 px
    assert [v.shape for v in views] == [(3, 32, 32)] * 2
    calls.clear()
    build_views("barlow_twins", 224, 2).decode(_jpeg(_photo(500, 375)), random.Random(0))
    assert calls == [1]  # a 224 crop of a 500x375 image needs full resolution
    assert draft_reduce(800, 600, 9.5) == 8 and draft_reduce(800, 600, 3.9) == 2 and draft_reduce(99, 99, 1.9) == 1


def test_eval_transforms() -> None:
    img = _photo()
    ev = build_eval_transform("eval", 32)
    a, b = ev(img, random.Random(0)), ev(img, random.Random(1))
    assert len(a) == 1 and torch.equal(a[0], b[0])  # deterministic: resize + center crop
    lin = build_eval_transform("train_linear", 32)
    assert lin(img, random.Random(0))[0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="allowed: eval, train_linear"):
        build_eval_transform("test", 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_bytes_raise_decode_error(backend: str) -> None:
    tf = build_views("small", 16, 2, backend=backend)
    with pytest.raises(DecodeError):
        tf.decode(b"garbage bytes", random.Random(0))
    data = _jpeg(_photo())
    for broken in (data[: len(data) // 3], _corrupt_body(data)):
        with pytest.raises(DecodeError):
            tf.decode(broken, random.Random(0))
    assert np.isfinite(tf.decode(data, random.Random(0))[0].numpy()).all()
