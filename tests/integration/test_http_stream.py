"""Shards served by a real HTTP server (http.server in a thread) streamed through fsspec's HTTP filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest

from largessl.cli import main
from largessl.data.config import DataConfig
from largessl.data.manifest import read_manifest
from largessl.data.stream import build_eval_stream, build_train_stream


def _labels_by_key(manifest_url: str) -> dict[str, int]:
    cfg = DataConfig(augment="none", image_size=16, num_workers=0)
    out = {}
    for b in build_eval_stream(cfg, read_manifest(manifest_url), batch_size=64, rank=0, world_size=1):
        out.update(zip(b.keys, b.labels.tolist()))
    return out


def test_http_shards_stream(http_server, tmp_path: Path) -> None:
    root = Path(http_server.directory)
    assert main(["shards", "digits", str(root / "digits"), "--image-size", "16"]) == 0
    local = str(root / "digits" / "train" / "manifest.json")
    url = f"{http_server.url}/digits/train/manifest.json"
    manifest = read_manifest(url)
    assert all(s.url.startswith(http_server.url) for s in manifest.shards)
    assert manifest.id == read_manifest(local).id  # relative shard URLs: same dataset, same id

    truth = _labels_by_key(local)
    cfg = DataConfig(train_manifest=url, augment="small", image_size=16, num_workers=2, shuffle_buffer=50)
    world = 2
    seen: dict[str, int] = {}
    counts = []
    for rank in range(world):
        stream = build_train_stream(cfg, manifest, per_rank_batch_size=32, rank=rank, world_size=world, seed=1)
        n = 0
        for batch in stream.iterate(0):
            n += 1
            for k, y in zip(batch.keys, batch.labels.tolist()):
                assert k not in seen
                seen[k] = y
        counts.append(n)
        assert stream.skip_counts() == {"skipped_samples": 0, "skipped_shards": 0}
    assert counts[0] == counts[1] == manifest.num_samples // (world * 32)
    assert all(truth[k] == y for k, y in seen.items())


def test_http_missing_shard_fails_at_startup(http_server) -> None:
    root = Path(http_server.directory)
    assert main(["shards", "digits", str(root / "d"), "--image-size", "16"]) == 0
    manifest = read_manifest(str(root / "d" / "val" / "manifest.json"))
    victim = Path(manifest.shards[0].url)
    victim.unlink()
    with pytest.raises(ValueError, match=f"{http_server.url}/d/val/{victim.name}"):  # missing: bad input (2)
        read_manifest(f"{http_server.url}/d/val/manifest.json")
