"""The training and evaluation streams: manifest → rank/worker split → shuffled undecoded bytes → views → Batch.

How an epoch is laid out (all of it a pure function of the manifest, seed, epoch, world size and workers):

1. The shards are permuted with ``Random((seed, epoch))`` and their samples concatenated into one
   sequence. Positions are known from the manifest's per-shard counts, so nothing is opened to plan.
2. Each rank takes a contiguous range of ``batches_per_epoch × B`` positions (the remainder of the
   epoch, ``N mod (W·B)`` samples at the tail of that epoch's permutation, is dropped). Ranges may start
   and end inside shards, so uneven shards and fewer shards than ranks × workers still give every rank
   exactly the same number of full batches: there is no rank that runs out early and hangs the others.
3. A rank's DataLoader hands out batches round-robin: batch k comes from worker ``k mod num_workers``.
   Worker w therefore owns batches w, w+nw, …; it is given the contiguous positions of exactly those
   batches, so every worker yields exactly its share and no sample is served twice.
4. Each worker shuffles its positions with a bounded buffer of ``shuffle_buffer`` samples. The buffer
   is simulated on integer positions first (cheap), which gives the output order; the reader then
   streams the tar members and holds at most ``shuffle_buffer`` undecoded samples until their turn.
5. Exact resume at batch ``s``: worker w of the restarted loader plays the role of original worker
   ``(w + s) mod nw`` (so loader order k ↔ original batch s + k) and drops the first outputs of its
   order *before* reading: shards holding only consumed samples are never opened and skipped samples
   are never decoded. The key sequence after a resume equals the uninterrupted one.

Bad data never stops a run: an undecodable sample is replaced in its batch by another sample of the
same batch (re-augmented), a shard that fails mid-read is re-opened at the sample where it failed with
exponential backoff, then skipped with its URL logged. ``Batch.stats`` carries, per DataLoader worker,
the counters ``skipped_samples`` and ``skipped_shards`` *cumulative since the stream was built* plus the
``worker`` index (the trainer sums the latest value of each worker).
"""

from __future__ import annotations

import bisect
import logging
import random
import signal
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from largessl.data import io
from largessl.data.augment import DecodeError, ViewTransform, build_eval_transform, build_views
from largessl.data.batch import Batch
from largessl.data.config import DataConfig
from largessl.data.manifest import Manifest

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


# ---------------------------------------------------------------------------------------------------
# Planning (pure functions of the manifest and the position)


@dataclass(frozen=True)
class Run:
    """Samples ``start..end-1`` (offsets within the shard) of shard ``shard`` (manifest index)."""

    shard: int
    start: int
    end: int


def _rng(*parts: object) -> random.Random:
    # string seeds go through sha512 in CPython: stable across processes and PYTHONHASHSEED
    return random.Random(":".join(map(str, parts)))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's shard permutation."""
    order = list(range(num_shards))
    if shuffle:
        _rng("shards", seed, epoch).shuffle(order)
    return order


class EpochLayout:
    """The epoch's sample sequence: shards in ``order``, samples in shard order, indexed by position."""

    def __init__(self, manifest: Manifest, order: list[int]) -> None:
        self.order = order
        self.counts = [manifest.shards[s].num_samples for s in order]
        self.cum = [0]
        for c in self.counts:
            self.cum.append(self.cum[-1] + c)

    def runs(self, begin: int, end: int) -> list[Run]:
        """Runs covering epoch positions ``[begin, end)``, in sequence order."""
        out: list[Run] = []
        i = bisect.bisect_right(self.cum, begin) - 1
        pos = begin
        while pos < end and i < len(self.order):
            lo = pos - self.cum[i]
            hi = min(self.counts[i], end - self.cum[i])
            if hi > lo:
                out.append(Run(self.order[i], lo, hi))
            pos = self.cum[i + 1]
            i += 1
        return out


def buffer_shuffle(items: list[int], buffer_size: int, rng: random.Random) -> list[int]:
    """Order produced by a shuffle buffer of ``buffer_size`` over ``items`` (1 = no shuffle)."""
    if buffer_size <= 1:
        return list(items)
    buf: list[int] = []
    out: list[int] = []
    for x in items:
        buf.append(x)
        if len(buf) >= buffer_size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out.append(buf.pop())
    rng.shuffle(buf)
    out.extend(buf)
    return out


def worker_batches(num_batches: int, num_workers: int, worker: int) -> range:
    """Batch indices a DataLoader with ``num_workers`` workers takes from ``worker`` (round-robin)."""
    return range(worker, num_batches, max(1, num_workers))


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker reads (runs, in order) and emits (global sample ids, grouped in batches)."""

    runs: list[Run]
    order: list[int]
    """Global sample ids (manifest order: shard start + offset) in emission order."""
    batch_sizes: list[int]
    epoch: int


def _global_ids(runs: list[Run], starts: list[int]) -> list[int]:
    return [starts[r.shard] + o for r in runs for o in range(r.start, r.end)]


def train_worker_plan(manifest: Manifest, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                      batches_per_epoch: int, num_workers: int, worker: int, shuffle_buffer: int,
                      start_batch: int = 0) -> WorkerPlan:
    """The plan of loader worker ``worker`` for ``epoch`` when resuming at ``start_batch`` (0 = from the start)."""
    nw = max(1, num_workers)
    role = (worker + start_batch) % nw  # loader batch k is original batch start_batch + k
    mine = worker_batches(batches_per_epoch, nw, role)
    layout = EpochLayout(manifest, shard_order(len(manifest.shards), seed, epoch))
    # batches of one worker are contiguous in the rank's range: worker 0's first, then worker 1's ...
    before = sum(len(worker_batches(batches_per_epoch, nw, w)) for w in range(role))
    begin = rank * batches_per_epoch * batch_size + before * batch_size
    runs = layout.runs(begin, begin + len(mine) * batch_size)
    order = buffer_shuffle(_global_ids(runs, manifest.shard_starts), shuffle_buffer,
                           _rng("buffer", seed, epoch, rank, world_size, nw, role))
    done = sum(1 for k in mine if k < start_batch)
    order = order[done * batch_size:]
    return WorkerPlan(runs, order, [batch_size] * (len(mine) - done), epoch)


def eval_worker_plan(manifest: Manifest, *, rank: int, world_size: int, batch_size: int, num_workers: int,
                     worker: int, shuffle: bool, seed: int, epoch: int, shuffle_buffer: int) -> WorkerPlan:
    """Plan of one worker of the eval stream: rank r holds positions [r·N/W, (r+1)·N/W), each once."""
    nw = max(1, num_workers)
    n = manifest.num_samples
    begin, end = rank * n // world_size, (rank + 1) * n // world_size
    layout = EpochLayout(manifest, shard_order(len(manifest.shards), seed, epoch, shuffle))
    nb = -(-(end - begin) // batch_size)
    runs: list[Run] = []
    sizes = []
    for k in worker_batches(nb, nw, worker):
        lo = begin + k * batch_size
        hi = min(end, lo + batch_size)
        runs += layout.runs(lo, hi)
        sizes.append(hi - lo)
    ids = _global_ids(runs, manifest.shard_starts)
    if shuffle:
        ids = buffer_shuffle(ids, shuffle_buffer, _rng("eval-buffer", seed, epoch, rank, world_size, nw, worker))
    return WorkerPlan(runs, ids, sizes, epoch)


# ---------------------------------------------------------------------------------------------------
# Reading


class _ShortShard(OSError):
    """The shard ended before the samples the manifest promises."""


@dataclass
class Sample:
    """One undecoded sample read from a shard."""

    gid: int
    key: str
    image: bytes | None
    label: int
    url: str


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_samples(f: IO[bytes], keep: Callable[[int], bool]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """``(offset, key, fields)`` of each sample of a tar stream; payloads are read only where ``keep(offset)``."""
    offset = -1
    key: str | None = None
    fields: dict[str, bytes] = {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = _split_key(m.name)
            if k != key:
                if key is not None:
                    yield offset, key, fields
                offset += 1
                key, fields = k, {}
            if keep(offset):
                data = tar.extractfile(m)
                fields[ext] = data.read() if data is not None else b""
    if key is not None:
        yield offset, key, fields


def _to_sample(gid: int, key: str, fields: dict[str, bytes], url: str) -> Sample:
    image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    label = -1
    raw = fields.get("cls")
    if raw is not None:
        try:
            label = int(raw.decode().strip())
        except (UnicodeDecodeError, ValueError):
            image = None  # an unreadable label makes the sample unusable: counted as a bad sample
    return Sample(gid, key, image, label, url)


class _Counters:
    def __init__(self) -> None:
        self.skipped_samples = 0
        self.skipped_shards = 0


class ShardReader:
    """Reads the wanted samples of a list of runs, with retries; yields a :class:`Sample` or ``None`` per id."""

    def __init__(self, manifest: Manifest, storage_options: Mapping[str, Any], retries: int,
                 backoff_s: float, counters: _Counters) -> None:
        self.manifest = manifest
        self.starts = manifest.shard_starts
        self.opts = storage_options
        self.retries = retries
        self.backoff_s = backoff_s
        self.counters = counters

    def read(self, runs: list[Run], wanted: set[int]) -> Iterator[tuple[int, Sample | None]]:
        """Every wanted id of ``runs`` exactly once, in run order (``None`` when its shard was given up)."""
        for run in runs:
            base = self.starts[run.shard]
            need = [o for o in range(run.start, run.end) if base + o in wanted]
            if need:
                yield from self._read_run(run, base, need)

    def _read_run(self, run: Run, base: int, need: list[int]) -> Iterator[tuple[int, Sample | None]]:
        url = self.manifest.shards[run.shard].url
        need_set = set(need)
        last = need[-1]
        next_off = need[0]  # first offset not yet delivered; a retry resumes here
        attempt = 0
        while True:
            try:
                resume_at = next_off
                with io.open_url(url, "rb", self.opts) as f:
                    for off, key, fields in iter_tar_samples(f, lambda o, r=resume_at: o >= r and o in need_set):
                        if off < next_off:
                            continue
                        if off in need_set:
                            yield base + off, _to_sample(base + off, key, fields, url)
                        next_off = off + 1
                        if off >= last:
                            break
                if next_off <= last:
                    raise _ShortShard(f"shard ended after {next_off} samples; the manifest promises at least {last + 1}")
                return
            except (OSError, tarfile.TarError, EOFError) as e:
                attempt += 1
                if attempt >= self.retries:
                    lost = [o for o in need if o >= next_off]
                    self.counters.skipped_shards += 1
                    log.error("skipping shard %s after %d attempts (%s: %s); %d samples lost", url, attempt,
                              type(e).__name__, e, len(lost))
                    for o in lost:
                        yield base + o, None
                    return
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("reading shard %s failed at sample %d (%s: %s); retry %d/%d in %.2fs", url, next_off,
                            type(e).__name__, e, attempt, self.retries - 1, delay)
                time.sleep(delay)


# ---------------------------------------------------------------------------------------------------
# Worker-side dataset


WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""Stop signals a DataLoader worker ignores: SLURM, torchrun and ``kill -- -PGID`` signal the whole process
group, and the stop belongs to the main process, which saves at the next step boundary and needs its workers
until then (torch's worker SIGTERM handler would end the worker and turn the stop into exit code 3)."""


def _worker_init(_: int) -> None:
    for s in WORKER_IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _die_with_parent()
    # s3fs/gcsfs sessions are not fork-safe: every worker builds its own filesystem objects
    io.reset_filesystems()
    torch.set_num_threads(1)


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this worker when the trainer process dies (it no longer ends on SIGTERM, so a
    worker stuck in I/O would otherwise outlive a killed trainer)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: torch's worker loop still notices a dead parent within seconds
        pass


class _ShardDataset(IterableDataset):
    """Runs inside each DataLoader worker; yields whole batches (the loader uses batch_size=None)."""

    def __init__(self, manifest: Manifest, transform: Callable[..., list[torch.Tensor]],
                 storage_options: Mapping[str, Any], retries: int, backoff_s: float, seed: int,
                 plan_fn: Callable[[int, int, int, int], WorkerPlan], substitute: bool) -> None:
        super().__init__()
        self.manifest = manifest
        self.transform = transform
        self.opts = dict(storage_options)
        self.retries = retries
        self.backoff_s = backoff_s
        self.seed = seed
        self.plan_fn = plan_fn
        self.substitute = substitute
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan_fn(self.epoch, self.start_batch, worker, nw)
        counters = _Counters()
        reader = ShardReader(self.manifest, self.opts, self.retries, self.backoff_s, counters)
        source = reader.read(plan.runs, set(plan.order))
        pending: dict[int, Sample | None] = {}
        fallback: Sample | None = None
        pos = 0

        def fetch(gid: int) -> Sample | None:
            while gid not in pending:
                got, sample = next(source)
                pending[got] = sample
            return pending[gid]

        def look_ahead() -> Sample | None:
            # a whole batch was lost before any good sample: borrow the next decodable one of this worker
            for gid in plan.order[pos:]:
                s = fetch(gid)
                if s is not None and s.image is not None:
                    try:
                        self._views(s, plan.epoch)
                        return s
                    except DecodeError:
                        continue
            return None

        for size in plan.batch_sizes:
            ids = plan.order[pos:pos + size]
            pos += size
            samples: list[Sample | None] = []
            for gid in ids:
                fetch(gid)
                samples.append(pending.pop(gid))
            batch = self._make_batch(samples, ids, plan.epoch, counters, fallback, look_ahead)
            if batch is None:
                continue
            batch, fallback = batch
            batch.stats = {"worker": worker, "skipped_samples": counters.skipped_samples,
                           "skipped_shards": counters.skipped_shards}
            yield batch

    def _views(self, sample: Sample, epoch: int, salt: int = 0) -> list[torch.Tensor]:
        assert sample.image is not None
        rng = _rng("aug", self.seed, epoch, sample.gid, salt)
        if isinstance(self.transform, ViewTransform):
            return self.transform.decode(sample.image, rng)
        import io as pyio

        from PIL import Image

        try:
            img = Image.open(pyio.BytesIO(sample.image)).convert("RGB")
        except Exception as e:
            raise DecodeError(str(e)) from None
        return self.transform(img)

    def _make_batch(self, samples: list[Sample | None], ids: list[int], epoch: int, counters: _Counters,
                    fallback: Sample | None, look_ahead: Callable[[], Sample | None]
                    ) -> tuple[Batch, Sample | None] | None:
        views: list[list[torch.Tensor] | None] = []
        for s in samples:
            v = None
            if s is not None and s.image is not None:
                try:
                    v = self._views(s, epoch)
                except DecodeError as e:
                    log.warning("skipping undecodable sample %s in %s: %s", s.key, s.url, e)
            elif s is not None:
                log.warning("skipping sample %s in %s: no image or unreadable label", s.key, s.url)
            if v is None:
                counters.skipped_samples += 1
            views.append(v)
        good = [i for i, v in enumerate(views) if v is not None]
        if not self.substitute:
            # evaluation: drop bad samples (each good sample still appears exactly once)
            if not good:
                return None
            keep = good
            out_samples = [samples[i] for i in keep]
            out_views = [views[i] for i in keep]
        else:
            if good:
                fallback = samples[good[-1]]
            elif fallback is None:
                fallback = look_ahead()
                if fallback is None:
                    raise RuntimeError(f"no decodable sample left in this worker's {len(ids)}-sample batch or after "
                                       "it; the shards are unreadable: check them with `largessl shards verify`")
            out_samples, out_views = [], []
            for i, v in enumerate(views):
                if v is not None:
                    out_samples.append(samples[i])
                    out_views.append(v)
                    continue
                # replace a bad sample by a good one of this batch (or the last good one) with fresh views
                src = samples[good[i % len(good)]] if good else fallback
                assert src is not None
                out_samples.append(src)
                out_views.append(self._views(src, epoch, salt=ids[i] + 1))
        m = len(out_views[0])
        batch = Batch(
            views=[torch.stack([v[j] for v in out_views]) for j in range(m)],
            labels=torch.tensor([s.label for s in out_samples], dtype=torch.long),
            keys=[s.key for s in out_samples],
        )
        return batch, fallback


# ---------------------------------------------------------------------------------------------------
# Public streams


def _loader(ds: _ShardDataset, cfg: DataConfig) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kwargs.update(prefetch_factor=max(1, cfg.prefetch_factor), worker_init_fn=_worker_init)
    return DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False,
                      pin_memory=bool(cfg.pin_memory and torch.cuda.is_available()), **kwargs)


def _storage_options(cfg: DataConfig, manifest: Manifest) -> dict[str, Any]:
    url = manifest.shards[0].url if manifest.shards else manifest.url
    return io.storage_options_for(url, cfg.endpoint_url)


def _check_gpu_decode(cfg: DataConfig) -> None:
    if cfg.gpu_decode:
        raise RuntimeError(
            "data.gpu_decode=true is not available in this build: decoding and augmentation run in the CPU "
            "DataLoader workers; set data.gpu_decode=false (and raise data.num_workers for throughput)"
        )


class TrainStream:
    """Training batches of one rank: ``iterate(epoch, start_batch)`` yields exactly the remaining batches."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, per_rank_batch_size: int, rank: int, world_size: int,
                 seed: int, transform: Callable[..., list[torch.Tensor]] | None = None) -> None:
        if per_rank_batch_size < 1:
            raise ValueError(f"per-rank batch size must be >= 1 (got {per_rank_batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        _check_gpu_decode(cfg)
        self.cfg = cfg
        self.manifest = manifest
        self.batch_size = per_rank_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = cfg.num_workers
        self.batches_per_epoch = manifest.num_samples // (world_size * per_rank_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {manifest.num_samples} samples, fewer than one global batch "
                f"({world_size} ranks × {per_rank_batch_size}); lower the batch size or use more data"
            )
        self.num_classes = manifest.num_classes
        self.transform = transform or build_views(cfg.augment, cfg.image_size, cfg.num_views, cfg.min_scale)
        self._skips_done: dict[tuple[int, str], int] = {}  # totals of finished iterations
        self._skips_now: dict[tuple[int, str], int] = {}  # latest worker counters of the current one
        self._dataset = _ShardDataset(manifest, self.transform, _storage_options(cfg, manifest), cfg.retries,
                                      cfg.retry_backoff_s, seed, self._plan, substitute=True)

    def _plan(self, epoch: int, start_batch: int, worker: int, num_workers: int) -> WorkerPlan:
        return train_worker_plan(self.manifest, seed=self.seed, epoch=epoch, rank=self.rank,
                                 world_size=self.world_size, batch_size=self.batch_size,
                                 batches_per_epoch=self.batches_per_epoch, num_workers=num_workers, worker=worker,
                                 shuffle_buffer=self.cfg.shuffle_buffer, start_batch=start_batch)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch .. batches_per_epoch-1`` of ``epoch`` (each exactly ``per_rank_batch_size``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0 (got {epoch})")
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} is outside the epoch (0..{self.batches_per_epoch})")
        if start_batch == self.batches_per_epoch:
            return
        self._dataset.epoch = epoch
        self._dataset.start_batch = start_batch
        for key, v in self._skips_now.items():  # workers restart from 0 each iteration: keep totals here
            self._skips_done[key] = self._skips_done.get(key, 0) + v
        self._skips_now = {}
        n = 0
        for batch in _loader(self._dataset, self.cfg):
            worker = int(batch.stats.get("worker", 0))
            for k in ("skipped_samples", "skipped_shards"):
                self._skips_now[(worker, k)] = int(batch.stats.get(k, 0))
                batch.stats[k] = self._skips_done.get((worker, k), 0) + self._skips_now[(worker, k)]
            n += 1
            yield batch
        # the split guarantees this; a mismatch would be the DDP hang this design exists to prevent
        assert n == self.batches_per_epoch - start_batch, (n, self.batches_per_epoch, start_batch)

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped since this stream was built, summed over workers (for metrics)."""
        out = {"skipped_samples": 0, "skipped_shards": 0}
        for counts in (self._skips_done, self._skips_now):
            for (_, k), v in counts.items():
                out[k] += v
        return out

    def position_state(self, epoch: int, batch_in_epoch: int) -> dict[str, int]:
        """The data position to store in a checkpoint (per rank; identical on every rank)."""
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed}

    def resume_batch(self, state: Mapping[str, int], allow_resplit: bool = False) -> tuple[int, int]:
        """``(epoch, start_batch)`` to continue from a stored position; a changed split raises or re-splits.

        Exact resume needs the same world size, worker count and seed. With ``allow_resplit`` a changed
        split continues the epoch at the same fraction of samples consumed (logged): the new split is a
        different partition, so some samples of that epoch may be seen twice or not at all.
        """
        try:
            epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"data position {dict(state)!r} lacks epoch/batch_in_epoch; the checkpoint is damaged") from None
        saved = {k: state.get(k) for k in ("world_size", "num_workers", "seed")}
        now = {"world_size": self.world_size, "num_workers": self.num_workers, "seed": self.seed}
        if saved == now:
            if batch > self.batches_per_epoch:
                raise ValueError(f"stored batch_in_epoch={batch} exceeds this dataset's {self.batches_per_epoch} "
                                 "batches per epoch; the manifest or batch size changed since the checkpoint")
            return epoch, batch
        diff = ", ".join(f"{k} {saved[k]} → {now[k]}" for k in now if saved[k] != now[k])
        if not allow_resplit:
            raise ValueError(
                f"the checkpoint's data position was saved with a different split ({diff}); exact resume needs "
                "the same world size, data.num_workers and seed. Restore them, or allow a logged re-split"
            )
        consumed = batch * int(saved["world_size"] or self.world_size)
        new_batch = min(self.batches_per_epoch, consumed // self.world_size)
        log.warning("data re-split on resume (%s): epoch %d continues at batch %d of %d instead of %d",
                    diff, epoch, new_batch, self.batches_per_epoch, batch)
        return epoch, new_batch


def build_train_stream(cfg: DataConfig, manifest: Manifest, per_rank_batch_size: int, rank: int, world_size: int,
                       seed: int, transform: Callable[..., list[torch.Tensor]] | None = None) -> TrainStream:
    """The training stream of ``rank``: equal batch counts on every rank, deterministic, exactly resumable."""
    return TrainStream(cfg, manifest, per_rank_batch_size, rank, world_size, seed, transform)


class EvalStream:
    """Single-view batches covering each sample exactly once across ranks (see :func:`build_eval_stream`)."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, batch_size: int, rank: int, world_size: int,
                 transform: str | ViewTransform = "eval", seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg = cfg
        self.manifest = manifest
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = transform == "train_linear"
        tf = build_eval_transform(transform, cfg.image_size) if isinstance(transform, str) else transform
        self.num_classes = manifest.num_classes
        n = manifest.num_samples
        self.num_samples = (rank + 1) * n // world_size - rank * n // world_size
        """Samples of this rank (ranks differ by at most one)."""
        self.batches_per_epoch = -(-self.num_samples // batch_size)
        """Batches of this rank; may differ by one between ranks, the last may be smaller."""
        self._dataset = _ShardDataset(manifest, tf, _storage_options(cfg, manifest), cfg.retries,
                                      cfg.retry_backoff_s, seed, self._plan, substitute=False)

    def _plan(self, epoch: int, start_batch: int, worker: int, num_workers: int) -> WorkerPlan:
        return eval_worker_plan(self.manifest, rank=self.rank, world_size=self.world_size,
                                batch_size=self.batch_size, num_workers=num_workers, worker=worker,
                                shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                                shuffle_buffer=self.cfg.shuffle_buffer)

    def iterate(self, epoch: int = 0) -> Iterator[Batch]:
        """This rank's batches; ``epoch`` varies the order and augmentation of ``train_linear`` streams."""
        self._dataset.epoch = epoch
        yield from _loader(self._dataset, self.cfg)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(0)


def build_eval_stream(cfg: DataConfig, manifest: Manifest, batch_size: int, rank: int, world_size: int,
                      transform: str | ViewTransform = "eval", seed: int = 0) -> EvalStream:
    """Eval/linear-probe stream: each sample once across ranks, no padding, the last batch may be smaller.

    ``transform="eval"``: resize + center crop, manifest order. ``"train_linear"``: RandomResizedCrop +
    flip, shard order and a shuffle buffer varying with the epoch passed to ``iterate``. Rank r holds
    samples ``[r·N/W, (r+1)·N/W)`` of the epoch order, so ranks differ by at most one sample and may
    differ by one batch: gather results with variable-size collectives, not per-batch ones. Undecodable
    samples are dropped (counted in ``Batch.stats``), never duplicated.
    """
    return EvalStream(cfg, manifest, batch_size, rank, world_size, transform, seed)
