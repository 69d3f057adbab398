"""data.decode=gpu on a CUDA device: nvJPEG decode, batched views on the GPU, the side-stream stage (GPU tier).

Each test prints the measured differences (run with ``-s`` to see them): they are the GPU rows of
docs/data.md's fidelity table.
"""

from __future__ import annotations

import io as pyio
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from largessl.data.augment import draw_params, recipe_specs
from largessl.data.batched_augment import BatchedViews, params_tensor
from largessl.data.config import DataConfig
from largessl.data.decode import decode_jpegs, probe
from largessl.data.manifest import read_manifest, write_manifest
from largessl.data.stream import build_train_stream
from largessl.data.writer import SourceSample, write_shard

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: the GPU data-path tests need one")]
pytestmark.append(pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"))
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _jpeg(i: int, size: tuple[int, int] = (500, 375), quality: int = 90) -> bytes:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    src = Image.fromarray(photos[i % 3])
    r = random.Random(i)
    w, h = size if r.random() < 0.7 else size[::-1]
    zoom = r.uniform(0.7, 1.0)
    cw, ch = int(src.width * zoom), int(src.height * zoom)
    x0, y0 = r.randint(0, src.width - cw), r.randint(0, src.height - ch)
    img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
    buf = pyio.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _shards(dest: Path, n: int, bad: dict[int, bytes] | None = None) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    rows, k = [], 0
    for s, count in enumerate((n // 2, n - n // 2)):
        samples = [SourceSample(f"s{k + i:04d}", (bad or {}).get(k + i, _jpeg(k + i, (128, 96))), (k + i) % 3)
                   for i in range(count)]
        rows.append({"url": f"p{s}.tar", **write_shard(str(dest / f"p{s}.tar"), samples)})
        k += count
    write_manifest(str(dest / "manifest.json"), rows, ["a", "b", "c"])
    return str(dest / "manifest.json")


def test_nvjpeg_decode_against_libjpeg_turbo() -> None:
    data = [torch.frombuffer(bytearray(_jpeg(i)), dtype=torch.uint8) for i in range(12)]
    gpu = decode_jpegs(data, torch.device("cuda"))
    cpu = decode_jpegs(data, torch.device("cpu"))
    diffs = [(g.cpu().int() - c.int()).abs() for g, c in zip(gpu, cpu)]
    mean = float(np.mean([d.float().mean().item() for d in diffs]))
    worst = max(int(d.max()) for d in diffs)
    print(f"nvJPEG vs libjpeg-turbo (12 JPEGs 500x375 q90): mean {mean:.3f} levels, max {worst}")
    assert all(g.is_cuda and g.shape == c.shape for g, c in zip(gpu, cpu))
    assert mean < 1.5


def test_a_corrupt_jpeg_never_fails_the_batch_on_the_gpu() -> None:
    good = [torch.frombuffer(bytearray(_jpeg(i)), dtype=torch.uint8) for i in range(3)]
    raw = bytearray(_jpeg(7))
    sos = raw.index(b"\xff\xda")
    for i in range(sos + 40, len(raw) - 40, 5):
        raw[i] = 0xFF
    assert probe(bytes(raw)).device_decodable
    out = decode_jpegs([good[0], torch.frombuffer(raw, dtype=torch.uint8), good[1], good[2]], torch.device("cuda"))
    assert out[1] is None and all(t is not None and t.is_cuda for t in (out[0], out[2], out[3]))


def test_batched_views_on_gpu_match_the_cpu_twin() -> None:
    specs = recipe_specs("barlow_twins", 224, 2)
    data = [_jpeg(i) for i in range(16)]
    params = params_tensor([draw_params(probe(d).width, probe(d).height, specs, random.Random(i))
                            for i, d in enumerate(data)])
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    cpu_imgs = decode_jpegs(tensors, torch.device("cpu"))
    gpu_imgs = [t.cuda() for t in cpu_imgs]  # same pixels: isolates the ops from the decoder
    views = BatchedViews(specs)
    a = views(cpu_imgs, params)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        b = views(gpu_imgs, params)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for x, y in zip(a, b):
        d = ((x - y.cpu()) * STD * 255).abs()
        print(f"batched GPU vs CPU twin: mean {d.mean():.4f} levels, max {d.max():.3f}")
        assert d.mean() < 0.05 and d.max() < 2


def test_gpu_stream_yields_device_batches_matching_the_cpu_path(tmp_path: Path) -> None:
    url = _shards(tmp_path / "d", 40, {5: b"not a jpeg"})
    m = read_manifest(url)

    def run(decode: str, device: str) -> list:
        cfg = DataConfig(augment="barlow_twins", image_size=64, num_workers=2, shuffle_buffer=8, decode=decode,
                         pin_memory=True)
        return list(build_train_stream(cfg, m, 8, 0, 1, seed=1, device=device).iterate(0))

    cpu, gpu, again = run("cpu", "cpu"), run("gpu", "cuda"), run("gpu", "cuda")
    assert all(v.is_cuda for b in gpu for v in b.views) and all(b.labels.is_cuda for b in gpu)
    assert [b.keys for b in cpu] == [b.keys for b in gpu] == [b.keys for b in again]
    for x, y in zip(gpu, again):  # deterministic on the GPU too (same decoder, same kernels)
        assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(x.views, y.views))
    d = torch.cat([((u.cpu() - v) * STD * 255).abs().flatten() for x, y in zip(gpu, cpu)
                   for u, v in zip(x.views, y.views)])
    print(f"decode=gpu (nvJPEG, CUDA) vs decode=cpu: mean {d.mean():.3f} levels, "
          f"p99 {torch.quantile(d[:1_000_000], 0.99):.2f}, max {d.max():.1f}")
    assert d.mean() < 2.0
