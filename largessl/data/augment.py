"""One augmentation factory for every method: recipes are lists of :class:`ViewSpec` parameters.

Recipes (``data.augment``):

- ``barlow_twins`` (= BYOL's, Barlow Twins §2.2): RandomResizedCrop scale (0.08, 1) bicubic, flip,
  ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p=(1.0, 0.1), solarize p=(0, 0.2).
- ``vicreg``: the same ops symmetrised (VICReg App. C.1): blur p=0.5 and solarize p=0.1 on every view.
- ``decorrelation`` (Shuffled-DBN §4.1) and ``simsiam``: scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1)
  p=0.8, grayscale p=0.2, blur p=0.5, no solarize.
- ``small``: 32/64-px CIFAR-style: scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, no blur.
- ``digits``: ``small`` without the horizontal flip, for glyphs (digits, characters), whose mirror images are
  other classes or no class; the demo's recipe (a flip-invariant encoder scores below random init there).
- ``multicrop``: two global views (BYOL's asymmetric pair, scale (0.14, 1)) plus ``num_views - 2`` local
  views at 96/224 of the size, scale (0.05, 0.14), blur p=0.5.
- ``none``: center crop only, every view identical (for collapse experiments and sanity checks).

With ``num_views = M`` views, view m uses the recipe's spec ``m mod len(specs)`` (multi-view method).

Two stages, shared by both data paths (``data.decode``):

1. :func:`draw_params` draws every random parameter of a sample's views from one ``random.Random``
   (seeded per sample by the stream) given only the image size from the header: crop boxes, flips,
   blur sigmas, colour-jitter order and factors, grayscale and solarize flags (:class:`ViewParams`).
2. The views are made from those parameters: here on the CPU, one sample at a time in the loader
   workers (:class:`ViewTransform`), or for a whole batch on the device
   (:mod:`largessl.data.batched_augment`). Same parameters, same operations; docs/data.md measures
   how far the pixels differ.

The CPU path follows torchvision's transforms on PIL images, op for op: crop + resize is torchvision's
``resized_crop`` (crop, then antialiased bicubic resize); ColorJitter applies brightness, contrast (around the
mean grey), saturation and hue (in 8-bit HSV, ``h += int(f·255) mod 256``) in a random order, each
rounded and clamped to 8 bits; then grayscale (ITU-R 601 luma), Gaussian blur, solarize (>= 128) and
ToTensor + Normalize fused into one multiply-add. Speed (``largessl bench data``): JPEGs are decoded
at reduced size in the DCT when every view's crop allows it (1/2, 1/4, 1/8, as PIL's ``draft``); with
the ``fast`` extra installed, JPEGs are decoded by simplejpeg and colour, blur, solarize and the tensor
conversion run in OpenCV's SIMD code; crop + resize is PyTorch's uint8 antialiased bicubic kernel
in every backend (OpenCV's cubic resize is not antialiased, PIL's is 4x slower). Without OpenCV the
ops run in PIL (``backend="pil"``); blur is then PIL's box approximation of a Gaussian instead of
OpenCV's true Gaussian kernel.
"""

from __future__ import annotations

import io as pyio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, ImageStat

from largessl.data.decode import DecodeError, decode_cpu, draft_reduce, opencv_available, probe

__all__ = ["DecodeError", "ViewParams", "ViewSpec", "ViewTransform", "build_eval_transform", "build_views",
           "draw_params", "recipe_specs"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RECIPES = ("barlow_twins", "vicreg", "decorrelation", "simsiam", "small", "digits", "multicrop", "none")
EVAL_KINDS = ("eval", "train_linear")

BACKENDS = ("auto", "opencv", "pil")
# ColorJitter's four ops (the order of a sample's ops is drawn, as torchvision does)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# ITU-R 601 luma weights (PIL's convert("L"), OpenCV's RGB2GRAY)
_GRAY = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128


@dataclass(frozen=True)
class ViewSpec:
    """Parameters of one view; recipes differ only in these values."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop: str = "random"
    """random (RandomResizedCrop) or center (resize + center crop of ``center_fraction`` of the short side)."""
    center_fraction: float = 0.875
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """In pixels at 224 px; scaled with ``size`` (BYOL's kernel is 23 px ≈ 10% of the crop)."""
    solarize_p: float = 0.0


def recipe_specs(recipe: str, image_size: int, num_views: int, min_scale: float = 0.0) -> list[ViewSpec]:
    """The ``num_views`` view specs of ``recipe`` at ``image_size`` (``min_scale`` > 0 overrides the crop scale)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (got {image_size})")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1 (got {num_views})")
    s = image_size
    byol = ViewSpec(s, blur_p=1.0), ViewSpec(s, blur_p=0.1, solarize_p=0.2)
    simsiam = ViewSpec(s, scale=(0.2, 1.0), saturation=0.4, blur_p=0.5)
    if recipe == "barlow_twins":
        base: list[ViewSpec] = list(byol)
    elif recipe == "vicreg":
        base = [ViewSpec(s, blur_p=0.5, solarize_p=0.1)]
    elif recipe in ("decorrelation", "simsiam"):
        base = [simsiam]
    elif recipe == "small":
        base = [ViewSpec(s, scale=(0.2, 1.0), saturation=0.4)]
    elif recipe == "digits":
        base = [ViewSpec(s, scale=(0.2, 1.0), saturation=0.4, flip_p=0.0)]
    elif recipe == "none":
        base = [ViewSpec(s, crop="center", center_fraction=1.0 if s <= 64 else 0.875, flip_p=0.0, jitter_p=0.0,
                         gray_p=0.0)]
    else:  # multicrop
        if num_views < 2:
            raise ValueError("the multicrop recipe needs num_views >= 2 (two global views plus local ones)")
        glob = [replace(v, scale=(0.14, 1.0)) for v in byol]
        local = ViewSpec(max(8, round(s * 96 / 224)), scale=(0.05, 0.14), blur_p=0.5)
        specs = glob + [local] * (num_views - 2)
        return [replace(v, scale=(min_scale, v.scale[1])) if min_scale > 0 and v in glob else v for v in specs]
    specs = [base[m % len(base)] for m in range(num_views)]
    if min_scale > 0:
        specs = [replace(v, scale=(min_scale, v.scale[1])) for v in specs]
    return specs


def _crop_box(w: int, h: int, spec: ViewSpec, rng: random.Random) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in source pixels: RandomResizedCrop's sampling, or a center crop."""
    if spec.crop == "center":
        side = min(w, h) * spec.center_fraction
        left, top = (w - side) / 2, (h - side) / 2
        return left, top, left + side, top + side
    area = w * h
    log_r = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    # fallback: the whole image clamped to the ratio range, centred (as torchvision does)
    in_ratio = w / h
    if in_ratio < spec.ratio[0]:
        cw, ch = w, int(round(w / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        ch, cw = h, int(round(h * spec.ratio[1]))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view, drawn by :func:`draw_params` before any pixel is touched."""

    box: tuple[float, float, float, float]
    """Crop (left, top, right, bottom) in pixels of the full-size image."""
    flip: bool
    blur_sigma: float
    """Gaussian blur sigma in output pixels; 0 = no blur."""
    colour: tuple[tuple[int, float], ...]
    """ColorJitter ops in application order: (BRIGHTNESS|CONTRAST|SATURATION, factor) or (HUE, shift in turns)."""
    gray: bool
    solarize: bool


def _draw_colour(spec: ViewSpec, rng: random.Random) -> tuple[tuple[tuple[int, float], ...], bool]:
    jitter = rng.random() < spec.jitter_p
    gray = rng.random() < spec.gray_p
    ops: list[tuple[int, float]] = []
    if jitter:
        order = [BRIGHTNESS, CONTRAST, SATURATION, HUE]
        rng.shuffle(order)  # ColorJitter applies its four ops in a random order
        for op in order:
            if op == HUE:
                if spec.hue > 0:
                    ops.append((HUE, rng.uniform(-spec.hue, spec.hue)))
                continue
            strength = (spec.brightness, spec.contrast, spec.saturation)[op]
            if strength > 0:
                ops.append((op, rng.uniform(max(0.0, 1 - strength), 1 + strength)))
    return tuple(ops), gray


def draw_params(width: int, height: int, specs: Sequence[ViewSpec], rng: random.Random) -> list[ViewParams]:
    """The views' random parameters for a ``width`` × ``height`` image; both data paths draw them this way.

    Order of the draws: every view's crop, then per view flip, blur, colour jitter + grayscale, solarize.
    """
    boxes = [_crop_box(width, height, spec, rng) for spec in specs]
    out = []
    for box, spec in zip(boxes, specs):
        flip = bool(spec.flip_p) and rng.random() < spec.flip_p
        sigma = 0.0
        if spec.blur_p and rng.random() < spec.blur_p:
            sigma = rng.uniform(*spec.blur_sigma) * spec.size / 224
        colour, gray = _draw_colour(spec, rng)
        solarize = bool(spec.solarize_p) and rng.random() < spec.solarize_p
        out.append(ViewParams(box, flip, sigma, colour, gray, solarize))
    return out


def hue_shift_8bit(shift: float) -> int:
    """The 8-bit hue offset of a shift in turns: torchvision on PIL images adds ``int(shift·255)`` mod 256."""
    return int(shift * 255) % 256


def resize_crop(img: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Crop ``box`` (rounded to whole pixels) of an RGB uint8 HWC array and resize it to ``size`` × ``size``.

    torchvision's ``resized_crop`` semantics: crop, then antialiased bicubic resize (PyTorch's uint8 kernel,
    within one level of PIL's ``resize`` and about 4x faster).
    """
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = torch.from_numpy(img[y0:y1, x0:x1]).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def _saturation_matrix(f: float) -> list[list[float]]:
    return [[f * (i == j) + (1 - f) * _GRAY[j] for j in range(3)] for i in range(3)]


class _PILOps:
    """Pure-PIL view ops (the fallback when OpenCV is missing); images are PIL RGB images."""

    name = "pil"

    def decode(self, data: bytes, reduce: int) -> Image.Image:
        try:
            img = Image.open(pyio.BytesIO(data))
            if reduce > 1 and img.format == "JPEG":
                w, h = img.size
                img.draft("RGB", (max(1, w // reduce), max(1, h // reduce)))
            return img.convert("RGB")  # decodes (and raises on corrupt or truncated data)
        except Exception as e:
            raise DecodeError(f"cannot decode image ({e})") from None

    def from_pil(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB")

    def size(self, img: Image.Image) -> tuple[int, int]:
        return img.size

    def resize(self, img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
        return Image.fromarray(resize_crop(np.array(img), box, size))  # np.array: a writable copy for torch

    def flip(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def affine(self, img: Image.Image, m: list[list[float]], t: float) -> Image.Image:
        return img.convert("RGB", tuple(v for row in m for v in (*row, t)))  # rounds and clamps to 0..255

    def mean_grey(self, img: Image.Image) -> float:
        return int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)

    def hue(self, img: Image.Image, shift: int) -> Image.Image:
        h, s, v = img.convert("HSV").split()
        h = h.point([(i + shift) % 256 for i in range(256)])
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    def gray(self, img: Image.Image) -> Image.Image:
        return img.convert("L").convert("RGB")

    def blur(self, img: Image.Image, sigma: float) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(sigma))

    def solarize(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, SOLARIZE_THRESHOLD)

    def planes(self, img: Image.Image) -> torch.Tensor:
        # planar bytes straight from PIL's bands (no strided HWC→CHW copy)
        w, h = img.size
        return torch.stack([torch.frombuffer(bytearray(b.tobytes()), dtype=torch.uint8) for b in img.split()]
                           ).view(3, h, w)


class _OpenCVOps:
    """OpenCV view ops on RGB uint8 HWC arrays (the ``fast`` extra)."""

    name = "opencv"

    def __init__(self) -> None:
        import cv2

        cv2.setNumThreads(1)  # one loader worker = one core; OpenCV's own thread pool would oversubscribe
        self.cv2 = cv2
        self.solarize_lut = np.array([255 - i if i >= SOLARIZE_THRESHOLD else i for i in range(256)], np.uint8)
        self.hue_luts: dict[int, np.ndarray] = {}

    def decode(self, data: bytes, reduce: int) -> np.ndarray:
        return decode_cpu(data, reduce)  # simplejpeg if installed, else PIL

    def from_pil(self, img: Image.Image) -> np.ndarray:
        return np.array(img.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays

    def size(self, img: np.ndarray) -> tuple[int, int]:
        return img.shape[1], img.shape[0]

    def resize(self, img: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
        return resize_crop(img, box, size)

    def flip(self, img: np.ndarray) -> np.ndarray:
        return self.cv2.flip(img, 1)

    def affine(self, img: np.ndarray, m: list[list[float]], t: float) -> np.ndarray:
        mat = np.array([[*row, t] for row in m], dtype=np.float32)
        return self.cv2.transform(img, mat)  # saturating: rounds and clamps to 0..255

    def mean_grey(self, img: np.ndarray) -> float:
        r, g, b = self.cv2.mean(img)[:3]
        return int(_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b + 0.5)

    def hue(self, img: np.ndarray, shift: int) -> np.ndarray:
        cv2 = self.cv2
        lut = self.hue_luts.get(shift)
        if lut is None:
            ident = np.arange(256, dtype=np.uint8)
            lut = self.hue_luts[shift] = np.stack([(ident + shift).astype(np.uint8), ident, ident], -1)[:, None]
        # *_FULL: hue in 0..255 as PIL's HSV mode, so the 8-bit shift is the same
        return cv2.cvtColor(cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL), lut), cv2.COLOR_HSV2RGB_FULL)

    def gray(self, img: np.ndarray) -> np.ndarray:
        cv2 = self.cv2
        return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)

    def blur(self, img: np.ndarray, sigma: float) -> np.ndarray:
        # edge replication at the border, as PIL's blur; kernel radius round(3 sigma), OpenCV's rule for 8 bits
        return self.cv2.GaussianBlur(img, (0, 0), sigma, borderType=self.cv2.BORDER_REPLICATE)

    def solarize(self, img: np.ndarray) -> np.ndarray:
        return self.cv2.LUT(img, self.solarize_lut)

    def planes(self, img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack(self.cv2.split(img)))


_OPS: dict[str, Any] = {}


def _ops(backend: str) -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"unknown CPU augmentation backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "opencv" if opencv_available() else "pil"
    if backend == "opencv" and not opencv_available():
        raise RuntimeError("the opencv backend needs opencv-python-headless >= 4.11: pip install 'largessl[fast]'")
    if backend not in _OPS:
        _OPS[backend] = _OpenCVOps() if backend == "opencv" else _PILOps()
    return _OPS[backend]


def make_view(ops: Any, img: Any, box: tuple[float, float, float, float], spec: ViewSpec, p: ViewParams
              ) -> torch.Tensor:
    """One uint8 (3, S, S) view of a decoded image with ``ops`` (torchvision's order of transforms)."""
    v = ops.resize(img, box, spec.size)
    if p.flip:
        v = ops.flip(v)
    for op, f in p.colour:
        if op == BRIGHTNESS:
            v = ops.affine(v, [[f * (i == j) for j in range(3)] for i in range(3)], 0.0)
        elif op == CONTRAST:
            v = ops.affine(v, [[f * (i == j) for j in range(3)] for i in range(3)], (1 - f) * ops.mean_grey(v))
        elif op == SATURATION:
            v = ops.affine(v, _saturation_matrix(f), 0.0)
        else:
            shift = hue_shift_8bit(f)
            if shift:
                v = ops.hue(v, shift)
    if p.gray:
        v = ops.gray(v)
    if p.blur_sigma > 0:
        v = ops.blur(v, p.blur_sigma)
    if p.solarize:
        v = ops.solarize(v)
    return ops.planes(v)


class ViewTransform:
    """Encoded bytes (or a PIL image) → list of normalised float views, one per :class:`ViewSpec`."""

    def __init__(self, specs: Sequence[ViewSpec], backend: str = "auto") -> None:
        if not specs:
            raise ValueError("a view transform needs at least one view spec")
        self.specs = list(specs)
        self.ops = _ops(backend)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.scale = 1 / (255 * std)
        self.offset = -mean / std

    @property
    def backend(self) -> str:
        """The CPU ops in use: ``opencv`` or ``pil``."""
        return self.ops.name

    def __repr__(self) -> str:
        return f"ViewTransform({self.specs!r}, backend={self.backend!r})"

    def decode(self, data: bytes, rng: random.Random | None = None) -> list[torch.Tensor]:
        """Decode encoded image bytes (reduced-size when the crops allow) and make the views."""
        info = probe(data)
        params = draw_params(info.width, info.height, self.specs, rng or random.Random())
        # the smallest source/output ratio over the views bounds how much the JPEG may be downscaled
        factor = min(min(p.box[2] - p.box[0], p.box[3] - p.box[1]) / spec.size
                     for p, spec in zip(params, self.specs))
        reduce = draft_reduce(info.width, info.height, factor) if info.jpeg else 1
        img = self.ops.decode(data, reduce)
        return self._views(img, params, info.width, info.height)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> list[torch.Tensor]:
        """The views of ``img``; ``rng`` makes them reproducible (one per sample, seeded by the stream)."""
        w, h = img.size
        params = draw_params(w, h, self.specs, rng or random.Random())
        return self._views(self.ops.from_pil(img), params, w, h)

    def _views(self, img: Any, params: list[ViewParams], w: int, h: int) -> list[torch.Tensor]:
        dw, dh = self.ops.size(img)  # smaller than (w, h) after a DCT-domain reduction
        sx, sy = dw / w, dh / h
        out = []
        for p, spec in zip(params, self.specs):
            b = p.box
            v = make_view(self.ops, img, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy), spec, p)
            out.append(v.float().mul_(self.scale).add_(self.offset))
        return out


def build_views(recipe: str, image_size: int, num_views: int, min_scale: float = 0.0,
                backend: str = "auto") -> ViewTransform:
    """The view transform of ``recipe``: a callable PIL.Image → list of ``num_views`` tensors."""
    return ViewTransform(recipe_specs(recipe, image_size, num_views, min_scale), backend)


def build_eval_transform(kind: str, image_size: int, backend: str = "auto") -> ViewTransform:
    """Single-view transforms for evaluation: ``eval`` (resize + center crop) or ``train_linear`` (crop + flip)."""
    if kind == "eval":
        frac = 1.0 if image_size <= 64 else 0.875  # small images are evaluated whole, ImageNet at 224/256
        spec = ViewSpec(image_size, crop="center", center_fraction=frac, flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    elif kind == "train_linear":
        scale = (0.2, 1.0) if image_size <= 64 else (0.08, 1.0)
        spec = ViewSpec(image_size, scale=scale, jitter_p=0.0, gray_p=0.0)
    else:
        raise ValueError(f"unknown eval transform {kind!r}; allowed: {', '.join(EVAL_KINDS)}")
    return ViewTransform([spec], backend)
