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
   order *before* reading: shards holding only consumed samples are never opened, the reader seeks
   with the shards' sample-offset indexes past consumed samples (or scans shards without an index),
   and skipped samples are never decoded. The key sequence after a resume equals the uninterrupted one.
6. Elastic resume (another world size or worker count, same global batch): the epoch keeps its
   ``batches_per_epoch``; the positions the old split had not served at batch ``s`` (found by replaying
   the old workers' buffers, see :class:`Split`) are laid out in epoch order and split by steps 2–4
   among the new ranks and workers for the remaining batches. Every sample of the epoch is still
   served once; the next epoch uses the new split from its start.

Bad data never stops a run: an undecodable sample is replaced in its batch by another sample of the
same batch (re-augmented), a shard that fails mid-read is re-opened at the sample where it failed with
exponential backoff, then skipped with its URL logged. ``Batch.stats`` carries, per DataLoader worker,
the counters ``skipped_samples`` and ``skipped_shards`` *cumulative since the stream was built* plus the
``worker`` index (the trainer sums the latest value of each worker).

``data.decode=gpu``: workers only read and verify the samples and draw their views' parameters (same
generator, same order); the main process decodes and augments whole batches on the training device
(:mod:`largessl.data.device_batch`), substituting undecodable samples by the same rule, so the batches,
their order and exact resume are the same in both modes up to pixel rounding (docs/data.md).
"""

from __future__ import annotations

import bisect
import functools
import logging
import random
import signal
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from largessl.data import io
from largessl.data.augment import DecodeError, ViewTransform, build_eval_transform, build_views, recipe_specs
from largessl.data.batch import Batch
from largessl.data.config import DataConfig
from largessl.data.device_batch import BatchEncoder, DeviceStage, EncodedBatch
from largessl.data.manifest import Manifest
from largessl.data.shard_index import ShardIndex, parse_index, split_member

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

    def runs_of(self, positions: Sequence[int], starts: list[int]) -> tuple[list[Run], list[int]]:
        """Runs covering ascending ``positions`` (one per shard visit; the reader skips the gaps) and their ids."""
        runs: list[Run] = []
        ids: list[int] = []
        i = 0
        lo = hi = -1
        for pos in positions:
            if not self.cum[i] <= pos < self.cum[i + 1]:
                if hi > lo:
                    runs.append(Run(self.order[i], lo, hi))
                i = bisect.bisect_right(self.cum, pos) - 1
                lo = hi = -1
            off = pos - self.cum[i]
            assert off >= hi, "positions must ascend"
            if lo < 0:
                lo = off
            hi = off + 1
            ids.append(starts[self.order[i]] + off)
        if hi > lo >= 0:
            runs.append(Run(self.order[i], lo, hi))
        return runs, ids


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


@dataclass(frozen=True)
class Split:
    """How one stretch of an epoch was (or is) read: from ``from_batch`` on, ``world_size`` ranks × ``num_workers``.

    An epoch read without interruption, or resumed with the same split, has one ``Split`` starting at batch 0.
    A resume on another world size or worker count appends one: the new split reads exactly the positions
    the earlier ones left, so the epoch still sees every sample once.
    """

    from_batch: int
    world_size: int
    num_workers: int
    """Loader workers per rank as the plan counts them (0 workers reads as one stream, like 1)."""
    shuffle_buffer: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_workers", max(1, int(self.num_workers)))

    def same_split(self, other: Split) -> bool:
        """True when ``other`` reads with the same partition (it may start at another batch)."""
        return (self.world_size, self.num_workers, self.shuffle_buffer) == \
            (other.world_size, other.num_workers, other.shuffle_buffer)

    def to_dict(self) -> dict[str, int]:
        """Plain ints, for the checkpoint's data position."""
        return {"from_batch": self.from_batch, "world_size": self.world_size, "num_workers": self.num_workers,
                "shuffle_buffer": self.shuffle_buffer}


class _Positions:
    """Epoch positions in epoch order, as parts of known length materialised only when sliced.

    A re-split needs the positions the earlier split left unread. Each earlier worker leaves its own
    part (known length, content found by replaying that worker's shuffle), so a new worker replays only
    the few old workers whose leftovers overlap its share: work O(its share), not O(epoch).
    """

    def __init__(self, parts: list[tuple[int, Callable[[], Sequence[int]]]], whole: range | None = None) -> None:
        self.parts = parts
        self.whole = whole
        """Set when the sequence is one contiguous range (no re-split): slices need no materialising."""
        self.cum = [0]
        for n, _ in parts:
            self.cum.append(self.cum[-1] + n)
        self._cache: dict[int, Sequence[int]] = {}

    def __len__(self) -> int:
        return self.cum[-1]

    def slice(self, begin: int, end: int) -> list[int]:
        """Positions ``begin..end-1`` of the sequence."""
        out: list[int] = []
        i = bisect.bisect_right(self.cum, begin) - 1
        while begin < end and i < len(self.parts):
            if i not in self._cache:
                part = self.parts[i][1]()
                assert len(part) == self.parts[i][0], (len(part), self.parts[i][0])
                self._cache[i] = part
            lo, hi = begin - self.cum[i], min(end, self.cum[i + 1]) - self.cum[i]
            out.extend(self._cache[i][lo:hi])
            begin = self.cum[i + 1]
            i += 1
        return out


def _consumed_count(batches: range, done_batches: int) -> int:
    return sum(1 for k in batches if k < done_batches)


def _check_splits(splits: Sequence[Split], global_batch: int) -> None:
    if not splits or splits[0].from_batch != 0:
        raise ValueError(f"the splits of an epoch must start at batch 0 (got {list(splits)})")
    for a, b in zip(splits, splits[1:]):
        if b.from_batch < a.from_batch:
            raise ValueError(f"splits must be in batch order (got {list(splits)})")
    for s in splits:
        if s.world_size < 1 or global_batch % s.world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {s.world_size}")


def _worker_items(base: _Positions, split: Split, batches_per_epoch: int, global_batch: int, rank: int,
                  role: int) -> tuple[list[int] | range, range]:
    """Epoch positions of worker ``role`` of ``rank`` under ``split`` (in epoch order) and its batch indices."""
    b = global_batch // split.world_size
    nb = batches_per_epoch - split.from_batch
    mine = worker_batches(nb, split.num_workers, role)
    # a rank's share is contiguous in ``base``; its workers' shares are contiguous within it, in role order
    before = sum(len(worker_batches(nb, split.num_workers, w)) for w in range(role))
    lo = rank * nb * b + before * b
    hi = lo + len(mine) * b
    if base.whole is not None:
        return base.whole[lo:hi], mine  # the usual case: no re-split, nothing to materialise
    return base.slice(lo, hi), mine


def _buffer_rng(seed: int, epoch: int, rank: int, split: Split, role: int) -> random.Random:
    if split.from_batch == 0:
        return _rng("buffer", seed, epoch, rank, split.world_size, split.num_workers, role)
    return _rng("buffer", seed, epoch, rank, split.world_size, split.num_workers, role, "from", split.from_batch)


def _remaining(splits: Sequence[Split], k: int, *, seed: int, epoch: int, batches_per_epoch: int,
               global_batch: int) -> _Positions:
    """Positions not consumed before split ``k`` starts, in epoch order."""
    if k == 0:
        whole = range(0, batches_per_epoch * global_batch)
        return _Positions([(len(whole), lambda: whole)], whole=whole)
    prev = splits[k - 1]
    base = _remaining(splits, k - 1, seed=seed, epoch=epoch, batches_per_epoch=batches_per_epoch,
                      global_batch=global_batch)
    done = splits[k].from_batch - prev.from_batch  # batches ``prev`` served before the change
    b = global_batch // prev.world_size
    nb = batches_per_epoch - prev.from_batch
    parts: list[tuple[int, Callable[[], Sequence[int]]]] = []
    for rank in range(prev.world_size):
        for role in range(prev.num_workers):
            mine = worker_batches(nb, prev.num_workers, role)
            left = (len(mine) - _consumed_count(mine, done)) * b

            def leftover(rank: int = rank, role: int = role) -> list[int]:
                items, mine = _worker_items(base, prev, batches_per_epoch, global_batch, rank, role)
                order = buffer_shuffle(list(items), prev.shuffle_buffer, _buffer_rng(seed, epoch, rank, prev, role))
                return sorted(order[_consumed_count(mine, done) * b:])

            parts.append((left, leftover))
    return _Positions(parts)


def train_worker_plan(manifest: Manifest, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                      batches_per_epoch: int, num_workers: int, worker: int, shuffle_buffer: int,
                      start_batch: int = 0, splits: Sequence[Split] = ()) -> WorkerPlan:
    """The plan of loader worker ``worker`` for ``epoch`` when resuming at ``start_batch`` (0 = from the start).

    ``splits``: how this epoch was read before (see :class:`Split`); the last one must be this stream's
    own split (``world_size``, ``num_workers``, ``shuffle_buffer``). Empty = one split from batch 0.
    """
    current = Split(0, world_size, num_workers, shuffle_buffer)
    splits = list(splits) or [current]
    last = splits[-1]
    if not last.same_split(current):
        raise ValueError(f"the last split {last} is not this stream's ({world_size} ranks, {num_workers} workers, "
                         f"buffer {shuffle_buffer})")
    if not last.from_batch <= start_batch <= batches_per_epoch:
        raise ValueError(f"start_batch={start_batch} is outside the split starting at batch {last.from_batch}")
    global_batch = batch_size * world_size
    _check_splits(splits, global_batch)
    base = _remaining(splits, len(splits) - 1, seed=seed, epoch=epoch, batches_per_epoch=batches_per_epoch,
                      global_batch=global_batch)
    into = start_batch - last.from_batch  # batches of this split already served
    role = (worker + into) % last.num_workers  # loader batch k is this split's batch ``into + k``
    items, mine = _worker_items(base, last, batches_per_epoch, global_batch, rank, role)
    layout = EpochLayout(manifest, shard_order(len(manifest.shards), seed, epoch))
    if isinstance(items, range):
        runs = layout.runs(items.start, items.stop)
        ids = _global_ids(runs, manifest.shard_starts)
    else:
        runs, ids = layout.runs_of(items, manifest.shard_starts)
    order = buffer_shuffle(ids, last.shuffle_buffer, _buffer_rng(seed, epoch, rank, last, role))
    done = _consumed_count(mine, into)
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
    """(key, lower-case extension) of a tar member, by the webdataset convention (:func:`split_member`)."""
    key, ext = split_member(name)
    return key, ext.lower()


def iter_tar_samples(f: IO[bytes], keep: Callable[[int], bool],
                     first: int = 0) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """``(offset, key, fields)`` of each sample of a tar stream; payloads are read only where ``keep(offset)``.

    ``first``: the offset (sample number in the shard) of the stream's first sample, when it starts at a
    member header inside the shard.
    """
    offset = first - 1
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


class _StaleIndex(Exception):
    """A seek with the shard's index did not land on the sample the index names."""


SEEK_GAP_BYTES = 4 << 20
"""Over HTTP, unwanted bytes between two wanted samples of a shard above which the reader sends a new
ranged request instead of reading through them (a request costs about what reading a few MB does).
Seekable files (local, s3://, gs://) seek past every unwanted sample."""


class ShardReader:
    """Reads the wanted samples of a list of runs, with retries; yields a :class:`Sample` or ``None`` per id.

    With a shard index (``ShardInfo.index``) it opens the shard at the first wanted sample and seeks past
    unwanted ones (over HTTP: re-requests past :data:`SEEK_GAP_BYTES`), so the samples before a resume
    point are never read. Without one, or when the index does not match the shard, it scans.
    """

    def __init__(self, manifest: Manifest, storage_options: Mapping[str, Any], retries: int,
                 backoff_s: float, counters: _Counters) -> None:
        self.manifest = manifest
        self.starts = manifest.shard_starts
        self.opts = storage_options
        self.retries = retries
        self.backoff_s = backoff_s
        self.counters = counters
        self._indexes: dict[int, ShardIndex | None] = {}
        self.opens = 0
        """Shard opens (for tests and benchmarks)."""

    def _index(self, shard: int) -> ShardIndex | None:
        """The shard's index, read once (a small file); ``None`` when it has none or it is unusable."""
        if shard not in self._indexes:
            info = self.manifest.shards[shard]
            idx = None
            if info.index:
                try:
                    with io.open_url(info.index, "rb", self.opts) as f:
                        idx = parse_index(f.read(), info.index)
                    if len(idx) != info.num_samples:
                        raise ValueError(f"it lists {len(idx)} samples, the manifest {info.num_samples}")
                except Exception as e:  # unreadable or a server error (5xx): the shard can still be scanned
                    if not (isinstance(e, (OSError, ValueError)) or io.is_transient(e)):
                        raise
                    log.warning("shard index %s is unusable (%s: %s); scanning %s instead", info.index,
                                type(e).__name__, e, info.url)
                    idx = None
            self._indexes[shard] = idx
        return self._indexes[shard]

    def read(self, runs: list[Run], wanted: set[int]) -> Iterator[tuple[int, Sample | None]]:
        """Every wanted id of ``runs`` exactly once, in run order (``None`` when its shard was given up)."""
        for run in runs:
            base = self.starts[run.shard]
            need = [o for o in range(run.start, run.end) if base + o in wanted]
            if need:
                yield from self._read_run(run, base, need)

    def _stretch(self, idx: ShardIndex | None, need: list[int], i: int, gap_limit: int) -> tuple[int, int]:
        """``(byte offset, last offset)`` of one read from ``need[i]``: up to a gap over ``gap_limit`` bytes."""
        if idx is None:
            return 0, need[-1]
        j = i
        while j + 1 < len(need) and idx.headers[need[j + 1]] - idx.headers[need[j] + 1] <= gap_limit:
            j += 1
        return idx.headers[need[i]], need[j]

    def _read_run(self, run: Run, base: int, need: list[int]) -> Iterator[tuple[int, Sample | None]]:
        url = self.manifest.shards[run.shard].url
        need_set = set(need)
        last = need[-1]
        next_off = need[0]  # first offset not yet delivered; a retry resumes here
        attempt = 0
        # Seekable files (local, object stores: their reads are ranged) skip every unwanted sample by a seek
        # on the open file; an HTTP stream is re-requested only past long gaps.
        seekable = io.protocol_of(url) != "http"
        gap_limit = 0 if seekable else SEEK_GAP_BYTES
        while True:
            f: IO[bytes] | None = None
            try:
                while next_off <= last:
                    i = bisect.bisect_left(need, next_off)
                    idx = self._index(run.shard)
                    byte, stop = self._stretch(idx, need, i, gap_limit)
                    first = need[i] if idx is not None else 0
                    expect = idx.keys[first] if idx is not None else None
                    if f is None or not seekable:
                        if f is not None:
                            f.close()
                            f = None
                        self.opens += 1
                        f = io.open_url(url, "rb", self.opts, offset=byte)
                    else:
                        f.seek(byte)
                    try:
                        for off, key, fields in iter_tar_samples(
                                f, lambda o, r=next_off: o >= r and o in need_set, first):
                            if expect is not None:
                                if key != expect:
                                    raise _StaleIndex(f"sample {off} is {key!r}, the index says {expect!r}")
                                expect = None
                            if off < next_off:
                                continue
                            if off in need_set:
                                yield base + off, _to_sample(base + off, key, fields, url)
                            next_off = off + 1
                            if off >= stop:
                                break
                    except tarfile.TarError as e:
                        if byte and expect is not None:  # no tar header where the index points
                            raise _StaleIndex(f"no tar header at byte {byte} ({e})") from None
                        raise
                    if byte and expect is not None:
                        raise _StaleIndex(f"nothing to read at byte {byte}")
                    if next_off <= stop:
                        raise _ShortShard(f"shard ended after {next_off} samples; the manifest promises at least "
                                          f"{stop + 1}")
                return
            except _StaleIndex as e:
                # A shard rewritten after its index, or an HTTP server that ignores Range: scan instead.
                log.warning("the index of shard %s does not match it (%s); scanning the shard instead", url, e)
                self._indexes[run.shard] = None
            except Exception as e:
                # OSError, a torn tar, EOF, and the storage clients' own errors that a retry may cure: an HTTP 5xx
                # or 429 (aiohttp's ClientResponseError is no OSError), S3 throttling, a dropped connection
                if not (isinstance(e, (OSError, tarfile.TarError, EOFError)) or io.is_transient(e)):
                    raise
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
                log.warning("reading shard %s failed at sample %d %s; retry %d/%d in %.2fs", url, next_off,
                            io.describe_error(e), attempt, self.retries - 1, delay)
                time.sleep(delay)
            finally:
                if f is not None:
                    f.close()


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
                 plan_fn: Callable[[int, int, int, int], WorkerPlan], substitute: bool,
                 encoder: BatchEncoder | None = None) -> None:
        super().__init__()
        self.encoder = encoder  # data.decode=gpu: yield EncodedBatch (read + verified, not decoded)
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

    def __iter__(self) -> Iterator[Batch | EncodedBatch]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan_fn(self.epoch, self.start_batch, worker, nw)
        counters = _Counters()
        reader = ShardReader(self.manifest, self.opts, self.retries, self.backoff_s, counters)
        source = reader.read(plan.runs, set(plan.order))
        pending: dict[int, Sample | None] = {}
        fallback: Sample | None = None
        had_good = False  # decode=gpu: whether the main process has a fallback sample of this worker yet
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
            if self.encoder is not None:
                enc = self.encoder(samples, ids, plan.epoch, counters, None if had_good else look_ahead)
                had_good = had_good or enc.num_good > 0 or enc.spare is not None
                enc.stats = {"worker": worker, "skipped_samples": counters.skipped_samples,
                             "skipped_shards": counters.skipped_shards}
                yield enc
                continue
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


class TrainStream:
    """Training batches of one rank: ``iterate(epoch, start_batch)`` yields exactly the remaining batches."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, per_rank_batch_size: int, rank: int, world_size: int,
                 seed: int, transform: Callable[..., list[torch.Tensor]] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if per_rank_batch_size < 1:
            raise ValueError(f"per-rank batch size must be >= 1 (got {per_rank_batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.device = torch.device(device)
        self.decode = "gpu" if cfg.gpu_decode else cfg.decode  # gpu_decode: deprecated alias (config warns)
        if self.decode == "gpu":
            if transform is not None:
                raise ValueError("data.decode=gpu makes the recipe's views on the device; a custom transform "
                                 "needs data.decode=cpu")
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("data.decode=gpu on a CUDA device, but CUDA is not available")
        self.cfg = cfg
        self.manifest = manifest
        self.batch_size = per_rank_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = cfg.num_workers
        self._epoch_splits: dict[int, tuple[Split, ...]] = {}  # set by resume_batch after a re-split
        self.batches_per_epoch = manifest.num_samples // (world_size * per_rank_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {manifest.num_samples} samples, fewer than one global batch "
                f"({world_size} ranks × {per_rank_batch_size}); lower the batch size or use more data"
            )
        self.num_classes = manifest.num_classes
        self.transform = transform or build_views(cfg.augment, cfg.image_size, cfg.num_views, cfg.min_scale)
        self._specs = recipe_specs(cfg.augment, cfg.image_size, cfg.num_views, cfg.min_scale)
        self._skips_done: dict[tuple[int, str], int] = {}  # totals of finished iterations
        self._skips_now: dict[tuple[int, str], int] = {}  # latest worker counters of the current one
        self._sample_rng = functools.partial(_rng, "aug", seed)  # (epoch, gid, salt): the CPU path's generator
        self.gpu_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        """decode=gpu on CUDA: set to a list to collect the stage's per-batch GPU events (``bench data``)."""
        encoder = BatchEncoder(self._specs, self._sample_rng) if self.decode == "gpu" else None
        self._dataset = _ShardDataset(manifest, self.transform, _storage_options(cfg, manifest), cfg.retries,
                                      cfg.retry_backoff_s, seed, self._plan, substitute=True, encoder=encoder)

    def _batches(self, loader: Iterable[Any]) -> Iterable[Batch]:
        if self.decode == "cpu":
            return loader
        # decode + augment in this process on self.device, one batch ahead of the consumer
        stage = DeviceStage(self._specs, self.device, self._sample_rng)
        stage.gpu_events = self.gpu_events
        return stage.run(loader)

    def _plan(self, epoch: int, start_batch: int, worker: int, num_workers: int) -> WorkerPlan:
        return train_worker_plan(self.manifest, seed=self.seed, epoch=epoch, rank=self.rank,
                                 world_size=self.world_size, batch_size=self.batch_size,
                                 batches_per_epoch=self.batches_per_epoch, num_workers=num_workers, worker=worker,
                                 shuffle_buffer=self.cfg.shuffle_buffer, start_batch=start_batch,
                                 splits=self._epoch_splits.get(epoch, ()))

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
        for batch in self._batches(_loader(self._dataset, self.cfg)):
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

    def _current_split(self, from_batch: int = 0) -> Split:
        return Split(from_batch, self.world_size, self.num_workers, self.cfg.shuffle_buffer)

    def position_state(self, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        """The data position to store in a checkpoint (per rank; identical on every rank).

        ``splits`` records how this epoch has been read so far (one entry unless a resume changed the
        world size or worker count mid-epoch): what a later resume needs to find the unread samples.
        """
        splits = [s for s in self._epoch_splits.get(epoch, ()) if s.from_batch <= batch_in_epoch]
        if not splits or batch_in_epoch == 0:
            splits = [self._current_split()]
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed, "shuffle_buffer": self.cfg.shuffle_buffer,
                "global_batch_size": self.world_size * self.batch_size, "manifest_id": self.manifest.id,
                "splits": [s.to_dict() for s in splits]}

    def _saved_splits(self, state: Mapping[str, Any], batch: int) -> list[Split]:
        rows = state.get("splits")
        try:
            if rows:
                splits = [Split(int(r["from_batch"]), int(r["world_size"]), int(r["num_workers"]),
                                int(r["shuffle_buffer"])) for r in rows]
            else:  # written before splits were recorded: one split, the buffer as configured now
                splits = [Split(0, int(state.get("world_size") or self.world_size),
                                int(state.get("num_workers", self.num_workers)),
                                int(state.get("shuffle_buffer", self.cfg.shuffle_buffer)))]
            _check_splits(splits, self.world_size * self.batch_size)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"data position {dict(state)!r} has unreadable splits ({e}); the checkpoint is "
                             "damaged") from None
        if splits[-1].from_batch > batch:
            raise ValueError(f"data position {dict(state)!r}: a split starts after batch_in_epoch; the checkpoint "
                             "is damaged")
        return splits

    def resume_batch(self, state: Mapping[str, Any], allow_resplit: bool = True) -> tuple[int, int]:
        """``(epoch, start_batch)`` to continue from a stored position; prepares the plan of that epoch.

        Same world size and worker count: exact resume (the batches equal the uninterrupted run's).
        Otherwise, with ``allow_resplit``, the rest of the epoch is re-split (logged): the new ranks and
        workers share exactly the samples the old split had not served, so within the epoch every sample
        is still seen once; later epochs use the new split. The global batch, seed and dataset must match.
        """
        try:
            epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"data position {dict(state)!r} lacks epoch/batch_in_epoch; the checkpoint is damaged") from None
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"the checkpoint's data order was drawn with seed {state['seed']}, this run has seed "
                             f"{self.seed}; resume with train.seed={state['seed']} or start a new train.run_dir")
        gbs = self.world_size * self.batch_size
        if int(state.get("global_batch_size", gbs)) != gbs:
            raise ValueError(f"the checkpoint was written with global batch {state['global_batch_size']}, this run "
                             f"has {gbs}; resume with the same train.global_batch_size or start a new train.run_dir")
        saved_id = str(state.get("manifest_id") or "")
        if saved_id and self.manifest.id and saved_id != self.manifest.id:
            raise ValueError(f"the checkpoint was written on dataset {saved_id[:12]}, data.train_manifest is "
                             f"{self.manifest.id[:12]} ({self.manifest.url}); resume on the same dataset")
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"stored batch_in_epoch={batch} exceeds this dataset's {self.batches_per_epoch} "
                             "batches per epoch; the manifest or batch size changed since the checkpoint")
        splits = self._saved_splits(state, batch)
        self._epoch_splits = {}
        current = self._current_split(batch)
        if batch in (0, self.batches_per_epoch) or splits[-1].same_split(current):
            if 0 < batch < self.batches_per_epoch and len(splits) > 1:
                self._epoch_splits[epoch] = tuple(splits)  # an earlier re-split of this epoch, same split now
            return epoch, batch
        old = splits[-1]
        diff = ", ".join(f"{k} {a} → {b}" for k, a, b in
                         (("world_size", old.world_size, current.world_size),
                          ("num_workers", old.num_workers, current.num_workers),
                          ("shuffle_buffer", old.shuffle_buffer, current.shuffle_buffer)) if a != b)
        if not allow_resplit:
            raise ValueError(
                f"the checkpoint's data position was saved with a different split ({diff}); set "
                "train.allow_resplit=true to continue exactly-once on a re-split, or restore the old split"
            )
        # a split that served no batch (resumed, then stopped at once) leaves nothing to account for
        history = [s for s in splits if s.from_batch < batch] + [current]
        self._epoch_splits[epoch] = tuple(history)
        log.warning("data re-split on resume (%s): epoch %d continues at batch %d of %d; the %d remaining "
                    "batches share exactly the samples not yet served (each sample of the epoch once)",
                    diff, epoch, batch, self.batches_per_epoch, self.batches_per_epoch - batch)
        return epoch, batch


def build_train_stream(cfg: DataConfig, manifest: Manifest, per_rank_batch_size: int, rank: int, world_size: int,
                       seed: int, transform: Callable[..., list[torch.Tensor]] | None = None,
                       device: torch.device | str = "cpu") -> TrainStream:
    """The training stream of ``rank``: equal batch counts on every rank, deterministic, exactly resumable.

    With ``data.decode=gpu`` the batches' tensors are already on ``device`` (the training device).
    """
    return TrainStream(cfg, manifest, per_rank_batch_size, rank, world_size, seed, transform, device)


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
