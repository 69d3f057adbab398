"""Seekable shards: the per-shard index (DALI v1.2), wids' shard index, seeking on resume, scanning fallbacks."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import io as pyio
import json
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from largessl.data import io
from largessl.data.config import DataConfig
from largessl.data.manifest import read_manifest
from largessl.data.shard_index import format_index, parse_index, scan_members
from largessl.data.stream import ShardReader, _Counters, build_train_stream, train_worker_plan
from largessl.data.writer import SourceSample, write_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _jpeg(i: int) -> bytes:
    rng = random.Random(i)
    img = Image.new("RGB", (10 + i % 7, 12), tuple(rng.randrange(256) for _ in range(3)))
    buf = pyio.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _dataset(dest: Path, n: int = 120, shards: int = 5) -> str:
    samples = [SourceSample(f"{i:06d}", _jpeg(i), i % 3) for i in range(n)]
    size = sum(len(s.data) + 2048 for s in samples) // shards + 1
    return write_shards(samples, ["a", "b", "c"], str(dest), shard_bytes=size, workers=2, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return _dataset(tmp_path_factory.mktemp("indexed"))


def _no_index(manifest):
    return dataclasses.replace(manifest, shards=[dataclasses.replace(s, index="") for s in manifest.shards])


def test_writer_indexes_every_member_where_it_lies(data: str) -> None:
    m = read_manifest(data)
    assert all(s.index.endswith(".idx") and Path(s.index).is_file() for s in m.shards)
    stored = json.loads(Path(data).read_text())["shards"]
    assert stored[0]["index"] == "shard-000000.idx"  # relative, beside the shard
    for s in m.shards:
        raw = Path(s.url).read_bytes()
        text = Path(s.index).read_bytes()
        lines = text.decode().splitlines()
        assert lines[0] == f"v1.2 {s.num_samples}" and len(lines) == s.num_samples + 1
        for line in lines[1:]:
            tok = line.split()
            for ext, off, size, name in zip(tok[::4], tok[1::4], tok[2::4], tok[3::4]):
                off, size = int(off), int(size)
                assert off % 512 == 0 and name.endswith("." + ext)
                assert raw[off - 512:off - 512 + 100].rstrip(b"\0").decode() == name  # its tar header
                if ext == "cls":
                    assert raw[off:off + size].decode().isdigit()
                else:
                    assert raw[off:off + size] == _jpeg(int(name.split(".")[0]))
        with open(s.url, "rb") as f:  # an index rebuilt by reading the tar is byte-identical
            assert format_index(scan_members(f)) == text


def test_adding_indexes_keeps_the_manifest_id(data: str, tmp_path: Path) -> None:
    from largessl.data.manifest import write_manifest

    stored = json.loads(Path(data).read_text())
    rows = [{k: v for k, v in r.items() if k != "index"} for r in stored["shards"]]
    assert write_manifest(str(tmp_path / "manifest.json"), rows, stored["class_names"]) == read_manifest(data).id


def test_bad_index_text_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 'v1.2"):
        parse_index(b"v1.1 2\njpg 512 3\n")
    with pytest.raises(ValueError, match="promises 3 samples"):
        parse_index(b"v1.2 3\njpg 512 3 a.jpg\n")
    with pytest.raises(ValueError, match="not a payload offset"):
        parse_index(b"v1.2 1\njpg 100 3 a.jpg\n")


def _read(manifest, shard: int, start: int, end: int) -> tuple[list[tuple[int, str, bytes]], ShardReader]:
    from largessl.data.stream import Run

    reader = ShardReader(manifest, {}, retries=1, backoff_s=0.0, counters=_Counters())
    base = manifest.shard_starts[shard]
    got = [(gid, s.key, s.image) for gid, s in reader.read([Run(shard, start, end)], set(range(base + start, base + end)))]
    return got, reader


def test_index_seek_lands_on_the_same_sample_as_scanning(data: str) -> None:
    indexed = read_manifest(data)
    scanning = _no_index(indexed)
    for shard, info in enumerate(indexed.shards):
        for start in range(info.num_samples):
            for end in (start + 1, info.num_samples):
                seek, r_seek = _read(indexed, shard, start, end)
                scan, r_scan = _read(scanning, shard, start, end)
                assert seek == scan and len(seek) == end - start
                assert r_seek._indexes[shard] is not None and r_scan._indexes[shard] is None


class _CountingFile:
    def __init__(self, f, counter: dict) -> None:
        self.f, self.counter = f, counter

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.counter["bytes"] += len(b)
        return b

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.fixture
def counted(monkeypatch) -> dict:
    """Counts the bytes read through :func:`largessl.data.io.open_url` (shards and their indexes)."""
    counter = {"bytes": 0, "opens": []}
    real = io.open_url

    def open_url(url, mode="rb", storage_options=None, offset=0):
        counter["opens"].append((url, offset))
        return _CountingFile(real(url, mode, storage_options, offset), counter)

    monkeypatch.setattr(io, "open_url", open_url)
    return counter


def test_resume_reads_only_the_unconsumed_samples(data: str, counted: dict) -> None:
    """Resumed at 80% of the epoch: the bytes read are those of the samples left (plus tar record slack)."""
    m = read_manifest(data)
    cfg = DataConfig(augment="none", image_size=8, num_workers=0, shuffle_buffer=1)
    b = 4
    stream = build_train_stream(cfg, m, b, 0, 1, seed=3)
    full = [k for batch in stream.iterate(0) for k in batch.keys]
    full_bytes = counted["bytes"]
    start = int(0.8 * stream.batches_per_epoch)
    counted["bytes"], counted["opens"] = 0, []
    resumed = []
    for batch in build_train_stream(cfg, m, b, 0, 1, seed=3).iterate(0, start):
        resumed += batch.keys
    assert resumed == full[start * b:]
    # what the remaining samples occupy in their shards, from the index
    plan = train_worker_plan(m, seed=3, epoch=0, rank=0, world_size=1, batch_size=b,
                             batches_per_epoch=stream.batches_per_epoch, num_workers=0, worker=0,
                             shuffle_buffer=1, start_batch=start)
    need, touched = 0, set()
    opened = {u for u, _ in counted["opens"]}
    for run in plan.runs:
        info = m.shards[run.shard]
        wanted = [o for o in range(run.start, run.end) if m.shard_starts[run.shard] + o in set(plan.order)]
        if not wanted:
            assert info.url not in opened  # a shard holding only consumed samples is not even opened
            continue
        touched.add(info.url)
        headers = parse_index(Path(info.index).read_bytes()).headers + [info.bytes]
        need += sum(headers[o + 1] - headers[o] for o in wanted)
        assert (info.url, headers[wanted[0]]) in counted["opens"]  # opened at the first sample left
    assert 0 < len(touched) < len(m.shards)
    index_bytes = sum(Path(s.index).stat().st_size for s in m.shards if s.index in opened)
    slack = 2 * 10240 * len(touched)  # tarfile reads whole 10 KiB records; one record past the last sample
    assert counted["bytes"] <= need + index_bytes + slack, (counted["bytes"], need, index_bytes)
    assert counted["bytes"] < 0.5 * full_bytes


def test_manifest_without_index_scans_and_gives_the_same_batches(data: str) -> None:
    m = read_manifest(data)
    cfg = DataConfig(augment="none", image_size=8, num_workers=2, shuffle_buffer=5)
    for start in (0, 7):
        a = [x.keys for x in build_train_stream(cfg, m, 4, 1, 2, seed=1).iterate(2, start)]
        b = [x.keys for x in build_train_stream(cfg, _no_index(m), 4, 1, 2, seed=1).iterate(2, start)]
        assert a == b and a


def test_stale_or_missing_index_falls_back_to_scanning(tmp_path: Path, caplog) -> None:
    url = _dataset(tmp_path / "d", n=40, shards=2)
    m = read_manifest(url)
    # shard 0's index now points into the middle of payloads (as after a rewrite), shard 1's is gone
    idx0 = Path(m.shards[0].index)
    idx0.write_text(re.sub(r" (\d+) ", lambda g: f" {int(g.group(1)) + 1024} ", idx0.read_text(), count=0))
    Path(m.shards[1].index).unlink()
    scanning = _no_index(m)
    for shard in (0, 1):
        n = m.shards[shard].num_samples
        got, reader = _read(m, shard, n // 2, n)
        assert got == _read(scanning, shard, n // 2, n)[0]
        assert reader._indexes[shard] is None
    assert "does not match" in caplog.text and "unusable" in caplog.text


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single open-ended byte ranges (``Range: bytes=N-``), as object stores and CDNs serve."""

    ranges: list[str] = []

    def log_message(self, format, *args) -> None:
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m is None:
            return super().send_head()
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        start = int(m.group(1))
        self.ranges.append(f"{path.name}:{start}")
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        return pyio.BytesIO(data[start:])


@contextlib.contextmanager
def _serve(root: Path, handler) -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("ranges", [True, False])
def test_http_resume_seeks_with_range_requests_or_scans(tmp_path: Path, ranges: bool, caplog) -> None:
    _dataset(tmp_path / "www" / "d", n=60, shards=3)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args) -> None:
            pass

    handler = _RangeHandler if ranges else Quiet
    _RangeHandler.ranges = []
    with _serve(tmp_path / "www", handler) as base:
        m = read_manifest(f"{base}/d/manifest.json")
        assert m.shards[0].index.startswith(base)
        n = m.shards[1].num_samples
        got, reader = _read(m, 1, n - 3, n)
        assert [k for _, k, _ in got] == [k for _, k, _ in _read(_no_index(m), 1, n - 3, n)[0]]
    if ranges:
        assert _RangeHandler.ranges and reader._indexes[1] is not None  # one ranged GET, nothing before it read
    else:
        assert reader._indexes[1] is None and "does not match" in caplog.text  # the server sent it all: scanned


def test_wids_reads_our_shards(data: str, tmp_path: Path) -> None:
    wids = pytest.importorskip("wids", reason="wids is a test extra (pip install wids)")
    index = Path(data).parent / "shardindex.json"
    desc = json.loads(index.read_text())
    assert desc["__kind__"] == "wids-shard-index-v1" and desc["wids_version"] == 1
    m = read_manifest(data)
    ds = wids.ShardListDataset(str(index), cache_dir=str(tmp_path / "cache"), transformations=[])
    assert len(ds) == m.num_samples
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        sample = ds[i]
        key = sample["__key__"]
        assert sample[".jpg"].read() == _jpeg(int(key)) and int(sample[".cls"].read()) == int(key) % 3
    keys = sorted(ds[i]["__key__"] for i in range(len(ds)))
    assert keys == [f"{i:06d}" for i in range(m.num_samples)]
    ds.close()


def test_shards_index_adds_indexes_to_an_old_dataset(tmp_path: Path) -> None:
    from largessl.cli import main

    url = _dataset(tmp_path / "d", n=30, shards=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.suffix in (".idx", ".json")}
    old = read_manifest(url)
    stored = json.loads(Path(url).read_text())
    for row in stored["shards"]:  # as written before indexes existed
        del row["index"]
        (tmp_path / "d" / row["url"].replace(".tar", ".idx")).unlink()
    (tmp_path / "d" / "shardindex.json").unlink()
    Path(url).write_text(json.dumps(stored))
    assert all(not s.index for s in read_manifest(url).shards)
    assert main(["shards", "index", url, "--no-progress"]) == 0
    after = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.suffix in (".idx", ".json")}
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # the same files shards write makes
    new = read_manifest(url)
    assert new.id == old.id and [s.index for s in new.shards] == [s.index for s in old.shards]
