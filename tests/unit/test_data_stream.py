"""The training stream: rank × worker split, determinism, exact resume, bad data; the eval stream."""

from __future__ import annotations

import io as pyio
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from largessl.data.config import DataConfig
from largessl.data.manifest import read_manifest
from largessl.data.stream import (
    buffer_shuffle,
    build_eval_stream,
    build_train_stream,
    train_worker_plan,
)
from largessl.data.writer import SourceSample

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

# uneven, and only 7 shards: fewer than 3 ranks x 3 workers
SHARD_SIZES = [2, 11, 5, 23, 7, 13, 3]
B = 3


def _jpeg(i: int, size: int = 12) -> bytes:
    rng = random.Random(i)
    img = Image.new("RGB", (size + i % 5, size), tuple(rng.randrange(256) for _ in range(3)))
    buf = pyio.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_uneven(dest: Path, sizes: list[int] = SHARD_SIZES, bad: dict[int, bytes] | None = None) -> str:
    """Shards of exactly ``sizes`` samples (one write per shard, merged into one manifest)."""
    from largessl.data.manifest import write_manifest
    from largessl.data.writer import write_shard

    dest.mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for s, count in enumerate(sizes):
        samples = [SourceSample(f"s{n + i:04d}", (bad or {}).get(n + i, _jpeg(n + i)), (n + i) % 4)
                   for i in range(count)]
        name = f"part-{s:03d}.tar"
        rows.append({"url": name, **write_shard(str(dest / name), samples)})
        n += count
    write_manifest(str(dest / "manifest.json"), rows, ["a", "b", "c", "d"])
    return str(dest / "manifest.json")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return write_uneven(tmp_path_factory.mktemp("uneven"))


def _cfg(workers: int, **kw) -> DataConfig:
    kw.setdefault("shuffle_buffer", 6)
    return DataConfig(augment="none", image_size=8, num_workers=workers, retry_backoff_s=0.0, **kw)


def _epoch_keys(manifest, cfg, rank, world, seed=0, epoch=0, start=0) -> list[list[str]]:
    stream = build_train_stream(cfg, manifest, B, rank, world, seed)
    out = []
    for batch in stream.iterate(epoch, start):
        assert len(batch.keys) == B and batch.views[0].shape[0] == B and batch.labels.shape == (B,)
        out.append(batch.keys)
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_equal_batches_and_no_sample_twice(uneven: str, world: int, workers: int) -> None:
    manifest = read_manifest(uneven)
    per_rank = [_epoch_keys(manifest, _cfg(workers), r, world) for r in range(world)]
    expected = manifest.num_samples // (world * B)
    assert [len(p) for p in per_rank] == [expected] * world  # the DDP epoch-end hang cannot happen
    keys = [k for p in per_rank for batch in p for k in batch]
    assert len(keys) == len(set(keys)) == world * expected * B


def test_order_is_deterministic_in_seed_and_epoch(uneven: str) -> None:
    m = read_manifest(uneven)
    a = _epoch_keys(m, _cfg(2), 1, 2, seed=5, epoch=3)
    assert a == _epoch_keys(m, _cfg(2), 1, 2, seed=5, epoch=3)
    assert a != _epoch_keys(m, _cfg(2), 1, 2, seed=5, epoch=4)
    assert a != _epoch_keys(m, _cfg(2), 1, 2, seed=6, epoch=3)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_exact_resume_equals_uninterrupted(uneven: str, workers: int) -> None:
    m = read_manifest(uneven)
    world = 2
    for rank in range(world):
        full = _epoch_keys(m, _cfg(workers), rank, world, seed=1, epoch=2)
        for start in range(1, len(full) + 1):
            assert _epoch_keys(m, _cfg(workers), rank, world, seed=1, epoch=2, start=start) == full[start:]


def test_resume_gives_identical_views(uneven: str) -> None:
    m = read_manifest(uneven)
    cfg = DataConfig(augment="small", image_size=8, num_workers=2, shuffle_buffer=6)
    stream = build_train_stream(cfg, m, B, 0, 1, seed=0)
    full = list(stream.iterate(1))
    resumed = list(stream.iterate(1, start_batch=3))
    for a, b in zip(full[3:], resumed):
        assert a.keys == b.keys
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_resume_never_opens_fully_consumed_shards(tmp_path: Path) -> None:
    url = write_uneven(tmp_path / "d")
    m = read_manifest(url)
    cfg = _cfg(0, shuffle_buffer=1)
    full = _epoch_keys(m, cfg, 0, 1)
    start = len(full) - 1
    plan = train_worker_plan(m, seed=0, epoch=0, rank=0, world_size=1, batch_size=B,
                             batches_per_epoch=len(full), num_workers=1, worker=0, shuffle_buffer=1)
    starts = m.shard_starts
    needed = set(plan.order[start * B:])
    consumed_only = [r.shard for r in plan.runs
                     if not any(starts[r.shard] + o in needed for o in range(r.start, r.end))]
    assert consumed_only
    for s in consumed_only:  # deleting them proves the resumed epoch never reads them
        Path(m.shards[s].url).unlink()
    stream = build_train_stream(cfg, m, B, 0, 1, seed=0)
    assert [b.keys for b in stream.iterate(0, start)] == full[start:]
    assert stream.skip_counts() == {"skipped_samples": 0, "skipped_shards": 0}


def test_shuffle_buffer_is_bounded_permutation() -> None:
    items = list(range(500))
    out = buffer_shuffle(items, 20, random.Random(0))
    assert sorted(out) == items and out != items
    # an item can only come out once it has been read: read pointer is at most t + buffer - 1
    assert all(x <= t + 19 for t, x in enumerate(out))
    assert buffer_shuffle(items, 1, random.Random(0)) == items


def test_position_state_and_exact_resume_of_the_same_split(uneven: str) -> None:
    m = read_manifest(uneven)
    s2 = build_train_stream(_cfg(2), m, B, 0, 2, seed=0)
    state = s2.position_state(epoch=1, batch_in_epoch=4)
    assert state == {"epoch": 1, "batch_in_epoch": 4, "world_size": 2, "num_workers": 2, "seed": 0,
                     "shuffle_buffer": 6, "global_batch_size": 2 * B, "manifest_id": m.id,
                     "splits": [{"from_batch": 0, "world_size": 2, "num_workers": 2, "shuffle_buffer": 6}]}
    assert s2.resume_batch(state) == (1, 4)
    # 0 and 1 workers are the same single stream: exact, not a re-split
    s0 = build_train_stream(_cfg(0), m, B, 0, 1, seed=0)
    s1 = build_train_stream(_cfg(1), m, B, 0, 1, seed=0)
    assert s1.resume_batch(s0.position_state(0, 3)) == (0, 3) and not s1._epoch_splits


def test_resplit_keeps_the_global_batch_position_or_refuses(uneven: str, caplog) -> None:
    """The trainer holds the global batch fixed: a change of split keeps (epoch, batch), the per-rank batch changes."""
    m = read_manifest(uneven)
    g = 12
    state = build_train_stream(_cfg(2), m, g // 2, 0, 2, seed=0).position_state(epoch=1, batch_in_epoch=3)
    s4 = build_train_stream(_cfg(2), m, g // 4, 0, 4, seed=0)
    with caplog.at_level(logging.WARNING):
        assert s4.resume_batch(state) == (1, 3)  # the old scaling gave (1, 1): not the trainer's (1, 3)
    assert "re-split" in caplog.text and "world_size 2 → 4" in caplog.text
    with pytest.raises(ValueError, match="world_size 2 → 4.*allow_resplit"):
        s4.resume_batch(state, allow_resplit=False)
    with pytest.raises(ValueError, match="num_workers 2 → 1"):
        build_train_stream(_cfg(1), m, g // 2, 0, 2, seed=0).resume_batch(state, allow_resplit=False)
    with pytest.raises(ValueError, match="global batch 12, this run has 8"):
        build_train_stream(_cfg(2), m, 4, 0, 2, seed=0).resume_batch(state)
    with pytest.raises(ValueError, match="seed 0, this run has seed 1"):
        build_train_stream(_cfg(2), m, g // 2, 0, 2, seed=1).resume_batch(state)
    with pytest.raises(ValueError, match="damaged"):
        s4.resume_batch({**state, "splits": [{"from_batch": 3, "world_size": 2}]})


def _served(manifest, cfg, world: int, global_batch: int, epoch: int, start: int, stop: int,
            state: dict | None = None, seed: int = 0) -> tuple[list[list[str]], dict, list]:
    """Keys of global batches ``start..stop-1`` read by ``world`` ranks (real streams, real decoding), resumed
    from ``state``; returns them, the position state at ``stop`` and the streams."""
    streams = [build_train_stream(cfg, manifest, global_batch // world, r, world, seed) for r in range(world)]
    if state is not None:
        for s in streams:
            assert s.resume_batch(state) == (epoch, start)
    its = [s.iterate(epoch, start) for s in streams]
    out = []
    for _ in range(start, stop):
        out.append([k for it in its for k in next(it).keys])
    for it in its:
        it.close()
    return out, streams[0].position_state(epoch, stop), streams


@pytest.mark.parametrize("chain", [
    [(2, 2), (4, 2)],  # 2 -> 4 ranks
    [(4, 1), (2, 1)],  # 4 -> 2 ranks
    [(2, 2), (2, 1)],  # 2 workers -> 1
    [(1, 3), (3, 0), (2, 2), (2, 2), (4, 1)],  # several changes in one epoch, one resume with the same split
])
def test_resplit_serves_each_sample_of_the_epoch_once(uneven: str, chain) -> None:
    m = read_manifest(uneven)
    g = 12
    bpe = m.num_samples // g
    cuts = [0, *sorted(random.Random(len(chain)).sample(range(1, bpe), len(chain) - 1)), bpe]
    keys: list[list[str]] = []
    state = None
    for (world, workers), a, b in zip(chain, cuts, cuts[1:]):
        got, state, streams = _served(m, _cfg(workers), world, g, 1, a, b, state)
        keys += got
    assert len(keys) == bpe and all(len(k) == g for k in keys)
    flat = [k for batch in keys for k in batch]
    assert len(flat) == len(set(flat)) == bpe * g  # none repeated, none lost (only the N mod G tail is dropped)
    # the resumed streams read the next epoch with their own split, exactly as a run started on it
    its = [s.iterate(2) for s in streams]
    nxt = [[k for it in its for k in next(it).keys] for _ in range(bpe)]
    world, workers = chain[-1]
    ref, _, _ = _served(m, _cfg(workers), world, g, 2, 0, bpe)
    assert nxt == ref


def test_resume_inside_a_resplit_is_exact(uneven: str) -> None:
    """Saved again after a re-split, resumed with the same split: the batches equal the uninterrupted ones."""
    m = read_manifest(uneven)
    g = 8  # 8 batches per epoch
    _, state, _ = _served(m, _cfg(2), 2, g, 0, 0, 3)
    rest, _, _ = _served(m, _cfg(1), 4, g, 0, 3, 8, state)
    _, state5, _ = _served(m, _cfg(1), 4, g, 0, 3, 5, state)
    assert [s["from_batch"] for s in state5["splits"]] == [0, 3]
    again, _, _ = _served(m, _cfg(1), 4, g, 0, 5, 8, state5)
    assert again == rest[2:]


def test_resplit_plans_match_a_replay_of_the_old_split() -> None:
    """Plan-level check over many random chains: every global batch full, no id twice, none lost."""
    from largessl.data.manifest import Manifest, ShardInfo
    from largessl.data.stream import Split

    sizes = [2, 11, 5, 23, 7, 13, 3, 40, 17]
    m = Manifest([ShardInfo(f"s{i}.tar", n) for i, n in enumerate(sizes)], [], sum(sizes))
    g = 12
    bpe = m.num_samples // g
    rng = random.Random(0)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, bpe), rng.randint(0, 3)))
        splits: list[Split] = []
        served: list[int] = []
        for a, b in zip([0, *cuts], [*cuts, bpe]):
            s = Split(a, rng.choice([1, 2, 3, 4, 6]), rng.choice([1, 2, 3]), rng.choice([1, 4, 9]))
            if not splits or not splits[-1].same_split(s):
                splits.append(s)
            w, nw, b_rank = s.world_size, s.num_workers, g // s.world_size
            plans = {(r, k): train_worker_plan(m, seed=3, epoch=1, rank=r, world_size=w, batch_size=b_rank,
                                               batches_per_epoch=bpe, num_workers=nw, worker=k,
                                               shuffle_buffer=s.shuffle_buffer, start_batch=a, splits=splits)
                     for r in range(w) for k in range(nw)}
            for j in range(b - a):
                for r in range(w):
                    p = plans[(r, j % nw)]
                    assert p.batch_sizes[j // nw] == b_rank
                    served += p.order[(j // nw) * b_rank:(j // nw + 1) * b_rank]
        assert len(served) == len(set(served)) == bpe * g, splits


def test_too_small_dataset_and_bad_arguments(uneven: str) -> None:
    m = read_manifest(uneven)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_stream(_cfg(0), m, 40, 0, 2, seed=0)
    stream = build_train_stream(_cfg(0), m, B, 0, 2, seed=0)
    with pytest.raises(ValueError, match="outside the epoch"):
        next(stream.iterate(0, stream.batches_per_epoch + 1))
    with pytest.raises(ValueError, match="custom transform needs data.decode=cpu"):  # gpu_decode: alias of decode=gpu
        build_train_stream(_cfg(0, gpu_decode=True), m, B, 0, 2, seed=0, transform=lambda img: [img])


def test_corrupt_and_truncated_samples_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    good = _jpeg(4)
    bad = {4: b"this is not a jpeg", 17: good[: len(good) // 2]}
    url = write_uneven(tmp_path / "d", bad=bad)
    m = read_manifest(url)
    stream = build_train_stream(_cfg(2), m, 4, 0, 1, seed=0)  # 64 samples = 16 batches of 4: none dropped
    with caplog.at_level(logging.WARNING):
        batches = list(stream.iterate(0))
    assert len(batches) == stream.batches_per_epoch == 16 and all(len(b.keys) == 4 for b in batches)
    keys = [k for b in batches for k in b.keys]
    assert "s0004" not in keys and "s0017" not in keys
    assert stream.skip_counts()["skipped_samples"] == 2
    # per-worker cumulative counters in Batch.stats: the latest per worker sums to the total
    latest = {}
    for b in batches:
        latest[b.stats["worker"]] = b.stats["skipped_samples"]
    assert sum(latest.values()) == 2
    # logs name shard and key (workers=0: worker processes' records do not reach caplog)
    with caplog.at_level(logging.WARNING):
        list(build_train_stream(_cfg(0), m, 4, 0, 1, seed=0).iterate(0))
    assert "s0004" in caplog.text and "part-001.tar" in caplog.text
    # counters accumulate across epochs (workers restart each epoch; the stream keeps the totals)
    list(stream.iterate(1))
    assert stream.skip_counts()["skipped_samples"] == 4


def test_truncated_shard_is_retried_then_skipped(tmp_path: Path, caplog) -> None:
    url = write_uneven(tmp_path / "d")
    m = read_manifest(url)
    victim = Path(m.shards[3].url)  # 23 samples
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    stream = build_train_stream(_cfg(2, retries=2), m, B, 0, 2, seed=0)
    other = build_train_stream(_cfg(0, retries=2), m, B, 1, 2, seed=0)  # in-process: its logs reach caplog
    with caplog.at_level(logging.WARNING):
        mine = list(stream.iterate(0))
        theirs = list(other.iterate(0))
    assert len(mine) == len(theirs) == stream.batches_per_epoch
    assert all(len(b.keys) == B for b in mine + theirs)
    skipped = stream.skip_counts()["skipped_shards"] + other.skip_counts()["skipped_shards"]
    lost = stream.skip_counts()["skipped_samples"] + other.skip_counts()["skipped_samples"]
    assert skipped >= 1 and 0 < lost < 23
    assert str(victim) in caplog.text and "retry" in caplog.text


def test_eval_stream_covers_every_sample_once(uneven: str) -> None:
    m = read_manifest(uneven)
    cfg = _cfg(2)
    for transform in ("eval", "train_linear"):
        keys: list[str] = []
        for rank in range(3):
            ev = build_eval_stream(cfg, m, batch_size=4, rank=rank, world_size=3, transform=transform)
            sizes = [len(b.keys) for b in ev.iterate(0)]
            assert sum(sizes) == ev.num_samples and len(sizes) == ev.batches_per_epoch
            assert all(s == 4 for s in sizes[:-1])
            keys += [k for b in ev.iterate(0) for k in b.keys]
            assert all(len(b.views) == 1 and b.views[0].shape[1:] == (3, 8, 8) for b in ev.iterate(0))
        assert sorted(keys) == sorted(f"s{i:04d}" for i in range(m.num_samples))


def test_eval_stream_labels_match_shards(uneven: str) -> None:
    m = read_manifest(uneven)
    ev = build_eval_stream(_cfg(0), m, batch_size=10, rank=0, world_size=1)
    for b in ev:
        assert b.labels.tolist() == [int(k[1:]) % 4 for k in b.keys]
