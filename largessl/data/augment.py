"""One augmentation factory for every method: recipes are lists of :class:`ViewSpec` parameters.

Recipes (``data.augment``):

- ``barlow_twins`` (= BYOL's, Barlow Twins §2.2): RandomResizedCrop scale (0.08, 1) bicubic, flip,
  ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p=(1.0, 0.1), solarize p=(0, 0.2).
- ``vicreg``: the same ops symmetrised (VICReg App. C.1): blur p=0.5 and solarize p=0.1 on every view.
- ``decorrelation`` (Shuffled-DBN §4.1) and ``simsiam``: scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1)
  p=0.8, grayscale p=0.2, blur p=0.5, no solarize.
- ``small``: 32/64-px CIFAR-style: scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, no blur.
- ``multicrop``: two global views (BYOL's asymmetric pair, scale (0.14, 1)) plus ``num_views - 2`` local
  views at 96/224 of the size, scale (0.05, 0.14), blur p=0.5.
- ``none``: center crop only, every view identical (for collapse experiments and sanity checks).

With ``num_views = M`` views, view m uses the recipe's spec ``m mod len(specs)`` (multi-view method).

Speed (``largessl bench data``): the JPEG is decoded once per sample at reduced size when every view's
crop allows it (PIL draft: libjpeg scales by 1/2, 1/4, 1/8 in the IDCT); crop+resize is one PIL resize
with a source box; blur runs in PIL's C code on the 8-bit view; the four colour-jitter ops and grayscale
are all affine in RGB (brightness, saturation, contrast around the view's mean grey, hue as a YIQ
rotation), so they are composed into one 3×4 matrix applied by a single PIL ``convert`` (clamped
once); solarize is a PIL lookup table; ToTensor and Normalize are one fused multiply-add.
Because colour ops are per-pixel affine and blur is spatially linear they commute, so blurring the
8-bit view before colour is the same operation up to the clamping and rounding order; torchvision
clamps after every op and rotates hue in HSV, so pixel values differ slightly, not the distribution of
augmentations the recipes describe.
"""

from __future__ import annotations

import io as pyio
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageFilter, ImageOps, ImageStat

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RECIPES = ("barlow_twins", "vicreg", "decorrelation", "simsiam", "small", "multicrop", "none")
EVAL_KINDS = ("eval", "train_linear")

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses
_GRAY = torch.tensor([0.299, 0.587, 0.114])
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


class DecodeError(ValueError):
    """The sample's image bytes cannot be decoded (corrupt, truncated or not an image)."""


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


def _colour_matrix(spec: ViewSpec, rng: random.Random, mean_rgb: torch.Tensor | Callable[[], torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Affine colour map (A, t) on [0, 1] RGB for jitter + grayscale, or None when the view keeps its colours.

    ``mean_rgb`` (the view's mean colour, or a function computing it) is needed only by contrast.
    """
    jitter = rng.random() < spec.jitter_p
    gray = rng.random() < spec.gray_p
    if not jitter and not gray:
        return None
    a = torch.eye(3)
    t = torch.zeros(3)
    if jitter:
        ops = [0, 1, 2, 3]
        rng.shuffle(ops)  # ColorJitter applies its four ops in a random order
        for op in ops:
            if op == 0 and spec.brightness > 0:
                f = rng.uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness)
                a, t = a * f, t * f
            elif op == 1 and spec.contrast > 0:
                f = rng.uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast)
                # blend with the mean grey of the *current* image; the mean commutes with the affine map
                if callable(mean_rgb):
                    mean_rgb = mean_rgb()
                grey_mean = float(_GRAY @ (a @ mean_rgb + t))
                a, t = a * f, t * f + (1 - f) * grey_mean
            elif op == 2 and spec.saturation > 0:
                f = rng.uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation)
                m = f * torch.eye(3) + (1 - f) * torch.ones(3, 1) * _GRAY[None, :]
                a, t = m @ a, m @ t
            elif op == 3 and spec.hue > 0:
                theta = rng.uniform(-spec.hue, spec.hue) * 2 * math.pi
                c, s = math.cos(theta), math.sin(theta)
                rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
                m = _FROM_YIQ @ rot @ _TO_YIQ
                a, t = m @ a, m @ t
    if gray:
        m = torch.ones(3, 1) * _GRAY[None, :]
        a, t = m @ a, m @ t
    return a, t


class ViewTransform:
    """PIL image (or encoded bytes) → list of normalised float views, one per :class:`ViewSpec`."""

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        if not specs:
            raise ValueError("a view transform needs at least one view spec")
        self.specs = list(specs)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.scale = 1 / (255 * std)
        self.offset = -mean / std

    def __repr__(self) -> str:
        return f"ViewTransform({self.specs!r})"

    def decode(self, data: bytes, rng: random.Random | None = None) -> list[torch.Tensor]:
        """Decode encoded image bytes (reduced-size when the crops allow) and make the views."""
        try:
            img = Image.open(pyio.BytesIO(data))
        except Exception as e:  # PIL raises several types for garbage input
            raise DecodeError(f"cannot identify image ({e})") from None
        return self(img, rng)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> list[torch.Tensor]:
        """The views of ``img``; ``rng`` makes them reproducible (one per sample, seeded by the stream)."""
        rng = rng or random.Random()
        w, h = img.size
        boxes = [_crop_box(w, h, spec, rng) for spec in self.specs]
        # the smallest source/output ratio over the views bounds how much the JPEG may be downscaled
        factor = min(min(b[2] - b[0], b[3] - b[1]) / spec.size for b, spec in zip(boxes, self.specs))
        try:
            if factor >= 2 and getattr(img, "format", None) == "JPEG":
                img.draft("RGB", (math.ceil(w / factor), math.ceil(h / factor)))
            img = img.convert("RGB")  # decodes (and raises on corrupt or truncated data)
        except Exception as e:
            raise DecodeError(f"cannot decode image ({e})") from None
        sx, sy = img.size[0] / w, img.size[1] / h
        return [self._view(img, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy), spec, rng)
                for b, spec in zip(boxes, self.specs)]

    def _view(self, img: Image.Image, box: tuple[float, float, float, float], spec: ViewSpec,
              rng: random.Random) -> torch.Tensor:
        # every op below runs in PIL's C code on the 8-bit view; one float conversion at the end
        v = img.resize((spec.size, spec.size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        if spec.flip_p and rng.random() < spec.flip_p:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if spec.blur_p and rng.random() < spec.blur_p:
            sigma = rng.uniform(*spec.blur_sigma) * spec.size / 224
            v = v.filter(ImageFilter.GaussianBlur(sigma))
        colour = _colour_matrix(spec, rng, lambda: torch.tensor(ImageStat.Stat(v).mean) / 255)
        if colour is not None:
            a, t = colour
            # one affine RGB→RGB conversion (clamped to 0..255) instead of four jitter ops and a grayscale
            m = torch.cat([a, t[:, None] * 255], dim=1).flatten().tolist()
            v = v.convert("RGB", tuple(m))
        if spec.solarize_p and rng.random() < spec.solarize_p:
            v = ImageOps.solarize(v, 128)
        # planar bytes straight from PIL's bands (no strided HWC→CHW copy), then ToTensor + Normalize fused
        planes = [torch.frombuffer(bytearray(b.tobytes()), dtype=torch.uint8) for b in v.split()]
        x = torch.stack(planes).view(3, spec.size, spec.size).float()
        return x.mul_(self.scale).add_(self.offset)


def build_views(recipe: str, image_size: int, num_views: int, min_scale: float = 0.0) -> ViewTransform:
    """The view transform of ``recipe``: a callable PIL.Image → list of ``num_views`` tensors."""
    return ViewTransform(recipe_specs(recipe, image_size, num_views, min_scale))


def build_eval_transform(kind: str, image_size: int) -> ViewTransform:
    """Single-view transforms for evaluation: ``eval`` (resize + center crop) or ``train_linear`` (crop + flip)."""
    if kind == "eval":
        frac = 1.0 if image_size <= 64 else 0.875  # small images are evaluated whole, ImageNet at 224/256
        spec = ViewSpec(image_size, crop="center", center_fraction=frac, flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    elif kind == "train_linear":
        scale = (0.2, 1.0) if image_size <= 64 else (0.08, 1.0)
        spec = ViewSpec(image_size, scale=scale, jitter_p=0.0, gray_p=0.0)
    else:
        raise ValueError(f"unknown eval transform {kind!r}; allowed: {', '.join(EVAL_KINDS)}")
    return ViewTransform([spec])
