"""Manifest reading/writing, the shard writer and `largessl shards`, and the digits shards."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from largessl.cli import main
from largessl.data.cli import parse_size
from largessl.data.digits import write_digits_shards
from largessl.data.manifest import parse_manifest, read_manifest, write_manifest
from largessl.data.writer import scan_source, write_source


def _folder(root: Path) -> Path:
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20 + i, 16), (40 * i, 100 * c, 50)).save(root / name / f"{i}.jpg", quality=92)
    return root


def _members(url: str) -> dict[str, bytes]:
    with tarfile.open(url) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_write_read_round_trip_keeps_bytes_labels_and_keys(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    url = write_source(str(src), str(tmp_path / "out"), shard_bytes=6000, workers=2, progress=False)
    m = read_manifest(url)
    assert m.class_names == ["cat", "dog"] and m.num_samples == 10 and len(m.shards) > 1
    samples, _ = scan_source(str(src))
    by_key = {s.key: s for s in samples}
    seen = set()
    for shard in m.shards:
        members = _members(shard.url)
        assert hashlib.sha256(Path(shard.url).read_bytes()).hexdigest() == shard.sha256
        keys = {n.split(".")[0] for n in members}
        assert len(keys) == shard.num_samples
        for k in keys:
            assert members[f"{k}.jpg"] == Path(by_key[k].data).read_bytes()  # original JPEG bytes kept
            assert int(members[f"{k}.cls"]) == by_key[k].label
        seen |= keys
    assert seen == set(by_key)
    # stable: writing again gives byte-identical shards and the same id
    url2 = write_source(str(src), str(tmp_path / "out2"), shard_bytes=6000, workers=1, progress=False)
    assert read_manifest(url2).id == m.id


def test_list_file_source(tmp_path: Path) -> None:
    _folder(tmp_path / "src")
    lines = [f"src/cat/{i}.jpg 3" for i in range(3)] + [f"src/dog/{i}.jpg 0" for i in range(2)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    samples, names = scan_source(str(tmp_path / "list.txt"))
    assert names == ["0", "1", "2", "3"] and [s.label for s in samples] == [3, 3, 3, 0, 0]
    (tmp_path / "bad.txt").write_text("src/cat/missing.jpg 1\n")
    with pytest.raises(ValueError, match="does not exist"):
        scan_source(str(tmp_path / "bad.txt"))


def test_manifest_written_last_and_overwrite_refused(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    dest = tmp_path / "out"
    assert main(["shards", "write", str(src), str(dest), "--shard-size", "5KB", "--no-progress"]) == 0
    assert main(["shards", "write", str(src), str(dest), "--no-progress"]) == 2  # complete dataset: refused
    assert main(["shards", "write", str(src), str(dest), "--no-progress", "--overwrite", "--shard-size", "1MB"]) == 0
    assert len(read_manifest(str(dest / "manifest.json")).shards) == 1
    assert not list(dest.glob("*.tmp-*"))
    # shards without a manifest (a write that died) are not a dataset
    (dest / "manifest.json").unlink()
    with pytest.raises(ValueError, match="does not exist"):  # bad input (exit 2): no retry makes it appear
        read_manifest(str(dest / "manifest.json"))


def test_verify_detects_a_changed_shard(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    assert main(["shards", "write", str(src), str(tmp_path / "o"), "--shard-size", "5KB", "--no-progress"]) == 0
    url = str(tmp_path / "o" / "manifest.json")
    assert main(["shards", "verify", url]) == 0
    shard = read_manifest(url).shards[0].url
    data = bytearray(Path(shard).read_bytes())
    data[700] ^= 0xFF
    Path(shard).write_bytes(bytes(data))
    assert main(["shards", "verify", url]) == 3


@pytest.mark.parametrize("text, match", [
    ("", "is empty"),
    ("{not json", "not valid JSON"),
    ('{"shards": []}', "not a largessl manifest"),
    ('{"format": "largessl.manifest", "version": 1, "shards": [], "class_names": [], "num_samples": 0}',
     "lists no shards"),
    ('{"format": "largessl.manifest", "version": 1, "shards": [{"url": "a.tar", "num_samples": 3}], '
     '"class_names": [], "num_samples": 4}', "num_samples=4 but the shards hold 3"),
    ('{"format": "largessl.manifest", "version": 1, "shards": [{"num_samples": 3}], "class_names": [], '
     '"num_samples": 3}', "has no url"),
    ('{"format": "largessl.manifest", "version": 9}', "version 9"),
])
def test_malformed_manifest_is_a_clear_value_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_manifest(str(path))


def test_missing_shard_fails_at_startup_with_url(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    url = write_source(str(src), str(tmp_path / "o"), shard_bytes=5000, progress=False)
    victim = read_manifest(url).shards[-1].url
    Path(victim).unlink()
    with pytest.raises(ValueError, match=victim):
        read_manifest(url)
    assert read_manifest(url, check_shards=False).num_samples == 10


def test_manifest_id_is_location_independent(tmp_path: Path) -> None:
    write_manifest(str(tmp_path / "a" / "manifest.json"), [{"url": "x.tar", "num_samples": 2, "sha256": "ab"}], ["k"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = parse_manifest((tmp_path / "a" / "manifest.json").read_bytes(), str(tmp_path / "a" / "manifest.json"))
    b = parse_manifest((tmp_path / "b" / "manifest.json").read_bytes(), "file://" + str(tmp_path / "b/manifest.json"))
    assert a.id == b.id and len(a.id) == 64
    assert a.shards[0].url == str(tmp_path / "a" / "x.tar")
    assert b.shards[0].url == "file://" + str(tmp_path / "b" / "x.tar")
    assert a.shards[0]["num_samples"] == 2
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"][0]["url"] == "x.tar"


def test_parse_size() -> None:
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_digits_shards(tmp_path: Path) -> None:
    train, val = write_digits_shards(str(tmp_path / "digits"), image_size=16)
    mt, mv = read_manifest(train), read_manifest(val)
    assert mt.num_samples + mv.num_samples == 1797 and mv.num_samples == 359
    assert mt.class_names == [str(i) for i in range(10)]
    assert len(mt.shards) >= 7 and len({s.num_samples for s in mt.shards}) > 1  # uneven shards
    first = _members(mt.shards[0].url)
    img = next(v for k, v in first.items() if k.endswith(".jpg"))
    import io

    assert Image.open(io.BytesIO(img)).size == (16, 16)
    assert {int(v) for k, v in first.items() if k.endswith(".cls")} == set(range(10))  # shuffled before sharding
    stamp = Path(train).stat().st_mtime_ns
    assert write_digits_shards(str(tmp_path / "digits"), image_size=16) == (train, val)  # reused, not rewritten
    assert Path(train).stat().st_mtime_ns == stamp
