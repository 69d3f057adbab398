"""The ``data.decode=gpu`` stage: workers hand over encoded batches, the main process decodes and augments them.

Worker side (:class:`BatchEncoder`, inside each DataLoader worker): read the header of every sample
(no decoding), draw its views' parameters with the same per-sample generator as the CPU path, and
pack the encoded JPEGs into one contiguous ``uint8`` tensor (pinned by the loader). Samples the device
decoder cannot take (PNG & co., CMYK JPEGs, JPEGs whose marker structure is broken or truncated) are decoded here on the CPU.
Samples without an image, with an unreadable label or that are not images are counted and logged as
the CPU path does.

Main-process side (:class:`DeviceStage`): decode the batch's JPEGs with one
``torchvision.io.decode_jpeg`` call on the training device (nvJPEG on CUDA), replace undecodable
samples exactly as the CPU path's ``_make_batch`` does (by a good sample of the same batch, or the
worker's last good sample, with views re-drawn from the salted generator), and run
:class:`~largessl.data.batched_augment.BatchedViews`. On CUDA all of this is queued on a side stream
one batch ahead, so the next batch is decoded and augmented while the current step runs; the
consumer's stream waits on an event and the tensors are recorded on it (``record_stream``).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from largessl.data.augment import ViewSpec, draw_params
from largessl.data.batch import Batch
from largessl.data.batched_augment import NUM_PARAMS, BatchedViews, pack_params
from largessl.data.decode import DecodeError, decode_cpu, decode_jpegs, probe
from largessl.nn.host_sync import host_side, to_device

log = logging.getLogger(__name__)

SampleRng = Callable[[int, int, int], random.Random]
"""``(epoch, gid, salt) -> Random``: the CPU path's per-sample generator (``stream._rng("aug", seed, ...)``)."""


@dataclass
class _Source:
    """A good sample that can stand in for a bad one: its decoded image and identity."""

    image: torch.Tensor
    gid: int
    label: int
    key: str
    width: int
    height: int


@dataclass
class EncodedBatch:
    """One worker batch before decoding: verified encoded JPEGs, worker-decoded others, drawn parameters."""

    data: torch.Tensor
    """uint8 (total bytes,): the device-decodable JPEGs of the batch, back to back."""
    lengths: list[int]
    jpeg_rows: list[int]
    """Batch row of each JPEG in ``data``."""
    cpu_images: list[torch.Tensor]
    """uint8 (3, H, W) images decoded in the worker (formats or JPEGs the device decoder does not take)."""
    cpu_rows: list[int]
    sizes: list[tuple[int, int]]
    """(width, height) per row from the header; (0, 0) for bad rows."""
    params: torch.Tensor
    """(B, M, NUM_PARAMS) float64 parameters drawn with salt 0 (zeros for bad rows)."""
    ids: list[int]
    labels: torch.Tensor
    keys: list[str]
    urls: list[str]
    epoch: int
    spare: _Source | None = None
    """The worker's look-ahead sample, only when this batch has no good sample and no earlier one did."""
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def num_good(self) -> int:
        """Rows the worker found readable (decode failures on the device may still remove some)."""
        return len(self.jpeg_rows) + len(self.cpu_rows)

    def pin_memory(self) -> EncodedBatch:
        """Page-locked copies for asynchronous host-to-device copies (DataLoader calls this)."""
        self.data = self.data.pin_memory()
        self.params = self.params.pin_memory()
        self.labels = self.labels.pin_memory()
        self.cpu_images = [t.pin_memory() for t in self.cpu_images]
        if self.spare is not None:
            self.spare.image = self.spare.image.pin_memory()
        return self


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class BatchEncoder:
    """Worker side of ``data.decode=gpu``: samples → :class:`EncodedBatch` (no JPEG is decoded here)."""

    def __init__(self, specs: Sequence[ViewSpec], sample_rng: SampleRng) -> None:
        self.specs = list(specs)
        self.sample_rng = sample_rng

    def draw(self, epoch: int, gid: int, salt: int, width: int, height: int) -> list[list[float]]:
        """Packed parameters of sample ``gid`` (the CPU path draws the same ones from the same generator)."""
        return pack_params(draw_params(width, height, self.specs, self.sample_rng(epoch, gid, salt)))

    def __call__(self, samples: Sequence[Any], ids: Sequence[int], epoch: int, counters: Any,
                 look_ahead: Callable[[], Any] | None) -> EncodedBatch:
        """Encode one batch; ``look_ahead`` (the CPU path's) supplies a spare when no good sample came yet."""
        m = len(self.specs)
        chunks: list[bytes] = []
        jpeg_rows: list[int] = []
        cpu_images: list[torch.Tensor] = []
        cpu_rows: list[int] = []
        sizes: list[tuple[int, int]] = []
        params: list[list[list[float]]] = []
        for i, s in enumerate(samples):
            size = None
            if s is not None and s.image is not None:
                try:
                    info = probe(s.image)
                    if info.device_decodable:
                        chunks.append(s.image)
                        jpeg_rows.append(i)
                    else:  # rare: PNG & co., CMYK or truncated JPEGs: PIL (or OpenCV) decides, as on the CPU path
                        cpu_images.append(_chw(decode_cpu(s.image)))
                        cpu_rows.append(i)
                    size = (info.width, info.height)
                except DecodeError as e:
                    log.warning("skipping undecodable sample %s in %s: %s", s.key, s.url, e)
            elif s is not None:
                log.warning("skipping sample %s in %s: no image or unreadable label", s.key, s.url)
            if size is None:
                counters.skipped_samples += 1
                sizes.append((0, 0))
                params.append([[0.0] * NUM_PARAMS] * m)
            else:
                sizes.append(size)
                params.append(self.draw(epoch, ids[i], 0, *size))
        lengths = [len(c) for c in chunks]
        data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if chunks else \
            torch.empty(0, dtype=torch.uint8)
        batch = EncodedBatch(
            data=data, lengths=lengths, jpeg_rows=jpeg_rows, cpu_images=cpu_images, cpu_rows=cpu_rows, sizes=sizes,
            params=torch.tensor(params, dtype=torch.float64).view(len(samples), m, NUM_PARAMS), ids=list(ids),
            labels=torch.tensor([s.label if s is not None else -1 for s in samples], dtype=torch.long),
            keys=[s.key if s is not None else "" for s in samples], urls=[s.url if s is not None else "" for s in samples],
            epoch=epoch)
        if batch.num_good == 0 and look_ahead is not None:
            s = look_ahead()
            if s is not None:
                img = _chw(decode_cpu(s.image))
                batch.spare = _Source(img, s.gid, s.label, s.key, img.shape[2], img.shape[1])
        return batch


class DeviceStage:
    """Main-process side of ``data.decode=gpu``: :class:`EncodedBatch` → :class:`Batch` of device tensors."""

    def __init__(self, specs: Sequence[ViewSpec], device: torch.device, sample_rng: SampleRng) -> None:
        self.encoder = BatchEncoder(specs, sample_rng)
        self.views = BatchedViews(specs)
        self.device = device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.decode_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        """The stream that is current while nvJPEG allocates its outputs; no kernel of ours is ever queued on it
        (see :meth:`_decode`)."""
        self.fallback: dict[int, _Source] = {}  # per worker, as each CPU worker keeps its own
        self.skipped: dict[int, int] = {}  # decode failures found here, per worker, cumulative
        self.gpu_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        """Set to a list to collect (start, end) CUDA events around each batch's work (``bench data``)."""

    def submit(self, eb: EncodedBatch) -> tuple[Batch, torch.cuda.Event | None]:
        """Queue decoding and augmentation of ``eb`` (on the side stream on CUDA); returns the batch and its event."""
        worker = int(eb.stats.get("worker", 0))
        ctx = torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()
        with ctx:
            start = None
            if self.side is not None and self.gpu_events is not None:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.side)
            batch = self._make(eb, worker)
            event = None
            if self.side is not None:
                event = torch.cuda.Event(enable_timing=start is not None)
                event.record(self.side)
                if start is not None and self.gpu_events is not None:
                    self.gpu_events.append((start, event))
        return batch, event

    def finish(self, batch: Batch, event: torch.cuda.Event | None) -> Batch:
        """Make the consumer's stream wait for ``batch`` and keep its memory alive there."""
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in (*batch.views, batch.labels):
                t.record_stream(current)
        return batch

    def run(self, batches: Iterable[EncodedBatch]) -> Iterator[Batch]:
        """Decoded, augmented batches, one batch ahead (batch k+1 is queued before batch k is handed out)."""
        pending: tuple[Batch, torch.cuda.Event | None] | None = None
        for eb in batches:
            nxt = self.submit(eb)
            if pending is not None:
                yield self.finish(*pending)
            pending = nxt
        if pending is not None:
            yield self.finish(*pending)

    def _on_device(self, src: _Source | None) -> _Source | None:
        """The worker's look-ahead sample (decoded on the CPU in the worker) moved to the training device."""
        if src is None or src.image.device == self.device:
            return src
        return _Source(to_device(src.image, self.device), src.gid, src.label, src.key, src.width,
                       src.height)

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode on the device so that nvJPEG never writes into memory that queued kernels still use.

        What torchvision 0.29 does (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp):
        ``CUDAJpegDecoder::prepare_buffers`` allocates each output with ``torch::empty(..., device(target_device))``,
        i.e. from the caching allocator's pool of the *caller's current stream*; ``decode_images`` then runs on
        the decoder's own stream (``getStreamFromPool`` in its constructor) after
        ``cudaStreamSynchronize(stream)`` of that stream only; ``decode_jpegs_cuda`` finally makes the caller's
        stream wait (``event.record(cudaJpegDecoder->stream); event.block(current_stream)``). Nothing makes the
        decoder wait for the caller's stream. Called on our side stream, the allocator could hand the decoder
        blocks just freed there (the previous batch's augmentation temporaries) whose kernels are still queued:
        nvJPEG would overwrite them, or they it.

        So the call runs with ``decode_stream`` current, a stream on which nothing of ours is queued: a block of
        its pool is reused only once everything that used it has finished, because the decoded images are
        recorded on the side stream that consumes them (``record_stream``: the allocator then waits for the
        side stream's event before reusing the block, checked on the host without blocking). The side stream
        waits for the decoder through ``decode_stream`` (torchvision's ``event.block``) before using them.
        """
        if self.decode_stream is None or self.side is None or not encoded:
            return decode_jpegs(encoded, self.device)
        with torch.cuda.stream(self.decode_stream):
            images = decode_jpegs(encoded, self.device)
        self.side.wait_stream(self.decode_stream)
        for img in images:
            if img is not None:
                img.record_stream(self.side)
        return images

    def _make(self, eb: EncodedBatch, worker: int) -> Batch:
        n = len(eb.ids)
        encoded = list(torch.split(eb.data, eb.lengths)) if eb.lengths else []
        images: list[torch.Tensor | None] = [None] * n
        for row, img in zip(eb.jpeg_rows, self._decode(encoded)):
            images[row] = img
            if img is None:
                log.warning("skipping undecodable sample %s in %s: JPEG decoding failed", eb.keys[row], eb.urls[row])
                self.skipped[worker] = self.skipped.get(worker, 0) + 1
        for row, img in zip(eb.cpu_rows, eb.cpu_images):
            images[row] = to_device(img, self.device)
        good = [i for i in range(n) if images[i] is not None]
        params, keys, sizes = eb.params, list(eb.keys), list(eb.sizes)
        host_labels: list[int] = eb.labels.tolist()  # host data: labels and parameters never wait for the device
        if good:
            j = good[-1]
            self.fallback[worker] = _Source(images[j], eb.ids[j], host_labels[j], keys[j], *sizes[j])
        if len(good) < n:
            # the CPU path's rule (stream._ShardDataset._make_batch): bad row i takes good[i mod len(good)],
            # else the worker's last good sample, else its look-ahead; views from the generator salted with id + 1
            src_of: Callable[[int], _Source]
            if good:
                def src_of(i: int) -> _Source:
                    j = good[i % len(good)]
                    return _Source(images[j], eb.ids[j], host_labels[j], eb.keys[j], *eb.sizes[j])  # type: ignore[arg-type]
            else:
                fb = self.fallback.get(worker) or self._on_device(eb.spare)
                if fb is None:
                    raise RuntimeError(f"no decodable sample left in this worker's {n}-sample batch or after it; the "
                                       "shards are unreadable: check them with `largessl shards verify`")
                self.fallback[worker] = fb

                def src_of(i: int) -> _Source:
                    return fb
            params = params.clone()
            for i in range(n):
                if images[i] is None:
                    src = src_of(i)
                    images[i] = src.image
                    with host_side():
                        params[i] = torch.tensor(self.encoder.draw(eb.epoch, src.gid, eb.ids[i] + 1, src.width,
                                                                   src.height), dtype=torch.float64)
                    host_labels[i], keys[i] = src.label, src.key
        views = self.views([img for img in images if img is not None], params)
        stats = dict(eb.stats)
        stats["skipped_samples"] = int(stats.get("skipped_samples", 0)) + self.skipped.get(worker, 0)
        labels = eb.labels if len(good) == n else torch.tensor(host_labels, dtype=torch.long)
        return Batch(views=views, labels=to_device(labels, self.device), keys=keys, stats=stats)
