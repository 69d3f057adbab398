"""data.decode=gpu on CPU tensors: batched ops against references, parameter parity, determinism, resume, bad data."""

from __future__ import annotations

import io as pyio
import logging
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from largessl.data import augment, device_batch
from largessl.data.augment import HUE, draw_params, recipe_specs
from largessl.data.batched_augment import (
    BatchedViews,
    adjust_hue,
    blur_radius,
    gaussian_blur,
    pack_params,
    params_tensor,
    resample_weights,
)
from largessl.data.config import DataConfig
from largessl.data.decode import DecodeError, decode_jpegs, probe
from largessl.data.manifest import read_manifest, write_manifest
from largessl.data.stream import _rng, build_train_stream
from largessl.data.writer import SourceSample, write_shard

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
B = 4


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def _jpeg(i: int, fmt: str = "JPEG") -> bytes:
    """A real-photo crop of one of three ImageNet-like aspect ratios, small enough for a fast test."""
    r = random.Random(i)
    w, h = r.choice([(96, 72), (72, 96), (80, 80)])
    x0, y0 = r.randint(0, 300), r.randint(0, 300)
    img = _photo().crop((x0, y0, x0 + 200, y0 + 200)).resize((w, h), Image.Resampling.BICUBIC)
    buf = pyio.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _corrupt_body(data: bytes) -> bytes:
    """Valid header and end marker, garbage entropy-coded data: only decoding can tell."""
    sos = data.index(b"\xff\xda")
    out = bytearray(data)
    for i in range(sos + 40, len(data) - 40, 5):
        out[i] = 0xFF
    return bytes(out)


def write_shards(dest: Path, sizes: list[int], override: dict[int, bytes] | None = None) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for s, count in enumerate(sizes):
        samples = [SourceSample(f"s{n + i:04d}", (override or {}).get(n + i, _jpeg(n + i)), (n + i) % 3)
                   for i in range(count)]
        rows.append({"url": f"part-{s:03d}.tar", **write_shard(str(dest / f"part-{s:03d}.tar"), samples)})
        n += count
    write_manifest(str(dest / "manifest.json"), rows, ["a", "b", "c"])
    return str(dest / "manifest.json")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("photos"), [7, 9, 5])


def _cfg(decode: str, workers: int = 2, **kw) -> DataConfig:
    kw.setdefault("augment", "barlow_twins")
    kw.setdefault("shuffle_buffer", 4)
    return DataConfig(image_size=32, num_workers=workers, decode=decode, pin_memory=False, retry_backoff_s=0.0, **kw)


def _run(url: str, decode: str, workers: int = 2, start: int = 0, **kw):
    stream = build_train_stream(_cfg(decode, workers, **kw), read_manifest(url), B, 0, 1, seed=3)
    return stream, list(stream.iterate(1, start))


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute difference of two normalised view batches in 8-bit levels."""
    return ((a - b) * STD * 255).abs()


# ---------------------------------------------------------------------------------------------------
# Batched ops against their references


def test_resize_matches_pytorch_antialiased_bicubic_on_the_crop() -> None:
    imgs = [torch.from_numpy(np.array(Image.open(pyio.BytesIO(_jpeg(i))).convert("RGB"))).permute(2, 0, 1)
            for i in range(6)]
    views = BatchedViews([augment.ViewSpec(40, jitter_p=0, gray_p=0, flip_p=0)])
    boxes = [(3, 5, 70, 60), (0, 0, 72, 72), (10, 2, 30, 40), (1, 1, 79, 50), (20, 20, 60, 71), (5, 9, 66, 70)]
    params = torch.zeros(6, 1, 16, dtype=torch.float64)
    params[:, 0, :4] = torch.tensor(boxes, dtype=torch.float64)
    params[:, 0, 10:14] = 1.0
    params[1, 0, 4] = 1.0  # flipped
    out = views(imgs, params)[0] * STD + torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ref = F.interpolate(imgs[i][None, :, y0:y1, x0:x1].float(), size=(40, 40), mode="bicubic", antialias=True)
        ref = ref.clamp(0, 255)[0] / 255
        if i == 1:
            ref = ref.flip(-1)
        assert (out[i] - ref).abs().max() < 1e-4, i


def test_resample_weights_rows_sum_to_one_and_stay_in_the_crop() -> None:
    lo, hi = torch.tensor([0.0, 10.0, 3.0]), torch.tensor([50.0, 20.0, 90.0])
    w = resample_weights(lo, hi, 16, 100)
    assert torch.allclose(w.sum(-1), torch.ones(3, 16), atol=1e-6)
    cols = torch.arange(100)
    for i in range(3):
        nz = (w[i].abs() > 0).any(0)
        assert not nz[(cols < lo[i]) | (cols >= hi[i])].any()


def test_hue_matches_torchvision_and_blur_matches_opencv() -> None:
    x = torch.rand(5, 3, 12, 12)
    shift = torch.tensor([-0.1, 0.0, 0.05, 0.5, 0.099])
    ours = adjust_hue(x, shift)
    for i in range(5):
        assert torch.allclose(ours[i], TF.adjust_hue(x[i], float(shift[i])), atol=1e-5)
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the fast extra) is the blur reference")
    img = (torch.rand(2, 3, 24, 24) * 255).round()
    sigma = torch.tensor([0.6, 1.7], dtype=torch.float64)
    ours = gaussian_blur(img, sigma, blur_radius(sigma))
    for i in range(2):
        # on 8-bit images (the CPU path's) OpenCV uses radius round(3 sigma) and fixed-point arithmetic
        arr = img[i].permute(1, 2, 0).numpy().astype(np.uint8)
        ref = cv2.GaussianBlur(arr, (0, 0), float(sigma[i]), borderType=cv2.BORDER_REPLICATE).astype(np.float32)
        err = np.abs(ours[i].permute(1, 2, 0).numpy() - ref)
        assert err.max() < 1.5 and err.mean() < 0.4  # OpenCV rounds to 8 bits between its two passes


# ---------------------------------------------------------------------------------------------------
# Parameters: both modes draw the same ones, with torchvision's distributions


def test_both_modes_draw_identical_parameters(shards: str, monkeypatch) -> None:
    seen: dict[str, list] = {"cpu": [], "gpu": []}
    real = augment.draw_params
    mode = ["cpu"]

    def spy(w, h, specs, rng):
        out = real(w, h, specs, rng)
        seen[mode[0]].append((w, h, out))
        return out

    monkeypatch.setattr(augment, "draw_params", spy)
    monkeypatch.setattr(device_batch, "draw_params", spy)
    for m in ("cpu", "gpu"):
        mode[0] = m
        _run(shards, m, workers=0)
    assert len(seen["cpu"]) == len(seen["gpu"]) == 20  # 21 samples, 5 batches of 4
    key = lambda t: (t[0], t[1], repr(t[2]))  # noqa: E731
    assert sorted(map(key, seen["cpu"])) == sorted(map(key, seen["gpu"]))


def test_parameter_distributions_match_torchvision() -> None:
    from scipy.stats import kstest
    from torchvision import transforms as T

    n, w, h = 4000, 500, 375
    specs = recipe_specs("barlow_twins", 224, 2)
    draws = [draw_params(w, h, specs, random.Random(i)) for i in range(n)]
    # crop area fraction and log aspect ratio against RandomResizedCrop.get_params
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    ref = [T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    area = [(p[0].box[2] - p[0].box[0]) * (p[0].box[3] - p[0].box[1]) / (w * h) for p in draws]
    ratio = [math.log((p[0].box[2] - p[0].box[0]) / (p[0].box[3] - p[0].box[1])) for p in draws]
    from scipy.stats import ks_2samp

    assert ks_2samp(area, [r[2] * r[3] / (w * h) for r in ref]).pvalue > 1e-3
    assert ks_2samp(ratio, [math.log(r[3] / r[2]) for r in ref]).pvalue > 1e-3

    def rate(values: list[bool], p: float) -> None:
        assert abs(np.mean(values) - p) < 4 * math.sqrt(p * (1 - p) / len(values)) + 1e-9, (np.mean(values), p)

    for v, (blur_p, sol_p) in enumerate([(1.0, 0.0), (0.1, 0.2)]):
        rate([p[v].blur_sigma > 0 for p in draws], blur_p)
        rate([p[v].solarize for p in draws], sol_p)
        rate([p[v].flip for p in draws], 0.5)
        rate([p[v].gray for p in draws], 0.2)
        rate([len(p[v].colour) > 0 for p in draws], 0.8)
        sig = [p[v].blur_sigma for p in draws if p[v].blur_sigma > 0]
        assert kstest(sig, "uniform", args=(0.1, 1.9)).pvalue > 1e-3
    # jitter factors uniform on torchvision's ranges, and every op order equally likely
    for op, (lo, hi) in {0: (0.6, 1.4), 1: (0.6, 1.4), 2: (0.8, 1.2), HUE: (-0.1, 0.1)}.items():
        f = [fac for p in draws for o, fac in p[0].colour if o == op]
        assert kstest(f, "uniform", args=(lo, hi - lo)).pvalue > 1e-3, op
    orders = Counter(tuple(o for o, _ in p[0].colour) for p in draws if p[0].colour)
    assert len(orders) == 24 and min(orders.values()) > 0.5 * sum(orders.values()) / 24
    # the packed rows the batched path consumes hold exactly these values
    row = pack_params(draws[0])[1]
    p = draws[0][1]
    assert row[:4] == [float(round(v)) for v in p.box] and row[5] == p.blur_sigma and row[14:] == [float(p.gray), float(p.solarize)]
    assert [int(c) - 1 for c in row[6:6 + len(p.colour)]] == [o for o, _ in p.colour]


# ---------------------------------------------------------------------------------------------------
# Determinism, exact resume, agreement with the CPU path


def test_same_seed_gives_identical_batches_in_each_mode_run_twice(shards: str) -> None:
    runs = {m: [_run(shards, m)[1] for _ in range(2)] for m in ("cpu", "gpu")}
    for m, (a, b) in runs.items():
        assert [x.keys for x in a] == [x.keys for x in b], m
        assert all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x.views, y.views)), m
    # the modes agree on the samples, their order and labels; pixels within the documented tolerance
    cpu, gpu = runs["cpu"][0], runs["gpu"][0]
    assert [x.keys for x in cpu] == [x.keys for x in gpu]
    assert all(torch.equal(x.labels, y.labels) for x, y in zip(cpu, gpu))
    diffs = torch.cat([_levels(u, v).flatten() for x, y in zip(cpu, gpu) for u, v in zip(x.views, y.views)])
    assert diffs.mean() < 1.5 and torch.quantile(diffs, 0.99) < 12, (diffs.mean(), torch.quantile(diffs, 0.99))


def test_exact_resume_in_gpu_mode_on_the_cpu_device(tmp_path: Path) -> None:
    # a corrupt sample inside makes the resumed run substitute exactly as the uninterrupted one
    url = write_shards(tmp_path / "d", [7, 9, 5], {6: _corrupt_body(_jpeg(6))})
    _, full = _run(url, "gpu")
    for k in (1, 3):
        _, rest = _run(url, "gpu", start=k)
        assert [x.keys for x in rest] == [x.keys for x in full[k:]]
        assert all(torch.equal(u, v) for x, y in zip(rest, full[k:]) for u, v in zip(x.views, y.views))


def test_corrupt_jpegs_are_skipped_and_counted_as_on_the_cpu_path(tmp_path: Path, caplog) -> None:
    good = _jpeg(4)
    bad = {4: b"this is not a jpeg", 9: good[: len(good) // 2], 13: _corrupt_body(_jpeg(13)),
           17: _corrupt_body(_jpeg(17))}
    # the structural check finds the broken bodies before nvJPEG (which parses only the header) sees them
    assert not probe(bad[13]).device_decodable and not probe(bad[9]).device_decodable
    url = write_shards(tmp_path / "d", [7, 9, 5], bad)
    with caplog.at_level(logging.WARNING):
        cpu_stream, cpu = _run(url, "cpu")
        gpu_stream, gpu = _run(url, "gpu")
    assert [x.keys for x in cpu] == [x.keys for x in gpu]  # same substitutes in the same rows
    assert all(torch.equal(x.labels, y.labels) for x, y in zip(cpu, gpu))
    bad_keys = {f"s{i:04d}" for i in bad}
    assert not bad_keys & {k for x in gpu for k in x.keys}
    assert cpu_stream.skip_counts() == gpu_stream.skip_counts() == {"skipped_samples": 4, "skipped_shards": 0}
    # the two corrupt bodies were rejected by the CPU decoder in the workers (their logs stay there)


def test_a_batch_of_only_bad_samples_borrows_the_look_ahead_sample(tmp_path: Path) -> None:
    bad = {i: b"not an image" for i in range(9)}
    url = write_shards(tmp_path / "d", [7, 9, 5], bad)
    cfg_kw = {"shuffle_buffer": 1}
    cpu = _run(url, "cpu", workers=0, **cfg_kw)[1]
    gpu = _run(url, "gpu", workers=0, **cfg_kw)[1]
    assert [x.keys for x in cpu] == [x.keys for x in gpu]


def test_png_samples_fall_back_to_cpu_decoding(tmp_path: Path, monkeypatch) -> None:
    pngs = {i: _jpeg(i, "PNG") for i in (1, 5, 11)}
    url = write_shards(tmp_path / "d", [7, 9, 5], pngs)
    cpu_rows = []
    real = device_batch.BatchEncoder.__call__

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        cpu_rows.append(len(out.cpu_rows))
        return out

    monkeypatch.setattr(device_batch.BatchEncoder, "__call__", spy)
    cpu_stream, cpu = _run(url, "cpu", workers=0)
    gpu_stream, gpu = _run(url, "gpu", workers=0)
    assert sum(cpu_rows) == 3
    assert [x.keys for x in cpu] == [x.keys for x in gpu]
    assert {"s0001", "s0005", "s0011"} <= {k for x in gpu for k in x.keys}
    assert gpu_stream.skip_counts()["skipped_samples"] == 0
    diffs = torch.cat([_levels(u, v).flatten() for x, y in zip(cpu, gpu) for u, v in zip(x.views, y.views)])
    assert diffs.mean() < 1.5


def test_batched_decode_retries_one_by_one(tmp_path: Path) -> None:
    good = [torch.frombuffer(bytearray(_jpeg(i)), dtype=torch.uint8) for i in range(3)]
    broken = torch.frombuffer(bytearray(_corrupt_body(_jpeg(3))), dtype=torch.uint8)
    out = decode_jpegs([good[0], broken, good[1], good[2]], torch.device("cpu"))
    assert out[1] is None and all(t is not None and t.dtype == torch.uint8 and t.shape[0] == 3
                                  for t in (out[0], out[2], out[3]))


def test_substitution_draws_from_the_salted_cpu_generator() -> None:
    specs = recipe_specs("barlow_twins", 32, 2)
    enc = device_batch.BatchEncoder(specs, lambda e, g, s: _rng("aug", 3, e, g, s))
    row = enc.draw(1, 17, 5, 80, 60)
    assert row == pack_params(draw_params(80, 60, specs, _rng("aug", 3, 1, 17, 5)))
    assert params_tensor([draw_params(80, 60, specs, random.Random(0))]).shape == (1, 2, 16)


def test_decode_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed: cpu, gpu"):
        DataConfig(decode="nvjpeg").validate()
    cfg = DataConfig(gpu_decode=True)
    cfg.validate()
    assert cfg.decode == "gpu" and not cfg.gpu_decode
    with pytest.raises(ValueError, match="custom transform"):
        build_train_stream(_cfg("gpu"), read_manifest(write_shards(tmp_path / "d", [8])), B, 0, 1, seed=0,
                           transform=lambda img: [img])


def test_canvas_padding_without_nested_tensors(monkeypatch) -> None:
    from largessl.data import batched_augment

    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((5, 7), (6, 4), (3, 3))]
    nested = batched_augment._canvas(imgs)

    def refuse(*a, **kw):
        raise NotImplementedError("no nested padding here")

    monkeypatch.setattr(torch.nested, "nested_tensor", refuse)
    looped = batched_augment._canvas(imgs)
    assert nested.shape == looped.shape == (3, 3, 6, 7) and torch.equal(nested, looped)
    for i, t in enumerate(imgs):
        assert torch.equal(looped[i, :, :t.shape[1], :t.shape[2]], t) and looped[i].sum() == t.sum(dtype=torch.long)


@pytest.mark.parametrize("recipe", augment.RECIPES)
def test_every_recipe_agrees_between_the_modes(shards: str, recipe: str) -> None:
    kw = {"augment": recipe, "num_views": 4 if recipe == "multicrop" else 2}
    cpu = _run(shards, "cpu", workers=0, **kw)[1]
    gpu = _run(shards, "gpu", workers=0, **kw)[1]
    assert [x.keys for x in cpu] == [x.keys for x in gpu]
    for x, y in zip(cpu, gpu):
        assert [v.shape for v in x.views] == [v.shape for v in y.views]
    diffs = torch.cat([_levels(u, v).flatten() for x, y in zip(cpu, gpu) for u, v in zip(x.views, y.views)])
    # none: whole-image crops >= 2x the 32-px output, so the CPU path decodes at 1/2 in the DCT (docs/data.md)
    bound = 3.0 if recipe == "none" else 1.5
    assert diffs.mean() < bound, (recipe, float(diffs.mean()))


def test_the_look_ahead_spare_image_is_moved_to_the_training_device(monkeypatch) -> None:
    """A worker whose first batch is all unreadable substitutes its look-ahead sample, decoded on the CPU in the
    worker: it must reach the training device before the batched augmentation (on CUDA a CPU image made
    BatchedViews run on the CPU and ``record_stream`` raise). The ``meta`` device stands in for CUDA here."""
    specs = recipe_specs("barlow_twins", 32, 2)
    stage = device_batch.DeviceStage(specs, torch.device("meta"), lambda e, g, s: _rng("aug", 3, e, g, s))
    seen: list[torch.device] = []

    def views(images, params):
        seen.extend(img.device for img in images)
        return [torch.empty(len(images), 3, 32, 32, device="meta") for _ in specs]

    monkeypatch.setattr(stage, "views", views)
    spare = device_batch._Source(torch.zeros(3, 60, 80, dtype=torch.uint8), 7, 1, "s0007", 80, 60)
    eb = device_batch.EncodedBatch(
        data=torch.empty(0, dtype=torch.uint8), lengths=[], jpeg_rows=[], cpu_images=[], cpu_rows=[],
        sizes=[(0, 0)] * 2, params=torch.zeros(2, 2, 16, dtype=torch.float64), ids=[0, 1],
        labels=torch.tensor([-1, -1]), keys=["", ""], urls=["", ""], epoch=0, spare=spare)
    batch = stage._make(eb, 0)
    assert seen == [torch.device("meta")] * 2, f"augmentation got images on {seen}"
    assert batch.keys == ["s0007", "s0007"] and batch.labels.device.type == "meta"
    assert stage.fallback[0].image.device.type == "meta"  # later batches of the worker borrow the moved copy


def _encode(img: Image.Image, **kw) -> bytes:
    buf = pyio.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_the_jpeg_structure_check_passes_every_kind_of_good_jpeg_and_fails_broken_bodies() -> None:
    from largessl.data.decode import jpeg_structure_ok

    img = _photo().resize((96, 96))
    good = {"baseline": _encode(img, quality=90), "progressive": _encode(img, progressive=True),
            "grayscale": _encode(img.convert("L")), "cmyk": _encode(img.convert("CMYK")),
            "optimized": _encode(img, optimize=True), "restart markers": _encode(img, restart_marker_blocks=2),
            "padded after EOI": _encode(img) + b"\x00" * 64}
    for name, data in good.items():
        assert jpeg_structure_ok(data), name
    body = good["baseline"]
    broken = {"garbage body": _corrupt_body(body), "truncated": body[: len(body) // 2],
              "no EOI": body[:-2], "cut in a header segment": body[:40], "not a JPEG": b"GIF89a" + body[6:],
              "segment longer than the file": body[:4] + b"\xff\xe0\xff\xff" + body[8:]}
    for name, data in broken.items():
        assert not jpeg_structure_ok(data), name
        try:
            assert not probe(data).device_decodable, name
        except DecodeError:
            pass  # not even a header: skipped before any decoder


def test_a_corrupt_body_never_reaches_the_device_decoder(tmp_path: Path, monkeypatch) -> None:
    """The CPU path's verdict on a corrupt JPEG (skip and count) holds in data.decode=gpu however the device
    decoder would treat it: the sample is routed to the worker's CPU decoder, never to decode_jpegs."""
    seen: list[int] = []
    real = device_batch.decode_jpegs

    def spy(encoded, device):
        seen.extend(len(t) for t in encoded)
        return real(encoded, device)

    monkeypatch.setattr(device_batch, "decode_jpegs", spy)
    corrupt = _corrupt_body(_jpeg(2))
    url = write_shards(tmp_path / "d", [8], {2: corrupt})
    stream, batches = _run(url, "gpu", workers=0)
    assert len(corrupt) not in seen and seen  # the others were decoded as a batch
    assert stream.skip_counts()["skipped_samples"] == 1
    assert "s0002" not in {k for b in batches for k in b.keys}
