"""``largessl bench resume``: time to the first batch when a run resumes late in an epoch vs at its start.

A resume must cost the same wherever the epoch stopped: the stream seeks with the shards' sample-offset
indexes to the first sample not yet consumed and decodes nothing that was consumed. The benchmark writes
a synthetic set of ``--shards`` shards (distinct small JPEGs, with indexes, as ``largessl shards write``
makes them), then, in one run and interleaved over ``--rounds`` rounds, builds a fresh training stream
and times ``iterate(epoch, start)`` up to its first batch for:

- **start**: ``start = 0`` (a fresh epoch: the shuffle buffer fills from the first shard);
- **resume**: ``start`` at ``--at`` (default 0.9) of the epoch, with the indexes (what training does);
- **resume, no index**: the same position on the same manifest with the indexes removed (the scanning
  fallback of datasets written before the indexes), to show what the indexes buy.

Every decode is recorded (by content hash, from every loader worker): the report counts decoded samples
that the resumed position had already consumed (must be 0). Goal (issue 13): resume ≤ 1.2 × start.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io as pyio
import json
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from largessl.data.augment import ViewTransform, recipe_specs

log = logging.getLogger(__name__)

GOAL_RATIO = 1.2


class _RecordingViews(ViewTransform):
    """The recipe's views, noting the hash of every sample it decodes in a per-process file."""

    def __init__(self, specs: Any, folder: str) -> None:
        super().__init__(specs)
        self.folder = folder

    def decode(self, data: bytes, rng: random.Random | None = None) -> list[torch.Tensor]:
        with open(os.path.join(self.folder, f"decoded-{os.getpid()}.txt"), "a") as f:
            f.write(hashlib.sha1(data).hexdigest() + "\n")
        return super().decode(data, rng)


def _images(n: int, size: int, seed: int) -> list[bytes]:
    """``n`` distinct JPEGs: smooth random colour fields (a few KB each, like downscaled photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        buf = pyio.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_synthetic_shards(dest: str, shards: int, per_shard: int, image_size: int, seed: int = 0) -> str:
    """The benchmark's dataset: ``shards`` × ``per_shard`` distinct JPEGs with indexes; returns the manifest URL."""
    from concurrent.futures import ThreadPoolExecutor

    from largessl.data import io
    from largessl.data.manifest import MANIFEST_NAME, write_manifest
    from largessl.data.writer import SourceSample, write_shard, write_wids_index

    images = _images(shards * per_shard, image_size, seed)
    samples = [SourceSample(f"{i:08d}", b, i % 10) for i, b in enumerate(images)]
    os.makedirs(dest, exist_ok=True)
    names = [f"bench-{s:06d}.tar" for s in range(shards)]
    with ThreadPoolExecutor(4) as pool:  # the writer's own shard function: tar + index, exactly per_shard each
        results = list(pool.map(lambda s: write_shard(io.join_url(dest, names[s]),
                                                      samples[s * per_shard:(s + 1) * per_shard]), range(shards)))
    rows = [{"url": n, **r} for n, r in zip(names, results)]
    write_wids_index(dest, rows, "bench")
    url = io.join_url(dest, MANIFEST_NAME)
    write_manifest(url, rows, [str(c) for c in range(10)])
    return url


def _first_batch_s(stream: Any, epoch: int, start: int) -> float:
    t0 = time.perf_counter()
    it = stream.iterate(epoch, start)
    next(it)
    dt = time.perf_counter() - t0
    it.close()  # shuts the loader workers down
    return dt


def run_bench(shards: int = 64, per_shard: int = 200, image_size: int = 128, batch_size: int = 64,
              workers: int = 2, shuffle_buffer: int = 1000, at: float = 0.9, rounds: int = 3,
              workdir: str | None = None, crop: int = 96) -> dict[str, Any]:
    """Write the shards, time the first batch at 0 and at ``at`` of the epoch (interleaved), check the decodes."""
    from largessl.data.config import DataConfig
    from largessl.data.manifest import read_manifest
    from largessl.data.stream import build_train_stream, train_worker_plan

    if shards < 1 or per_shard < 1 or not 0 < at < 1 or rounds < 1:
        raise ValueError("--shards and --per-shard must be >= 1, --at in (0, 1), --rounds >= 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="largessl-bench-resume-", dir=workdir) as tmp:
        t0 = time.perf_counter()
        url = write_synthetic_shards(os.path.join(tmp, "shards"), shards, per_shard, image_size)
        log.info("wrote %d shards × %d JPEGs in %.1fs", shards, per_shard, time.perf_counter() - t0)
        manifest = read_manifest(url)
        no_index = dataclasses.replace(manifest, shards=[dataclasses.replace(s, index="") for s in manifest.shards])
        by_hash = {}
        for info in manifest.shards:  # content hash -> key, from the index (the first member is the JPEG)
            data = Path(info.url).read_bytes()
            for line in Path(info.index).read_text().splitlines()[1:]:
                _, off, size, name = line.split()[:4]
                by_hash[hashlib.sha1(data[int(off):int(off) + int(size)]).hexdigest()] = name.split(".")[0]
        cfg = DataConfig(augment="barlow_twins", image_size=crop, num_workers=workers, shuffle_buffer=shuffle_buffer,
                         pin_memory=False)
        decoded_dir = os.path.join(tmp, "decoded")
        os.makedirs(decoded_dir)
        transform = _RecordingViews(recipe_specs(cfg.augment, crop, 2), decoded_dir)
        probe = build_train_stream(cfg, manifest, batch_size, 0, 1, seed=0, transform=transform)
        bpe = probe.batches_per_epoch
        start = int(round(at * bpe))
        if not 0 < start < bpe:
            raise ValueError(f"{bpe} batches per epoch leave no batch at {at:.0%}; write more samples")
        plans = [train_worker_plan(manifest, seed=0, epoch=0, rank=0, world_size=1, batch_size=batch_size,
                                   batches_per_epoch=bpe, num_workers=workers, worker=w,
                                   shuffle_buffer=shuffle_buffer, start_batch=start) for w in range(max(1, workers))]
        left = {i for p in plans for i in p.order}
        starts = manifest.shard_starts
        keys_left = {f"{starts[r.shard] + o:08d}" for p in plans for r in p.runs for o in range(r.start, r.end)
                     if starts[r.shard] + o in left}
        variants = {"start": (manifest, 0), "resume": (manifest, start), "resume_no_index": (no_index, start)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        consumed_decoded = resumed_decoded = 0
        for rnd in range(rounds):
            order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
            for name in order:
                m, s = variants[name]
                for f in Path(decoded_dir).glob("*.txt"):
                    f.unlink()
                stream = build_train_stream(cfg, m, batch_size, 0, 1, seed=0, transform=transform)
                times[name].append(_first_batch_s(stream, 0, s))
                if s:
                    got = [by_hash[h] for f in Path(decoded_dir).glob("*.txt") for h in f.read_text().split()]
                    resumed_decoded += len(got)
                    consumed_decoded += sum(1 for k in got if k not in keys_left)
                log.info("round %d %-16s first batch %.3fs", rnd + 1, name, times[name][-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["resume"] / med["start"]
    return {
        "shards": shards, "samples": manifest.num_samples, "batch_size": batch_size, "workers": workers,
        "shuffle_buffer": shuffle_buffer, "batches_per_epoch": bpe, "resume_batch": start, "at": start / bpe,
        "rounds": rounds, "first_batch_s": {k: round(v, 4) for k, v in med.items()},
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "resume_over_start": round(ratio, 3), "no_index_over_start": round(med["resume_no_index"] / med["start"], 3),
        "consumed_samples_decoded": consumed_decoded,
        "samples_decoded_after_resume": resumed_decoded,
        "goal": {"ratio_max": GOAL_RATIO, "met": ratio <= GOAL_RATIO and consumed_decoded == 0},
        "cpus": os.cpu_count(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``largessl bench resume``."""
    parser.add_argument("--shards", type=int, default=64, help="synthetic shards (default 64)")
    parser.add_argument("--per-shard", type=int, default=200, help="JPEGs per shard (default 200)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the synthetic JPEGs (default 128)")
    parser.add_argument("--crop", type=int, default=96, help="data.image_size of the views (default 96)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--at", type=float, default=0.9, help="resume position as a fraction of the epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--workdir", default=None, help="where to write the temporary shards")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Run the resume benchmark and log the figures."""
    res = run_bench(args.shards, args.per_shard, args.image_size, args.batch_size, args.workers, args.shuffle_buffer,
                    args.at, args.rounds, args.workdir, args.crop)
    fb = res["first_batch_s"]
    log.info("resume bench (%d shards, %d samples, batch %d, %d workers): first batch at 0%% %.3fs, at %.0f%% "
             "%.3fs (%.2fx; goal <= %.1fx), without index %.3fs (%.2fx); consumed samples decoded: %d",
             res["shards"], res["samples"], res["batch_size"], res["workers"], fb["start"], 100 * res["at"],
             fb["resume"], res["resume_over_start"], GOAL_RATIO, fb["resume_no_index"], res["no_index_over_start"],
             res["consumed_samples_decoded"])
    print(json.dumps(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0
