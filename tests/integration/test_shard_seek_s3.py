"""Seekable shards on a real S3 server (SeaweedFS): a resume seeks with ranged reads and lands on the scanned samples."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from PIL import Image

from largessl.data import io
from largessl.data.config import DataConfig
from largessl.data.manifest import read_manifest
from largessl.data.stream import build_train_stream

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_s3_resume_seeks_and_matches_scanning(aws_env, tmp_path: Path, monkeypatch) -> None:
    from largessl.cli import main

    src = tmp_path / "src"
    rng = random.Random(0)
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (24, 20), tuple(rng.randrange(256) for _ in range(3))).save(src / f"c{c}" / f"{i}.jpg")
    dest = aws_env.url("seek", "train")
    assert main(["shards", "write", str(src), dest, "--shard-size", "20KB", "--workers", "2", "--no-progress"]) == 0
    manifest = read_manifest(dest + "/manifest.json")
    assert len(manifest.shards) >= 3 and all(s.index.startswith("s3://") for s in manifest.shards)
    scanning = dataclasses.replace(manifest, shards=[dataclasses.replace(s, index="") for s in manifest.shards])

    opened: list[tuple[str, int]] = []
    real = io.open_url

    def open_url(url, mode="rb", storage_options=None, offset=0):
        opened.append((url, offset))
        return real(url, mode, storage_options, offset)

    monkeypatch.setattr(io, "open_url", open_url)
    cfg = DataConfig(augment="none", image_size=8, num_workers=0, shuffle_buffer=3, retry_backoff_s=0.01)
    full = [b.keys for b in build_train_stream(cfg, manifest, 4, 0, 1, seed=2).iterate(0)]
    start = len(full) - 2
    opened.clear()
    seek = [b.keys for b in build_train_stream(cfg, manifest, 4, 0, 1, seed=2).iterate(0, start)]
    shard_opens = [(u, off) for u, off in opened if u.endswith(".tar")]
    scan = [b.keys for b in build_train_stream(cfg, scanning, 4, 0, 1, seed=2).iterate(0, start)]
    assert seek == scan == full[start:]
    assert any(off > 0 for _, off in shard_opens)  # opened inside a shard (a ranged read), not at its start
