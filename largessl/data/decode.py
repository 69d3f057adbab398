"""Image decoding for both data paths: header probing, CPU decoders, and the batched device decode.

- :func:`probe` reads a sample's size from its header without decoding it (a JPEG SOF parser in
  Python; PIL's lazy ``Image.open`` for other formats), so crop parameters can be drawn before decoding.
- :func:`decode_cpu` decodes to an RGB ``uint8`` HWC array. JPEGs go through simplejpeg when it is
  installed (the ``fast`` extra), else PIL; both run libjpeg-turbo with the same settings and give
  bit-identical pixels, including DCT-domain downscaling (``reduce`` = 2, 4, 8, chosen exactly as
  PIL's ``draft`` does). simplejpeg runs in strict mode (any libjpeg warning raises) and PIL then
  decides, so a sample is rejected exactly when PIL rejects it. OpenCV's ``imdecode`` is not used:
  it returns an image for JPEGs whose entropy-coded data is corrupt (PIL and torchvision refuse
  them). Other formats always use PIL. ``CPU_DECODERS`` also holds OpenCV and PyTurboJPEG, measured
  by ``largessl bench data --decoders``.
- :func:`decode_jpegs` is the batched path's decoder: ``torchvision.io.decode_jpeg`` on a list of
  encoded tensors (nvJPEG on CUDA, libjpeg-turbo on CPU). If the batched call fails, every sample
  is retried alone and then with PIL on the CPU, so one corrupt JPEG never fails the batch and the
  verdict on a sample is PIL's, as in the CPU path.
"""

from __future__ import annotations

import io as pyio
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# start-of-frame markers (C0-CF except DHT C4, JPG C8, DAC CC): they carry the image size
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class DecodeError(ValueError):
    """The sample's image bytes cannot be decoded (corrupt, truncated or not an image)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an encoded image."""

    width: int
    height: int
    jpeg: bool
    """A JPEG (any); other formats are decoded by PIL."""
    components: int = 3
    """Colour components of a JPEG (1 grey, 3 YCbCr, 4 CMYK/YCCK)."""
    complete: bool = True
    """JPEG only: the marker structure is whole (:func:`jpeg_structure_ok`): every segment fits, the
    entropy-coded data holds no invalid marker, and the end-of-image marker is there (a truncated file has none)."""

    @property
    def device_decodable(self) -> bool:
        """What the batched path hands to ``decode_jpeg``: complete JPEGs with 1 or 3 components."""
        return self.jpeg and self.complete and self.components in (1, 3)


def _jpeg_sof(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame segment, or None when it cannot be found."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if marker in _SOF:
            if i + 10 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return w, h, data[i + 9]
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


# markers that may start a segment or follow a scan's entropy-coded data
_SEGMENT_MARKERS = frozenset(range(0xC0, 0xD0)) | {0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFE} | frozenset(range(0xE0, 0xF0))


def _scan_end(arr: np.ndarray, start: int) -> int:
    """Index of the first marker after ``start`` in entropy-coded data (``0xFF`` then neither a stuffed ``0x00``,
    a restart marker ``0xD0``-``0xD7`` nor a fill ``0xFF``); -1 when there is none."""
    ff = np.flatnonzero(arr[start:-1] == 0xFF) + start
    if not len(ff):
        return -1
    nxt = arr[ff + 1]
    marker = (nxt != 0x00) & (nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7))
    hits = ff[marker]
    return int(hits[0]) if len(hits) else -1


def jpeg_structure_ok(data: bytes) -> bool:
    """Walk a JPEG's whole marker structure (not only the header nvJPEG parses) without decoding it.

    True when every segment's length stays inside the data, each scan's entropy-coded data ends at a marker
    that may follow a scan, and an end-of-image marker closes the image. It fails truncated files and bodies
    whose garbage creates invalid markers (any ``0xFF`` that is not stuffed); a bit flip that keeps the marker
    structure is found only by decoding. Linear in the size, vectorised over the entropy-coded bytes (~0.1 ms
    for a 100 kB JPEG).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    arr = np.frombuffer(data, dtype=np.uint8)
    i, scans = 2, 0
    while i + 1 < n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:
            return scans > 0
        if 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker not in _SEGMENT_MARKERS or i + 4 > n:
            return False
        length = int.from_bytes(data[i + 2:i + 4], "big")
        end = i + 2 + length
        if length < 2 or end > n:
            return False
        if marker == 0xDA:
            scans += 1
            i = _scan_end(arr, end)
            if i < 0:
                return False
        else:
            i = end
    return False


def probe(data: bytes) -> ImageInfo:
    """Size and kind of an encoded image from its header; raises :class:`DecodeError` when it is not an image."""
    sof = _jpeg_sof(data)
    if sof is not None and sof[0] > 0 and sof[1] > 0:
        w, h, comps = sof
        # nvJPEG parses only the header (torchvision does not even check nvjpegJpegStreamParseHeader's status)
        # and can return garbage pixels for a broken body: such JPEGs go to the CPU decoder, which rejects them
        return ImageInfo(w, h, True, comps, complete=jpeg_structure_ok(data))
    from PIL import Image

    try:
        with Image.open(pyio.BytesIO(data)) as img:
            w, h = img.size
    except Exception as e:  # PIL raises several types for garbage input
        raise DecodeError(f"cannot identify image ({e})") from None
    return ImageInfo(w, h, jpeg=False)


def draft_reduce(width: int, height: int, factor: float) -> int:
    """DCT scale (1, 2, 4, 8) for a wanted downscale ``factor``, chosen exactly as PIL's ``draft`` does."""
    if factor < 2:
        return 1
    scale = min(width // math.ceil(width / factor), height // math.ceil(height / factor))
    return next(s for s in (8, 4, 2, 1) if scale >= s)


# ---------------------------------------------------------------------------------------------------
# CPU decoders: bytes -> RGB uint8 (H, W, 3), reduced by ``reduce`` in the DCT where it is > 1


def _decode_pil(data: bytes, reduce: int = 1) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(pyio.BytesIO(data))
        if reduce > 1 and img.format == "JPEG":
            w, h = img.size
            img.draft("RGB", (max(1, w // reduce), max(1, h // reduce)))  # draft then picks exactly ``reduce``
        return np.array(img.convert("RGB"))  # decodes (and raises on corrupt or truncated data); a writable copy
    except Exception as e:
        raise DecodeError(f"cannot decode image ({e})") from None


def _cv2() -> Any:
    import cv2

    return cv2


def _decode_opencv(data: bytes, reduce: int = 1) -> np.ndarray:
    # measured only: OpenCV decodes some corrupt JPEGs without complaint, so its verdicts are not PIL's
    if _jpeg_sof(data) is None:
        return _decode_pil(data, reduce)  # PNG & co.: PIL's conversions (palette, 16-bit, alpha) are the reference
    cv2 = _cv2()
    # IMREAD_REDUCED_GRAYSCALE_n is the bare "reduce by n" bit (16, 32, 48); OR-ing RGB makes it colour
    flag = cv2.IMREAD_COLOR_RGB | {1: 0, 2: 16, 4: 32, 8: 48}[reduce]
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if out is None:  # OpenCV returns None (it does not raise) on corrupt or truncated data
        raise DecodeError("cannot decode image (OpenCV/libjpeg-turbo rejected it)")
    return out


def _decode_simplejpeg(data: bytes, reduce: int = 1) -> np.ndarray:
    import simplejpeg

    if _jpeg_sof(data) is None:
        return _decode_pil(data, reduce)
    try:
        h, w = simplejpeg.decode_jpeg_header(data)[:2]
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // reduce), min_width=-(-w // reduce),
                                      min_factor=reduce, strict=True)
    except ValueError:
        # strict mode also refuses JPEGs with mere warnings (and CMYK ones): PIL has the last word, as ever
        return _decode_pil(data, reduce)


_TURBO: list[Any] = []


def _decode_turbojpeg(data: bytes, reduce: int = 1) -> np.ndarray:
    if not _TURBO:
        import turbojpeg

        _TURBO.append((turbojpeg, turbojpeg.TurboJPEG()))
    mod, tj = _TURBO[0]
    if _jpeg_sof(data) is None:
        return _decode_pil(data, reduce)
    try:
        return tj.decode(data, pixel_format=mod.TJPF_RGB, scaling_factor=(1, reduce))
    except OSError as e:
        raise DecodeError(f"cannot decode image ({e})") from None


CPU_DECODERS: dict[str, Callable[[bytes, int], np.ndarray]] = {
    "simplejpeg": _decode_simplejpeg, "pil": _decode_pil, "opencv": _decode_opencv, "turbojpeg": _decode_turbojpeg,
}
"""CPU decoders by name; ``simplejpeg`` and ``pil`` are the ones the data path uses, the others are measured only."""


def simplejpeg_available() -> bool:
    """Whether simplejpeg (the ``fast`` extra) can be imported; without it JPEGs are decoded by PIL."""
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    return True


def opencv_available() -> bool:
    """Whether OpenCV (the ``fast`` extra) can be imported; without it the CPU path runs on pure PIL."""
    try:
        cv2 = _cv2()
    except ImportError:
        return False
    return hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV >= 4.11


def decode_cpu(data: bytes, reduce: int = 1, decoder: str = "auto") -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3); ``reduce`` > 1 downscales JPEGs in the DCT (1/2, 1/4, 1/8)."""
    name = ("simplejpeg" if simplejpeg_available() else "pil") if decoder == "auto" else decoder
    return CPU_DECODERS[name](data, reduce)


# ---------------------------------------------------------------------------------------------------
# The batched path's decoder


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:  # what libjpeg-turbo/nvJPEG refuse may still be an image PIL reads (the CPU path's verdict)
        arr = _decode_pil(data.numpy().tobytes())
    except DecodeError:
        return None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device, non_blocking=True)


def decode_jpegs(encoded: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode 1-D uint8 JPEG tensors (on the CPU) to RGB uint8 (3, H, W) on ``device``; None where undecodable."""
    if not encoded:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libjpeg's "corrupt data" warnings: the verdict is made below
        try:
            return list(decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:
            log.debug("batched decode of %d JPEGs failed (%s); decoding one by one", len(encoded), e)
        return [_decode_one(t, device) for t in encoded]
