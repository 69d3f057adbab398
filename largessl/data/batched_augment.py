"""Batched view making (``data.decode=gpu``): the CPU path's operations for a whole batch at once, on any device.

Input: the batch's decoded images (RGB ``uint8`` (3, H, W) tensors, sizes may differ) and the
parameters :func:`largessl.data.augment.draw_params` drew for them on the CPU, packed by
:func:`params_tensor` into a (B, M, 16) tensor. Output: M float tensors (B, 3, S, S), normalised.
Every pixel operation is a batched tensor call; Python loops run over views, over the four
ColorJitter positions and over size buckets, never over samples.

- **Crop + resize**: torchvision's ``resized_crop`` with antialiased bicubic interpolation (the
  weights of PIL's and PyTorch's antialiased resampler: bicubic a = -0.5, support widened by the
  downscale factor, normalised, clipped to the crop) written as two batched matrix products per
  view: ``out = Wy · image · Wxᵀ`` with per-sample (S × H) and (S × W) weight matrices built from the
  crop boxes in one vectorised expression. The horizontal flip is folded into ``Wx`` (its rows
  reversed). Images of different sizes are grouped into size buckets (height and width rounded up
  to ``bucket_px``); each bucket is zero-padded to a common canvas (padding gets zero weight) with
  one ``torch.stack`` or nested-tensor padding call, so the number of calls grows with the number of
  buckets (a handful for ImageNet), not with the batch.
- **ColorJitter** in torchvision's tensor semantics: per position of the drawn order, brightness,
  contrast (around the mean grey) and saturation of all samples are one fused blend
  ``f·x + (1 − f)·target`` with per-sample ``f`` and target, clamped to [0, 1]; the samples whose op
  at that position is hue go through RGB → HSV → RGB with their own shift, as one indexed call.
- **Grayscale** (ITU-R 601 luma), **Gaussian blur** with per-sample sigma (depthwise separable
  convolution, one kernel per sample: radius round(3σ) as OpenCV, edge-replicated borders as the CPU
  path), **solarize** (>= 128/255), and **Normalize**.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from largessl.data.augment import HUE, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, ViewParams, ViewSpec
from largessl.nn.host_sync import host_side, to_device

NUM_PARAMS = 16
"""Columns of a view's packed parameters: box (4), flip, blur sigma, 4 op codes, 4 op factors, gray, solarize."""
_FLIP, _SIGMA, _OPS, _FACTORS, _GRAY, _SOLARIZE = 4, 5, slice(6, 10), slice(10, 14), 14, 15
# torchvision's rgb_to_grayscale weights (tensor semantics)
_LUMA = (0.2989, 0.587, 0.114)


def pack_params(views: Sequence[ViewParams]) -> list[list[float]]:
    """One sample's views as rows of ``NUM_PARAMS`` numbers (op codes: 0 none, 1 + BRIGHTNESS..HUE)."""
    rows = []
    for p in views:
        codes = [float(op + 1) for op, _ in p.colour] + [0.0] * (4 - len(p.colour))
        factors = [f for _, f in p.colour] + [1.0] * (4 - len(p.colour))
        # whole-pixel crops, as the CPU path's resize_crop rounds them (center crops have fractional edges)
        box = [float(round(v)) for v in p.box]
        rows.append([*box, float(p.flip), p.blur_sigma, *codes, *factors, float(p.gray), float(p.solarize)])
    return rows


def params_tensor(per_sample: Sequence[Sequence[ViewParams]]) -> torch.Tensor:
    """(B, M, NUM_PARAMS) float64 tensor of a batch's parameters (drawn on the CPU, one sample at a time)."""
    return torch.tensor([pack_params(v) for v in per_sample], dtype=torch.float64).view(
        len(per_sample), -1, NUM_PARAMS)


def _cubic(t: torch.Tensor) -> torch.Tensor:
    # Keys' cubic convolution kernel with a = -0.5 (PIL's and PyTorch's antialiased bicubic)
    t = t.abs()
    near = (1.5 * t - 2.5) * t * t + 1
    far = -0.5 * (((t - 5) * t + 8) * t - 4)
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resample_weights(lo: torch.Tensor, hi: torch.Tensor, out: int, canvas: int) -> torch.Tensor:
    """(n, out, canvas) antialiased-bicubic weights resampling source pixels ``[lo, hi)`` to ``out`` pixels."""
    scale = (hi - lo) / out
    fscale = scale.clamp(min=1.0)
    support = 2.0 * fscale
    centre = lo[:, None] + scale[:, None] * (torch.arange(out, device=lo.device, dtype=lo.dtype) + 0.5)
    first = torch.maximum(torch.floor(centre - support[:, None] + 0.5), lo[:, None])
    last = torch.minimum(torch.floor(centre + support[:, None] + 0.5), hi[:, None])
    j = torch.arange(canvas, device=lo.device, dtype=lo.dtype)[None, None]
    w = _cubic((j - centre[..., None] + 0.5) / fscale[:, None, None])
    w = w * ((j >= first[..., None]) & (j < last[..., None]))
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (_LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] → HSV with hue in [0, 1) (hexcone model)."""
    r, g, b = x.unbind(1)
    vmax, _ = x.max(1)
    vmin, _ = x.min(1)
    chroma = vmax - vmin
    grey = chroma == 0
    s = chroma / torch.where(grey, torch.ones_like(vmax), vmax)
    c = torch.where(grey, torch.ones_like(chroma), chroma)
    # hue sector by which channel is the maximum (red wins ties, then green)
    h = torch.where(vmax == r, (g - b) / c, torch.where(vmax == g, 2 + (b - r) / c, 4 + (r - g) / c))
    h = torch.where(grey, torch.zeros_like(h), h)
    return torch.stack([torch.remainder(h / 6, 1.0), s, vmax], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    h6 = h * 6
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = torch.remainder(sector, 6).long()
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * frac)).clamp(0, 1)
    t = (v * (1 - s * (1 - frac))).clamp(0, 1)
    # (r, g, b) of the six sectors, picked per pixel with one gather
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                      (v, p, q))], 1)  # (N, 6, 3, H, W)
    idx = sector[:, None, None].expand(-1, 1, 3, -1, -1)
    return table.gather(1, idx).squeeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns per sample (torchvision's ``adjust_hue`` on float tensors)."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift[:, None, None], 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (n, C, H, W) with a per-sample sigma and radius (edge-replicated border).

    ``radius`` lives on the host (the kernel width is a host decision); it reaches the device through pinned
    memory without blocking the host (a pageable ``radius.to(device)`` waited for the GPU on every batch).
    """
    n, c, h, w = x.shape
    with host_side():
        r_max = int(radius.max())
    if r_max == 0:
        return x
    k = torch.arange(-r_max, r_max + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(x.dtype)[:, None]
    kern = torch.exp(-(k[None] ** 2) / (2 * sig * sig)) * (k[None].abs() <= to_device(radius, x.device)[:, None])
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per sample and channel
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (r_max, r_max, 0, 0), mode="replicate"), kern[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, r_max, r_max), mode="replicate"), kern[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def blur_radius(sigma: torch.Tensor) -> torch.Tensor:
    """Kernel radius for ``sigma``: OpenCV's 8-bit rule, kernel size round(6σ + 1) made odd."""
    return (torch.round(sigma * 6 + 1).long() | 1) // 2


def _canvas(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, 3, H_max, W_max) zero-padded stack of (3, H, W) images, in one call."""
    if all(t.shape == images[0].shape for t in images):
        return torch.stack(list(images))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "nested tensors are a prototype": we only pad with them
            return torch.nested.to_padded_tensor(torch.nested.nested_tensor(list(images)), 0)
    except (RuntimeError, NotImplementedError):  # a build without nested padding for this dtype/device
        h, w = max(t.shape[1] for t in images), max(t.shape[2] for t in images)
        out = images[0].new_zeros(len(images), 3, h, w)
        for i, t in enumerate(images):
            out[i, :, :t.shape[1], :t.shape[2]] = t
        return out


class BatchedViews:
    """Decoded uint8 images + packed parameters → M normalised view batches, on the images' device."""

    def __init__(self, specs: Sequence[ViewSpec], bucket_px: int = 128) -> None:
        if not specs:
            raise ValueError("batched views need at least one view spec")
        if bucket_px < 1:
            raise ValueError(f"bucket_px must be >= 1 (got {bucket_px})")
        self.specs = list(specs)
        self.bucket_px = bucket_px
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, std per device

    def buckets(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        """Indices of the samples of each size bucket (``sizes``: (B, 2) width, height on the CPU)."""
        q = self.bucket_px
        cells = (sizes + q - 1) // q
        key = cells[:, 1] * (1 << 20) + cells[:, 0]
        uniq, inverse = torch.unique(key, return_inverse=True)
        return [(inverse == u).nonzero().flatten() for u in range(len(uniq))]

    def __call__(self, images: Sequence[torch.Tensor], params: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``images`` (B tensors (3, H, W) uint8) with ``params`` (B, M, NUM_PARAMS) on the CPU."""
        b, m = len(images), len(self.specs)
        if params.shape != (b, m, NUM_PARAMS):
            raise ValueError(f"params must have shape ({b}, {m}, {NUM_PARAMS}), got {tuple(params.shape)}")
        device = images[0].device
        # float64 to the device first (pinned, no host wait), converted there
        dev = to_device(params, device).to(torch.float32)
        with host_side():  # sizes and buckets are host bookkeeping
            sizes = torch.tensor([[t.shape[2], t.shape[1]] for t in images], dtype=torch.long)
            buckets = self.buckets(sizes)
        outs = [torch.empty(b, 3, s.size, s.size, device=device) for s in self.specs]
        for idx in buckets:
            idx_dev = to_device(idx, device)
            canvas = _canvas([images[i] for i in idx.tolist()]).float()
            _, _, hc, wc = canvas.shape
            p = dev[idx_dev]
            for v, spec in enumerate(self.specs):
                box = p[:, v, :4]
                wy = resample_weights(box[:, 1], box[:, 3], spec.size, hc) / 255  # to [0, 1] on the way
                wx = resample_weights(box[:, 0], box[:, 2], spec.size, wc)
                wx = torch.where(p[:, v, _FLIP, None, None] > 0.5, wx.flip(1), wx)
                out = wy[:, None] @ (canvas @ wx.transpose(1, 2)[:, None])
                outs[v].index_copy_(0, idx_dev, out)
        if device not in self._norm:  # copied to the device once, not per batch
            self._norm[device] = (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device),
                                  torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device))
        mean, std = self._norm[device]
        return [self._pixels(outs[v].clamp_(0, 1), params[:, v], dev[:, v]).sub_(mean).div_(std) for v in range(m)]

    def _pixels(self, x: torch.Tensor, host: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
        """Colour jitter, grayscale, blur and solarize of one view batch (x in [0, 1])."""
        device = x.device
        # Which operations run is decided on the host copy of the parameters (``host``): no host waits.
        with host_side():
            codes_h = host[:, _OPS].round().long()
        codes, factors = dev[:, _OPS].round().long(), dev[:, _FACTORS]
        for pos in range(4):
            ch, c, f = codes_h[:, pos], codes[:, pos], factors[:, pos]
            with host_side():
                any_linear, any_contrast, any_saturation = (bool(((ch >= 1) & (ch <= 3)).any()),
                                                            bool((ch == 2).any()), bool((ch == 3).any()))
                hue = (ch == HUE + 1).nonzero().flatten()
            if any_linear:
                lin = (c >= 1) & (c <= 3)
                fl = torch.where(lin, f, torch.ones_like(f))[:, None, None, None]
                target = torch.zeros_like(x[:, :1])
                if any_contrast:  # contrast: blend with the image's mean grey
                    target = target + (c == 2)[:, None, None, None] * _grey(x).mean((1, 2, 3), keepdim=True)
                if any_saturation:  # saturation: blend with the grey image
                    target = target + (c == 3)[:, None, None, None] * _grey(x)
                x = (fl * x + (1 - fl) * target).clamp_(0, 1)
            if len(hue):
                hue = to_device(hue, device)
                x[hue] = adjust_hue(x[hue], f[hue]).to(x.dtype)
        gray = dev[:, _GRAY, None, None, None] > 0.5
        x = torch.where(gray, _grey(x).expand_as(x), x)
        with host_side():
            blurred = (host[:, _SIGMA] > 0).nonzero().flatten()
            radius = blur_radius(host[blurred, _SIGMA])
            blur = len(blurred) > 0 and int(radius.max()) > 0
        if blur:
            sel = to_device(blurred, device)
            x[sel] = gaussian_blur(x[sel], dev[sel, _SIGMA], radius)
        sol = dev[:, _SOLARIZE, None, None, None] > 0.5
        return torch.where(sol & (x >= SOLARIZE_THRESHOLD / 255), 1 - x, x)
