"""``largessl bench data``: decoded + augmented views per second per core, every data mode side by side in one run.

Images are ImageNet-like JPEGs (about 500×375, about 110 KB) cut from the real photographs bundled
with scikit-image (no download, no noise images). The same images are read by every mode in one
process, ``torch.set_num_threads(1)``, in interleaved rounds (so machine noise hits all modes alike),
so throughput per process is throughput per core; with ``--workers N`` every mode uses N DataLoader
workers and the figure is divided by N:

- **baseline**: ``torchvision.datasets.ImageFolder`` with its plain PIL loader and the Barlow Twins
  recipe written with torchvision transforms (RandomResizedCrop bicubic, flip, ColorJitter,
  RandomGrayscale, RandomSolarize, ToTensor, Normalize); blur uses PIL's ``ImageFilter.GaussianBlur``
  as the Barlow Twins reference code does (``--baseline-blur torchvision``: ``transforms.GaussianBlur(23)``).
- **cpu**: shards + manifest → :func:`build_train_stream` with ``data.decode=cpu`` (the default): the
  CPU path with the ``fast`` extra when installed (simplejpeg + OpenCV), see :mod:`largessl.data.augment`.
- **cpu_pil**: the same path forced onto its pure-PIL fallback (what runs without the ``fast`` extra).
- **batched_cpu**: ``data.decode=gpu`` on the CPU device: workers read bytes, the main process decodes
  with ``torchvision.io.decode_jpeg`` and runs the batched augmentation on CPU tensors (the CPU twin
  of the GPU path; its dense resampling is made for a GPU, not for a CPU core).
- **batched_gpu** (only when CUDA is available): the same on the GPU. Reported as wall-clock views/s
  with the GPU time the stage takes (CUDA events around each batch's work on its side stream) and
  that time's share of a GPU at 3,000 views/s (BT-R50 at 1,500 images/s on one H100).

``--decoders`` adds decode-only timings of every CPU JPEG decoder that is installed (PIL, simplejpeg,
OpenCV, PyTurboJPEG) at full size and with DCT-domain downscaling by 2. ``--fidelity`` adds the pixel
differences between the paths on the same parameters (docs/data.md), in 8-bit levels.
"""

from __future__ import annotations

import argparse
import io as pyio
import json
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "cat", "colorwheel", "logo")


def _photos() -> list[Any]:
    """RGB photographs bundled with scikit-image (skipping any this version lacks)."""
    try:
        from skimage import data
    except ImportError:
        raise RuntimeError("`largessl bench data` needs scikit-image for its sample photos: pip install scikit-image") from None
    out = []
    for name in SAMPLE_PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            img = fn()
        except Exception as e:  # a sample that needs a download (pooch) in this version: skip it
            log.debug("skipping skimage sample %s: %s", name, e)
            continue
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 256:
            out.append(img[..., :3])
    if not out:
        raise RuntimeError("no usable RGB sample photos found in scikit-image")
    return out


def make_imagenet_like(root: Path, num_images: int, num_classes: int = 4, seed: int = 0,
                       target_kb: float = 110.0) -> dict[str, float]:
    """An ImageFolder tree of ~500×375 JPEGs of about ``target_kb`` KB cut from real photos; returns size stats."""
    from PIL import Image

    rng = random.Random(seed)
    photos = [Image.fromarray(p) for p in _photos()]
    sizes = []
    quality = 95
    for i in range(num_images):
        src = photos[i % len(photos)]
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        # a random zoomed crop of the photo, resized to the ImageNet-typical size
        zoom = rng.uniform(0.7, 1.0)
        cw, ch = min(src.width, int(src.width * zoom)), min(src.height, int(src.height * zoom))
        left, top = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
        img = src.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = pyio.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        # steer quality so the set averages about target_kb (photos differ in detail)
        if len(data) > target_kb * 1024 * 1.1 and quality > 70:
            quality -= 1
        elif len(data) < target_kb * 1024 * 0.9 and quality < 100:
            quality += 1
        d = root / f"class{i % num_classes}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(data)
        sizes.append(len(data))
    return {"num_images": num_images, "mean_kb": sum(sizes) / len(sizes) / 1024}


class _PILBlur:
    """Gaussian blur with a random sigma, PIL implementation (as in the Barlow Twins reference code)."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Any) -> Any:
        from PIL import ImageFilter

        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(random.uniform(*self.sigma)))
        return img


def baseline_transform(image_size: int, blur: str = "pil") -> Callable[[Any], list[torch.Tensor]]:
    """The Barlow Twins / BYOL two-view recipe with torchvision transforms (the reference-style baseline)."""
    from torchvision import transforms as T

    def view(blur_p: float, solarize_p: float) -> Any:
        blur_t = (_PILBlur(blur_p) if blur == "pil"
                  else T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p))
        return T.Compose([
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            blur_t,
            T.RandomSolarize(128, p=solarize_p),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    t1, t2 = view(1.0, 0.0), view(0.1, 0.2)
    return lambda img: [t1(img), t2(img)]


class _Endless:
    """Batches from ``make(epoch)``, moving to the next epoch when one ends."""

    def __init__(self, make: Callable[[int], Any]) -> None:
        self.make, self.epoch, self.it = make, 0, iter(make(0))

    def next(self) -> Any:
        while True:
            try:
                return next(self.it)
            except StopIteration:
                self.epoch += 1
                self.it = iter(self.make(self.epoch))


@dataclass
class _Mode:
    pipe: _Endless
    clock: Callable[[], float]
    sync: Callable[[], None] = lambda: None


def _rounds(modes: dict[str, _Mode], rounds: int, batches: int, views_per_batch: int) -> dict[str, list[float]]:
    """Views/s of each mode over ``rounds`` interleaved rounds (interleaving spreads machine noise evenly)."""
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(rounds):
        for name, mode in modes.items():
            t0 = mode.clock()
            for _ in range(batches):
                mode.pipe.next()
            mode.sync()
            rates[name].append(batches * views_per_batch / (mode.clock() - t0))
    return rates


def decoder_times(images: list[bytes], repeats: int = 2) -> dict[str, dict[str, Any]]:
    """Decode-only ms/image of every installed CPU decoder, full size and at 1/2 scale in the DCT."""
    from largessl.data.decode import CPU_DECODERS

    out: dict[str, dict[str, Any]] = {}
    for name, fn in CPU_DECODERS.items():
        try:
            fn(images[0], 1)
        except ImportError as e:
            out[name] = {"error": f"not installed ({e})"}
            continue
        except Exception as e:  # e.g. PyTurboJPEG without a libjpeg-turbo 3 shared library
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        row: dict[str, Any] = {}
        for label, reduce in (("full_ms", 1), ("half_ms", 2)):
            t0 = time.process_time()
            for _ in range(repeats):
                for data in images:
                    fn(data, reduce)
            row[label] = round((time.process_time() - t0) / (repeats * len(images)) * 1e3, 3)
        out[name] = row
    return out


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    std = torch.tensor([0.229, 0.224, 0.225]).view(-1, 3, 1, 1) if a.dim() == 4 else \
        torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((a - b) * std * 255).abs().flatten()


def _summary(diffs: list[torch.Tensor]) -> dict[str, float]:
    d = torch.cat(diffs).double()
    sample = d[torch.randperm(len(d), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    return {"mean": round(float(d.mean()), 3), "p99": round(float(torch.quantile(sample, 0.99)), 2),
            "max": round(float(d.max()), 1)}


def fidelity_report(images: list[bytes], recipe: str, image_size: int, seeds: int = 2) -> dict[str, Any]:
    """Differences (8-bit levels) between the data paths on the same parameters, stage by stage."""
    import random

    import numpy as np
    from PIL import Image

    from largessl.data import augment
    from largessl.data.augment import ViewTransform, draw_params, make_view, recipe_specs, resize_crop
    from largessl.data.batched_augment import BatchedViews, params_tensor
    from largessl.data.decode import CPU_DECODERS, decode_jpegs, opencv_available, probe

    specs = recipe_specs(recipe, image_size, 2)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
    decoded = decode_jpegs(tensors, torch.device("cpu"))
    out: dict[str, Any] = {"images": len(images), "recipe": recipe, "image_size": image_size}
    # decoders: torchvision's libjpeg-turbo (the batched path on CPU) against PIL's
    out["decode_torchvision_vs_pil_max"] = max(
        int((t.permute(1, 2, 0).int() - torch.from_numpy(CPU_DECODERS["pil"](d, 1)).int()).abs().max())
        for t, d in zip(decoded, images))
    params = [[draw_params(probe(d).width, probe(d).height, specs, random.Random(f"{s}:{i}"))
               for i, d in enumerate(images)] for s in range(seeds)]
    batched = [BatchedViews(specs)(decoded, params_tensor(p)) for p in params]
    backends = ["pil"] + (["opencv"] if opencv_available() else [])
    # crop + resize alone: the batched matrices against PyTorch's uint8 kernel used by the CPU path
    plain = [augment.ViewSpec(image_size, flip_p=0, jitter_p=0, gray_p=0)] * 2
    resize_diffs = []
    for s in range(seeds):
        pp = [[augment.ViewParams(v.box, False, 0.0, (), False, False) for v in row] for row in params[s]]
        ours = BatchedViews(plain)(decoded, params_tensor(pp))
        for i, img in enumerate(decoded):
            hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
            for v in range(2):
                ref = torch.from_numpy(resize_crop(hwc, pp[i][v].box, image_size)).permute(2, 0, 1).float()
                norm = (ref / 255 - torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
                    augment.IMAGENET_STD).view(3, 1, 1)
                resize_diffs.append(_levels(ours[v][i], norm))
    out["resize_batched_vs_cpu"] = _summary(resize_diffs)
    for backend in backends:
        tf = ViewTransform(specs, backend)
        ops_only, end_to_end = [], []
        for s in range(seeds):
            for i, (img, data) in enumerate(zip(decoded, images)):
                hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
                src = tf.ops.from_pil(Image.fromarray(hwc))
                cpu_views = tf.decode(data, random.Random(f"{s}:{i}"))
                for v, spec in enumerate(specs):
                    p = params[s][i][v]
                    view = make_view(tf.ops, src, p.box, spec, p).float().mul_(tf.scale).add_(tf.offset)
                    ops_only.append(_levels(batched[s][v][i], view))
                    end_to_end.append(_levels(batched[s][v][i], cpu_views[v]))
        out[f"ops_batched_vs_{backend}"] = _summary(ops_only)
        out[f"end_to_end_batched_vs_{backend}"] = _summary(end_to_end)
    # hue: the old YIQ rotation against torchvision's HSV shift, on the views' pixels
    import torchvision.transforms.functional as TF

    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    rng = random.Random(0)
    hue_diffs = []
    for img in decoded[:32]:
        x = torch.from_numpy(resize_crop(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), (0, 0, img.shape[2],
                                                                                              img.shape[1]),
                                         image_size)).permute(2, 0, 1).float() / 255
        f = rng.uniform(-0.1, 0.1)
        c, sn = np.cos(2 * np.pi * f), np.sin(2 * np.pi * f)
        m = from_yiq @ torch.tensor([[1.0, 0, 0], [0, c, -sn], [0, sn, c]], dtype=torch.float32) @ to_yiq
        yiq = (m @ x.reshape(3, -1)).reshape_as(x).clamp(0, 1)
        hue_diffs.append((yiq - TF.adjust_hue(x, f)).abs().flatten() * 255)
    out["hue_yiq_vs_hsv"] = _summary(hue_diffs)
    return out


MODES = ("baseline", "cpu", "cpu_pil", "batched_cpu", "batched_gpu")


def run_bench(num_images: int = 256, batch_size: int = 16, image_size: int = 224, workers: int = 0,
              baseline_blur: str = "pil", workdir: str | None = None, rounds: int = 5,
              modes: tuple[str, ...] = MODES, decoders: bool = False, fidelity: bool = False) -> dict[str, Any]:
    """Build the images, run every mode, return the figures (views/s/core of each and its ratio to the baseline).

    With ``workers=0`` the CPU modes run in this process and their clock is this process's CPU time,
    so the figure is per core even on a busy machine; with workers the clock is wall time divided by
    workers. The GPU mode is always timed by the wall clock (its work is on the GPU).
    """
    import PIL
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from largessl.data.augment import build_views
    from largessl.data.config import DataConfig
    from largessl.data.decode import opencv_available, simplejpeg_available
    from largessl.data.manifest import read_manifest
    from largessl.data.stream import build_train_stream
    from largessl.data.writer import write_source

    torch.set_num_threads(1)
    if num_images < 4 * batch_size:
        raise ValueError(f"--images must be at least 4 × --batch-size ({4 * batch_size}) for a stable figure")
    unknown = set(modes) - set(MODES)
    if unknown or "baseline" not in modes:
        raise ValueError(f"--modes must include baseline and be among {', '.join(MODES)} (got {','.join(modes)})")
    gpu = torch.cuda.is_available()
    modes = tuple(m for m in modes if m != "batched_gpu" or gpu)
    cpu_clock = time.process_time if workers == 0 else time.perf_counter
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="largessl-bench-", dir=workdir) as tmp:
        root = Path(tmp) / "folder"
        stats = make_imagenet_like(root, num_images)
        manifest_url = write_source(str(root), str(Path(tmp) / "shards"), shard_bytes=8 << 20, workers=2,
                                    progress=False)
        manifest = read_manifest(manifest_url)

        def stream(decode: str = "cpu", device: str = "cpu", backend: str = "auto") -> Any:
            cfg = DataConfig(augment="barlow_twins", image_size=image_size, num_views=2, num_workers=workers,
                             shuffle_buffer=64, pin_memory=device != "cpu", decode=decode)
            tf = build_views("barlow_twins", image_size, 2, backend=backend) if backend != "auto" else None
            return build_train_stream(cfg, manifest, batch_size, rank=0, world_size=1, seed=0, transform=tf,
                                      device=device)

        pipes: dict[str, _Mode] = {}
        gpu_stream = None
        for name in modes:
            if name == "baseline":
                ds = ImageFolder(str(root), transform=baseline_transform(image_size, baseline_blur))
                loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                    worker_init_fn=_one_thread if workers else None)
                pipes[name] = _Mode(_Endless(lambda _, ld=loader: ld), cpu_clock)
            elif name == "cpu":
                pipes[name] = _Mode(_Endless(stream().iterate), cpu_clock)
            elif name == "cpu_pil":
                pipes[name] = _Mode(_Endless(stream(backend="pil").iterate), cpu_clock)
            elif name == "batched_cpu":
                pipes[name] = _Mode(_Endless(stream("gpu").iterate), cpu_clock)
            else:
                gpu_stream = stream("gpu", "cuda")
                gpu_stream.gpu_events = []
                pipes[name] = _Mode(_Endless(gpu_stream.iterate), time.perf_counter, torch.cuda.synchronize)
        per_round = max(2, num_images // batch_size // 2)
        _rounds(pipes, 1, 2, 2 * batch_size)  # warm-up: workers started, caches filled, kernels loaded
        if gpu_stream is not None:
            torch.cuda.synchronize()
            gpu_stream.gpu_events = []
        rates = _rounds(pipes, rounds, per_round, 2 * batch_size)
        if decoders:
            result["decoders"] = decoder_times([f.read_bytes() for f in sorted(root.rglob("*.jpg"))[:64]])
        if fidelity:
            jpegs = [f.read_bytes() for f in sorted(root.rglob("*.jpg"))[:32]]
            from largessl.data.digits import digit_jpegs

            # the second row lets the CPU path decode at reduced size in the DCT (crops >= 2x the output)
            result["fidelity"] = [fidelity_report(jpegs, "barlow_twins", image_size),
                                  fidelity_report(jpegs, "barlow_twins", 96),
                                  fidelity_report(digit_jpegs(64)[0][:64], "small", 32)]
    cores = max(1, workers)
    base_rates = rates["baseline"]
    table: dict[str, dict[str, Any]] = {}
    for name, r in rates.items():
        ratios = [a / b for a, b in zip(r, base_rates)]
        if name == "batched_gpu":
            row: dict[str, Any] = {"views_per_s": round(statistics.median(r), 1)}
        else:
            row = {"views_per_s_per_core": round(statistics.median(r) / cores, 1)}
        row.update(vs_baseline=round(statistics.median(ratios), 2),
                   vs_baseline_min_max=[round(min(ratios), 2), round(max(ratios), 2)])
        table[name] = row
    if gpu_stream is not None and gpu_stream.gpu_events:
        torch.cuda.synchronize()
        gpu_s = sum(a.elapsed_time(b) for a, b in gpu_stream.gpu_events) / 1e3
        views = 2 * batch_size * len(gpu_stream.gpu_events)
        table["batched_gpu"].update(gpu_ms_per_batch=round(gpu_s / len(gpu_stream.gpu_events) * 1e3, 2),
                                    gpu_share_at_3000_views_per_s=round(gpu_s / views * 3000, 3),
                                    device=torch.cuda.get_device_name())
    ours = table["cpu"]["views_per_s_per_core"] if "cpu" in table else None
    base = table["baseline"]["views_per_s_per_core"]
    result.update({
        "images": stats["num_images"], "mean_jpeg_kb": round(stats["mean_kb"], 1), "image_size": image_size,
        "batch_size": batch_size, "workers": workers, "cores": cores, "baseline_blur": baseline_blur,
        "clock": "process_cpu" if workers == 0 else "wall", "rounds": rounds,
        "cpu_backend": "opencv" if opencv_available() else "pil",
        "cpu_decoder": "simplejpeg" if simplejpeg_available() else "pil", "pillow": PIL.__version__,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "modes": table,
        "largessl_views_per_s_per_core": ours, "baseline_views_per_s_per_core": base,
        "speedup": table["cpu"]["vs_baseline"] if "cpu" in table else None,
    })
    return result


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``largessl bench data``."""
    parser.add_argument("--images", type=int, default=256, help="ImageNet-like JPEGs to generate (default 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers for every mode (0 = in-process: one core)")
    parser.add_argument("--baseline-blur", choices=("pil", "torchvision"), default="pil",
                        help="blur of the baseline: PIL (reference code) or torchvision GaussianBlur(23)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (median reported)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes to run (default all: {','.join(MODES)}; "
                             "batched_gpu only when CUDA is available)")
    parser.add_argument("--decoders", action="store_true", help="also time every installed CPU JPEG decoder")
    parser.add_argument("--fidelity", action="store_true",
                        help="also measure the pixel differences between the paths on the same parameters "
                             "(these images at --image-size, and digits at 32 px)")
    parser.add_argument("--workdir", default=None, help="where to write the temporary images and shards")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Run the data benchmark and log the figures."""
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    res = run_bench(args.images, args.batch_size, args.image_size, args.workers, args.baseline_blur, args.workdir,
                    args.rounds, tuple(m.strip() for m in args.modes.split(",") if m.strip()), args.decoders,
                    args.fidelity)
    log.info("data bench (%d JPEGs ~%.0f KB, %d px, %d core(s), CPU ops %s, decoder %s):", res["images"],
             res["mean_jpeg_kb"], res["image_size"], res["cores"], res["cpu_backend"], res["cpu_decoder"])
    for name, row in res["modes"].items():
        rate = (f"{row['views_per_s']:.1f} views/s (GPU {row.get('gpu_ms_per_batch', 0):.2f} ms/batch)"
                if "views_per_s" in row else f"{row['views_per_s_per_core']:.1f} views/s/core")
        log.info("  %-12s %s, %.2fx baseline", name, rate, row["vs_baseline"])
    print(json.dumps(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m largessl.bench.data` for quick runs
    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
